"""The original Go KMS's clients, replayed on the wire: its SDK, kms-client and kms-admin.

Requests go out exactly as Go's net/http sends them (User-Agent: Go-http-client/1.1, Accept-Encoding:
gzip, bodies in the field order of Go's json.Marshal of a map, i.e. sorted keys, no body and no
Content-Type on rotate and delete), and answers are decoded the way the original's Go structs decode
them: unknown fields ignored, absent fields zero, a wrong JSON type an error, DEKs through a strict
unpadded base64url decoder (Go's base64.RawURLEncoding).
"""
import base64
import binascii
import hashlib
import hmac
import http.client
import json
import re
import string
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import pytest

from kms.audit.service import flush_refusals
from kms.context import Context
from tests.conftest import ADMIN_NAME, ADMIN_PASSWORD, CLIENT_PASSWORD, AuthActions, bearer, serve_in_thread, stop_server

GO_HEADERS = {"User-Agent": "Go-http-client/1.1", "Accept-Encoding": "gzip"}


class GoHttp:
    """What Go's http.Client puts on the wire, over one keep-alive connection per call site."""

    def __init__(self, base_url: str):
        host, port = base_url.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)

    def do(self, method: str, path: str, body: dict | None = None, token: str | None = None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            # http.client adds Host itself; Go sends Host, User-Agent, Content-Length, then the rest.
            headers = dict(GO_HEADERS)
            data = None
            if body is not None:
                data = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()  # json.Marshal(map)
                headers["Content-Type"] = "application/json"
            if token is not None:
                headers["Authorization"] = "Bearer " + token
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
            assert response.getheader("Content-Encoding") is None  # Go asked for gzip; plain is fine
            return response.status, raw
        finally:
            conn.close()


def go_decode(raw: bytes, struct: dict) -> dict:
    """json.NewDecoder(...).Decode(&s) for a struct whose fields are `struct` (name -> Go type)."""
    value = json.loads(raw)
    assert isinstance(value, dict), "Go cannot decode a non-object into a struct"
    zero = {"string": "", "int": 0, "time": None}
    decoded = {}
    for name, go_type in struct.items():
        if name not in value or value[name] is None:
            decoded[name] = zero.get(go_type) if isinstance(go_type, str) else None
            continue
        field = value[name]
        if go_type == "string":
            assert isinstance(field, str), f"json: cannot unmarshal into Go struct field .{name} of type string"
        elif go_type == "int":
            assert isinstance(field, int) and not isinstance(field, bool), f"cannot unmarshal {name} into int"
        elif go_type == "time":  # time.Time.UnmarshalJSON: RFC 3339
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", field), field
            field = datetime.fromisoformat(field.replace("Z", "+00:00"))
        elif isinstance(go_type, dict):
            field = go_decode(json.dumps(field).encode(), go_type)
        decoded[name] = field
    return decoded


def raw_url_decode(text: str) -> bytes:
    """Go's base64.RawURLEncoding.DecodeString: no padding, URL alphabet only."""
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text) or len(text) % 4 == 1:
        raise binascii.Error(f"illegal base64 data at input byte {len(text)}")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


LOGIN_RESPONSE = {"token": "string", "ttl": "int"}  # the original SDK's struct
KEY = {"dek": "string", "version": "int", "encoding": "string", "expiresAt": "time"}
KEY_BUNDLE = {"decryptWith": KEY, "encryptWith": KEY}


def go_login(go: GoHttp, name: str, password: str) -> str:
    status, raw = go.do("POST", "/auth/login", {"clientname": name, "password": password})
    assert status == 200, raw
    body = go_decode(raw, LOGIN_RESPONSE)
    # time.Duration(ttl) is nanoseconds: any ttl would expire the token almost at once and, while
    # that sliver is still open, return holding the SDK's read lock (a deadlock on the next call).
    assert body["ttl"] == 0 and "ttl" not in json.loads(raw)
    return body["token"]


