"""The Python SDK and its command line, against a live KMS."""
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from kms_client import Client, KmsError
from tests.conftest import CLIENT_PASSWORD, bearer


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


@pytest.mark.parametrize("local", [False, True], ids=["server", "local"])
def test_blobs_record_their_key_version_and_survive_rotation(sdk, local):
    sdk.generate_key("invoices")
    old = sdk.encrypt("invoices", b"before", local=local)
    assert sdk.rotate_key("invoices").version == 2
    new = sdk.encrypt("invoices", b"after", local=local)
    assert old[17:21] == b"\x00\x00\x00\x01" and new[17:21] == b"\x00\x00\x00\x02"
    assert sdk.decrypt("invoices", old, local=local) == b"before"
    assert sdk.decrypt("invoices", new, local=local) == b"after"


def logins(db, outcome="success") -> int:
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM audit_events WHERE action = 'login' AND outcome = %s", (outcome,))
        return cur.fetchone()[0]


class Clock:
    """The SDK's clock (kms_client._now), moved forward by the test; the server's stays."""

    def __init__(self, monkeypatch):
        import kms_client
        self.offset = 0.0
        monkeypatch.setattr(kms_client, "_now", lambda: time.time() + self.offset)


def test_deks_are_cached_until_they_expire_then_fetched_again(sdk, db, monkeypatch):
    clock = Clock(monkeypatch)
    sdk.generate_key("invoices")
    before = lookups(db)
    for _ in range(5):
        sdk.encrypt("invoices", b"x", local=True)
    assert lookups(db) == before + 1  # one look-up, then the cache
    assert "dek" not in repr(sdk.get_key("invoices").encrypt_with)
    clock.offset = 5 * 60 + 1  # past the expiresAt the KMS gave (5 minutes)
    sdk.encrypt("invoices", b"x", local=True)
    assert lookups(db) == before + 2


def test_the_dek_cache_is_bounded(live_server, auth, db):
    sdk = Client(base_url=live_server, clientname="sdk-small", cache_size=2)
    sdk.signup(auth.signup_token("sdk-small"), CLIENT_PASSWORD)
    for name in ("k1", "k2", "k3"):
        sdk.generate_key(name)
        sdk.get_key(name)
    before = lookups(db)
    sdk.get_key("k3")
    sdk.get_key("k2")
    assert lookups(db) == before  # the two newest are cached
    sdk.get_key("k1")  # evicted when k3 came in
    assert lookups(db) == before + 1


def test_logs_in_again_before_its_token_expires(sdk, db, monkeypatch):
    clock = Clock(monkeypatch)
    sdk.generate_key("invoices")
    before = logins(db)
    sdk.rotate_key("invoices")
    assert logins(db) == before  # the token from signup is still good
    clock.offset = 15 * 60 - 20  # within 30 s of its expiry: log in first
    sdk.rotate_key("invoices")
    assert logins(db) == before + 1


def test_logs_in_again_once_when_its_token_is_revoked(sdk, client, db):
    sdk.generate_key("invoices")
    assert client.post("/auth/logout", headers=bearer(sdk._token)).status_code == 204  # behind the SDK's back
    before = logins(db)
    assert sdk.rotate_key("invoices").version == 2
    assert logins(db) == before + 1


def test_gives_up_after_one_new_login_when_that_fails_too(sdk, client, db, auth):
    sdk.generate_key("invoices")
    client.post("/auth/logout", headers=bearer(sdk._token))
    sdk._password = "Wrong-passw0rd!"  # the password was changed elsewhere
    before = logins(db, "denied")
    with pytest.raises(KmsError) as error:
        sdk.rotate_key("invoices")
    assert error.value.status == 401
    assert logins(db, "denied") == before + 1  # one attempt, no loop


def test_errors_carry_the_kms_code_and_no_secret(sdk):
    with pytest.raises(KmsError) as error:
        sdk.get_key("missing")
    assert error.value.status == 404 and error.value.code == "not_found"
    assert CLIENT_PASSWORD not in str(error.value)


