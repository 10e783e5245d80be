"""The Python SDK against a live KMS (its command line: test_command_line.py)."""
import json
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from kms_client import Client, KmsError, KmsUnreachable
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


def test_the_sdk_has_no_default_address(monkeypatch):
    monkeypatch.delenv("KMS_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="pass base_url or set KMS_BASE_URL"):
        Client(clientname="svc-x", password="p")
    monkeypatch.setenv("KMS_BASE_URL", "https://kms.internal/")
    assert Client().base_url == "https://kms.internal"


def test_an_unreachable_kms_reads_as_its_reason():
    from kms.serving.throwaway_postgres import _free_port
    from kms_client import KmsUnreachable
    port = _free_port()
    with pytest.raises(KmsUnreachable) as error:
        Client(base_url=f"http://127.0.0.1:{port}", clientname="svc-x", password="p").ping()
    assert str(error.value).startswith(f"no answer from http://127.0.0.1:{port} (")
    assert error.value.status == 0 and error.value.code == "unreachable"


def resetting_server(resets: int):
    """A server that reads each request and resets its connection (RST, no answer) the first
    `resets` times, then answers a key look-up: the requests' methods, as they came."""
    listener = socket.create_server(("127.0.0.1", 0))
    methods = []
    key = {"dek": "A" * 43, "version": 1, "encoding": "base64url (RFC 4648)", "expiresAt": "2099-01-01T00:00:00Z"}
    body = json.dumps({"decryptWith": key, "encryptWith": key}).encode()

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += conn.recv(65536)
                methods.append(request.split(b" ", 1)[0].decode())
                if len(methods) <= resets:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
                    continue
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                             + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)

    threading.Thread(target=serve, daemon=True).start()
    return listener, methods


def test_a_get_whose_connection_is_reset_is_sent_once_more():
    listener, methods = resetting_server(resets=1)
    try:
        kms = Client(base_url=f"http://127.0.0.1:{listener.getsockname()[1]}", retries=0)
        kms._token, kms._token_expires = "t", time.time() + 3600
        assert kms.get_key("invoices-db").encrypt_with.version == 1
        assert methods == ["GET", "GET"]
    finally:
        listener.close()


def test_a_get_reset_twice_and_other_methods_reset_once_are_unreachable():
    listener, methods = resetting_server(resets=3)
    try:
        kms = Client(base_url=f"http://127.0.0.1:{listener.getsockname()[1]}")
        kms._token, kms._token_expires = "t", time.time() + 3600
        with pytest.raises(KmsUnreachable):
            kms.get_key("invoices-db")  # sent twice: once more after the reset, no more
        with pytest.raises(KmsUnreachable):
            kms.delete_key("invoices-db")  # not sent again: a second delete would answer 404
        assert methods == ["GET", "GET", "DELETE"]
    finally:
        listener.close()