def test_the_original_clients_full_session_on_the_wire(live_server, client):
    go = GoHttp(live_server)
    signup_token = AuthActions(client).signup_token("go-service")
    # kms-client signup
    status, raw = go.do("POST", "/auth/signup", {"password": CLIENT_PASSWORD, "token": signup_token})
    assert status == 200, raw
    assert go_decode(raw, LOGIN_RESPONSE)["ttl"] == 0
    token = go_login(go, "go-service", CLIENT_PASSWORD)

    status, raw = go.do("POST", "/keys/actions/generate", {"keyReference": "orders-db"}, token)
    assert status == 200, raw
    generated = go_decode(raw, KEY)
    assert len(generated["dek"]) == 43 and len(raw_url_decode(generated["dek"])) == 32
    assert generated["version"] == 1 and generated["encoding"] == "base64url (RFC 4648)"

    status, raw = go.do("POST", "/keys/orders-db/actions/rotate", None, token)  # no body, no Content-Type
    assert status == 200, raw
    rotated = go_decode(raw, KEY)
    assert rotated["version"] == 2 and len(raw_url_decode(rotated["dek"])) == 32

    status, raw = go.do("GET", "/keys/orders-db/1", None, token)  # the SDK's GetKey(ref, version)
    assert status == 200, raw
    bundle = go_decode(raw, KEY_BUNDLE)
    assert bundle["decryptWith"]["dek"] == generated["dek"] and bundle["encryptWith"]["dek"] == rotated["dek"]
    for key in bundle.values():
        assert len(raw_url_decode(key["dek"])) == 32
        assert timedelta(minutes=4, seconds=50) < key["expiresAt"] - datetime.now(timezone.utc) <= timedelta(minutes=5)

    status, raw = go.do("DELETE", "/keys/orders-db/actions/delete", None, token)  # no body, no Content-Type
    assert status == 204 and raw == b""
    status, raw = go.do("GET", "/keys/orders-db/2", None, token)
    assert status == 404


@pytest.mark.real_password_hashing
def test_eight_parallel_logins_of_one_client_all_succeed(make_app):
    """The original SDK logs in before nearly every call, from every goroutine at once, and never
    retries a 429: a burst of 8 on 2 cores must queue for a hashing slot, not be refused."""
    app = make_app(SERVER_THREADS=16)
    server, base_url = serve_in_thread(app, threads=16)
    try:
        go = GoHttp(base_url)
        with ThreadPoolExecutor(8) as pool:
            tokens = list(pool.map(lambda _: go_login(go, ADMIN_NAME, ADMIN_PASSWORD), range(8)))
        assert len(set(tokens)) == 8
        status, _ = go.do("GET", "/keys", None, tokens[-1])
        assert status == 200
    finally:
        stop_server(server)


# Signup tokens from the original's `kms-admin generate_signup`

def mint_legacy_token(secret_b64: str, clientname: str, ttl_ms: int = 3_600_000, iat_ms: int | None = None,
                      header: dict | None = None) -> str:
    """The format API.md documents (and the original's admin tool writes)."""
    def part(obj) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj, separators=(",", ":")).encode()).rstrip(b"=").decode()

    secret = base64.urlsafe_b64decode(secret_b64 + "=" * (-len(secret_b64) % 4))
    iat_ms = int(time.time() * 1000) if iat_ms is None else iat_ms
    message = part(header or {"ver": "1", "typ": "signup"}) + "." + part({"sub": clientname, "ttl": ttl_ms,
                                                                          "iat": iat_ms})
    signature = hmac.new(secret, message.encode(), hashlib.sha256).digest()
    return message + "." + base64.urlsafe_b64encode(signature).rstrip(b"=").decode()


@pytest.mark.parametrize("header", [{"ver": "1", "typ": "signup"}, {"type": "signup", "ver": "1"}])
def test_a_legacy_signup_token_works_once_and_is_audited_as_legacy(app, live_server, secrets_env, db, header):
    go = GoHttp(live_server)
    token = mint_legacy_token(secrets_env["SIGNUP_SECRET"], "legacy-svc", header=header)
    status, raw = go.do("POST", "/auth/signup", {"password": CLIENT_PASSWORD, "token": token})
    assert status == 200, raw
    assert go.do("GET", "/keys", None, go_decode(raw, LOGIN_RESPONSE)["token"])[0] == 200
    go_login(go, "legacy-svc", CLIENT_PASSWORD)  # the client exists under the token's name
    replay, raw = go.do("POST", "/auth/signup", {"password": CLIENT_PASSWORD, "token": token})
    assert replay == 401 and json.loads(raw)["error"] == "invalid_signup_token"
    kms = app.extensions["kms"]
    with kms.pool.connection() as conn:  # the refusal was counted in memory: written now
        flush_refusals(Context(kms=kms, conn=conn))
    with db.cursor() as cur:
        cur.execute("SELECT action, outcome FROM audit_events WHERE action LIKE 'signup%%' ORDER BY seq")
        assert cur.fetchall() == [("signup_token.use_legacy", "success"), ("signup", "denied")]
        cur.execute("SELECT role FROM clients WHERE role <> 'admin'")
        assert cur.fetchall() == [("client",)]  # DEFAULT_ROLE


def spellings(token: str) -> list[str]:
    """The 4 texts of one legacy token: its signature's last base64url character carries 2 bits
    that decode to nothing, so these 4 characters give the same signature bytes."""
    alphabet = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"
    message, signature = token.rsplit(".", 1)
    first = alphabet.index(signature[-1]) & ~3
    return [f"{message}.{signature[:-1]}{alphabet[first + spare]}" for spare in range(4)]