def flaky_server(answers):
    """A server answering POSTs with the (status, headers) in `answers`, recording when each came."""
    arrivals = []

    class Flaky(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            arrivals.append(time.monotonic())
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
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()  # shutdown() in 50 ms
    return server, arrivals


def test_retries_503_and_429_waiting_as_retry_after_says():
    answers = [(503, {"Retry-After": "1"}), (429, {"Retry-After": "2"}), (200, {})]
    server, arrivals = flaky_server(answers)
    try:
        kms = Client(base_url=f"http://127.0.0.1:{server.server_port}", clientname="svc-x", password="p")
        assert kms._token_for_request() == "t"
        assert answers == []
        gaps = [later - earlier for earlier, later in zip(arrivals, arrivals[1:])]
        assert 1.0 <= gaps[0] < 1.5 and 2.0 <= gaps[1] < 2.5, gaps
    finally:
        server.shutdown()
        server.server_close()


def test_stops_retrying_after_its_retries():
    answers = [(503, {"Retry-After": "0"})] * 3
    server, arrivals = flaky_server(answers)
    try:
        kms = Client(base_url=f"http://127.0.0.1:{server.server_port}", clientname="svc-x", password="p", retries=2)
        with pytest.raises(KmsError) as error:
            kms._token_for_request()
        assert error.value.status == 503 and len(arrivals) == 3
    finally:
        server.shutdown()
        server.server_close()


KMS_CLIENT = str(Path(sys.executable).parent / "kms-client")  # the console script `pip install` made


def run_cli(live_server, *args, stdin=b"", user="sdk-svc"):
    env = {**os.environ, "KMS_BASE_URL": live_server, "KMS_USER": user, "KMS_PASS": CLIENT_PASSWORD}
    return subprocess.run([KMS_CLIENT, *args], cwd="/", env=env, input=stdin, capture_output=True, timeout=60)


def test_command_line_covers_every_command(live_server, auth):
    signup_token = auth.signup_token("cli-svc")
    signed_up = run_cli(live_server, "signup", stdin=signup_token.encode() + b"\n", user="cli-svc")
    assert signed_up.returncode == 0 and signed_up.stderr == b"signed up\n", signed_up.stderr
    generated = run_cli(live_server, "generate", "cli-key", user="cli-svc")
    assert generated.returncode == 0, generated.stderr
    first = json.loads(generated.stdout)
    assert first["version"] == 1 and len(first["dek"]) == 43
    rotated = json.loads(run_cli(live_server, "rotate", "cli-key", user="cli-svc").stdout)
    assert rotated["version"] == 2 and rotated["dek"] != first["dek"]
    latest = json.loads(run_cli(live_server, "get", "cli-key", user="cli-svc").stdout)
    assert latest["encryptWith"] == rotated
    old = json.loads(run_cli(live_server, "get", "cli-key", "--version", "1", user="cli-svc").stdout)
    assert old["decryptWith"] == first and old["encryptWith"] == rotated
    blob = run_cli(live_server, "encrypt", "cli-key", "--context", "purpose=test", stdin=b"hello", user="cli-svc")
    assert blob.returncode == 0, blob.stderr
    plain = run_cli(live_server, "decrypt", "--ref", "cli-key", "--context", "purpose=test", stdin=blob.stdout,
                    user="cli-svc")
    assert plain.returncode == 0 and plain.stdout == b"hello"
    deleted = run_cli(live_server, "delete", "cli-key", user="cli-svc")
    assert deleted.returncode == 0 and deleted.stdout == b""
    gone = run_cli(live_server, "get", "cli-key", user="cli-svc")
    assert gone.returncode == 1 and gone.stderr.startswith(b"kms-client: 404 not_found: ")
    assert gone.stderr.count(b"\n") == 1
    everything = b"".join(r.stderr for r in (signed_up, generated, blob, plain, deleted, gone))
    assert CLIENT_PASSWORD.encode() not in everything and signup_token.encode() not in everything


def test_command_line_errors_are_one_line_with_their_exit_code(sdk, live_server):
    from kms.serving.throwaway_postgres import _free_port
    unreachable = run_cli(f"http://127.0.0.1:{_free_port()}", "get", "k")
    assert unreachable.returncode == 3
    assert unreachable.stderr.count(b"\n") == 1 and b"check --url or KMS_BASE_URL" in unreachable.stderr
    garbage = run_cli(live_server, "decrypt", "k", stdin=b"this is not a blob at all")
    assert garbage.returncode == 2 and garbage.stderr == b"kms-client: not a KMS stream or blob\n"
    sdk.generate_key("k")
    sealed = run_cli(live_server, "encrypt", "k", stdin=b"hello").stdout
    altered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    tampered = run_cli(live_server, "decrypt", "k", stdin=altered)
    assert tampered.returncode == 4, tampered.stderr
    assert tampered.stderr == b"kms-client: the stream was altered or truncated, or the key or context differs\n"
    usage = run_cli(live_server, "frobnicate")
    assert usage.returncode == 2
