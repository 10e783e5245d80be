"""The Python SDK and its command line, against a live KMS."""
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from kms_client import Client, KmsError
from tests.conftest import CLIENT_PASSWORD, bearer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def sdk(live_server, auth):
    kms = Client(base_url=live_server, clientname="sdk-svc")
    kms.signup(auth.signup_token("sdk-svc"), CLIENT_PASSWORD)
    return kms


def lookups(db):
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM audit_events WHERE action = 'key.lookup'")
        return cur.fetchone()[0]


def test_encrypt_and_decrypt_round_trip_with_associated_data(sdk):
    sdk.generate_key("invoices")
    blob = sdk.encrypt("invoices", b"card 4111", aad=b"invoice:42")
    assert b"card 4111" not in blob
    assert sdk.decrypt("invoices", blob, aad=b"invoice:42") == b"card 4111"
    with pytest.raises(KmsError):
        sdk.decrypt("invoices", blob, aad=b"invoice:43")
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(KmsError):
        sdk.decrypt("invoices", tampered, aad=b"invoice:42")


def test_blobs_record_their_key_version_and_survive_rotation(sdk):
    sdk.generate_key("invoices")
    old = sdk.encrypt("invoices", b"before")
    assert sdk.rotate_key("invoices").version == 2
    new = sdk.encrypt("invoices", b"after")
    assert old[4:8] == b"\x00\x00\x00\x01" and new[4:8] == b"\x00\x00\x00\x02"
    assert sdk.decrypt("invoices", old) == b"before" and sdk.decrypt("invoices", new) == b"after"


def test_deks_are_cached_until_they_expire(sdk, db):
    sdk.generate_key("invoices")
    before = lookups(db)
    for _ in range(5):
        sdk.encrypt("invoices", b"x")
    assert lookups(db) == before + 1
    assert "dek" not in repr(sdk.get_key("invoices").encrypt_with)


def test_logs_in_again_once_when_its_token_is_revoked(sdk, client, live_server):
    sdk.generate_key("invoices")
    client.post("/auth/logout", headers=bearer(sdk._token))  # revoked behind the SDK's back
    sdk._forget("invoices")
    assert sdk.get_key("invoices").encrypt_with.version == 1


def test_errors_carry_the_kms_code_and_no_secret(sdk):
    with pytest.raises(KmsError) as error:
        sdk.get_key("missing")
    assert error.value.status == 404 and error.value.code == "not_found"
    assert CLIENT_PASSWORD not in str(error.value)


def test_retries_503_and_429_honouring_retry_after():
    answers = [(503, {"Retry-After": "1"}), (429, {"Retry-After": "1"}), (200, {})]

    class Flaky(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            status, headers = answers.pop(0)
            body = json.dumps({"token": "t", "expiresAt": "2099-01-01T00:00:00Z"} if status == 200 else
                              {"error": "busy", "message": "retry", "requestId": "x"}).encode()
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Flaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        kms = Client(base_url=f"http://127.0.0.1:{server.server_port}", clientname="svc-x", password="p")
        assert kms._token_for_request() == "t"
        assert answers == []
    finally:
        server.shutdown()
        server.server_close()


def run_cli(live_server, *args, stdin=b""):
    env = {**os.environ, "KMS_BASE_URL": live_server, "KMS_USER": "sdk-svc", "KMS_PASS": CLIENT_PASSWORD}
    return subprocess.run([sys.executable, "-m", "kms_client", *args], cwd=ROOT, env=env, input=stdin,
                          capture_output=True, timeout=60)


def test_command_line_generates_encrypts_and_decrypts(sdk, live_server):
    generated = run_cli(live_server, "generate", "cli-key")
    assert generated.returncode == 0, generated.stderr
    assert json.loads(generated.stdout)["version"] == 1
    blob = run_cli(live_server, "encrypt", "cli-key", "--aad", "ctx", stdin=b"hello")
    assert blob.returncode == 0
    plain = run_cli(live_server, "decrypt", "cli-key", "--aad", "ctx", stdin=blob.stdout)
    assert plain.returncode == 0 and plain.stdout == b"hello"
    missing = run_cli(live_server, "get", "no-such-key")
    assert missing.returncode == 1 and b"404 not_found" in missing.stderr
    assert CLIENT_PASSWORD.encode() not in missing.stderr + blob.stderr