def test_every_spelling_of_a_used_legacy_signup_token_is_refused(live_server, client, auth, secrets_env):
    go = GoHttp(live_server)
    token = mint_legacy_token(secrets_env["SIGNUP_SECRET"], "legacy-svc")
    spelled = spellings(token)
    assert token in spelled and len(set(spelled)) == 4
    status, raw = go.do("POST", "/auth/signup", {"password": CLIENT_PASSWORD,
                                                 "token": next(s for s in spelled if s != token)})
    assert status == 200, raw  # a spelling the original's tool never writes still verifies

    def refused_every_time():
        for spelling in spelled:
            replay, raw = go.do("POST", "/auth/signup", {"password": CLIENT_PASSWORD, "token": spelling})
            assert (replay, json.loads(raw)["error"]) == (401, "invalid_signup_token"), spelling

    refused_every_time()
    deleted = client.delete(f"/clients/{auth.client_id('legacy-svc')}", headers=bearer(auth.admin_token))
    assert deleted.status_code in (200, 204), deleted.text
    refused_every_time()  # the name is free again, and still no spelling signs it up


def test_a_refused_legacy_signup_leaves_the_token_usable(live_server, secrets_env):
    go = GoHttp(live_server)
    token = mint_legacy_token(secrets_env["SIGNUP_SECRET"], "legacy-svc")
    weak, _ = go.do("POST", "/auth/signup", {"password": "weak", "token": token})
    assert weak == 400
    status, raw = go.do("POST", "/auth/signup", {"password": CLIENT_PASSWORD, "token": token})
    assert status == 200, raw


@pytest.mark.parametrize("case", ["expired", "future iat", "zero ttl", "ttl over 30 days", "wrong secret",
                                  "access type", "bad name", "tampered payload"])
def test_bad_legacy_signup_tokens_are_401(live_server, secrets_env, case):
    secret = secrets_env["SIGNUP_SECRET"]
    now = int(time.time() * 1000)
    token = {
        "expired": lambda: mint_legacy_token(secret, "legacy-svc", ttl_ms=1000, iat_ms=now - 5000),
        "future iat": lambda: mint_legacy_token(secret, "legacy-svc", iat_ms=now + 3_600_000),
        "zero ttl": lambda: mint_legacy_token(secret, "legacy-svc", ttl_ms=0),
        "ttl over 30 days": lambda: mint_legacy_token(secret, "legacy-svc", ttl_ms=31 * 86_400_000),
        "wrong secret": lambda: mint_legacy_token(secrets_env["JWT_SECRET"], "legacy-svc"),
        "access type": lambda: mint_legacy_token(secret, "legacy-svc", header={"ver": "1", "typ": "access"}),
        "bad name": lambda: mint_legacy_token(secret, "no"),
        "tampered payload": lambda: _tamper(mint_legacy_token(secret, "legacy-svc")),
    }[case]()
    status, raw = GoHttp(live_server).do("POST", "/auth/signup", {"password": CLIENT_PASSWORD, "token": token})
    assert status == 401 and json.loads(raw)["error"] == "invalid_signup_token"


def _tamper(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = "evil-svc"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return ".".join([header, forged, signature])


def test_legacy_signup_tokens_can_be_turned_off(make_app, secrets_env):
    app = make_app(LEGACY_SIGNUP_TOKENS="false")
    server, base_url = serve_in_thread(app, threads=2)
    try:
        token = mint_legacy_token(secrets_env["SIGNUP_SECRET"], "legacy-svc")
        status, _ = GoHttp(base_url).do("POST", "/auth/signup", {"password": CLIENT_PASSWORD, "token": token})
        assert status == 401
    finally:
        stop_server(server)


def test_our_sdk_reads_padded_and_unpadded_deks():
    from kms_client import _key
    raw = bytes(range(32))
    for text in (base64.urlsafe_b64encode(raw).decode(), base64.urlsafe_b64encode(raw).rstrip(b"=").decode()):
        assert _key({"dek": text, "version": 1, "expiresAt": "2099-01-01T00:00:00.000Z"}).dek == raw


def test_a_bearer_token_reaches_no_log_line(live_server, client, captured_logs):
    go = GoHttp(live_server)
    token = go_login(go, ADMIN_NAME, ADMIN_PASSWORD)
    go.do("GET", "/keys", None, token)
    assert token not in captured_logs.getvalue() and ADMIN_PASSWORD not in captured_logs.getvalue()
    assert bearer(token)  # the header the Go SDK builds
