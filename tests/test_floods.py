"""Key access survives floods: each flood runs here for real (bounded, loopback, from other
127/8 addresses, in a process of its own) beside a client that holds a valid token, and that
client must still be served, and served first."""
import http.client
import json
import socket
import os
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from bench.floods import request_bytes
from kms.serving.dispatch import PriorityDispatcher
from tests.conftest import (ADMIN_NAME, CLIENT_PASSWORD, AuthActions, HttpClient, bearer, closed_by_peer, post_from,
                            serve_in_thread, stop_server)

ROOT = Path(__file__).resolve().parent.parent
FORGED_JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.forged"


def flood_in_a_process(base_url: str, request: bytes, *, connections: int, sources: int, seconds: float):
    """bench.floods.flood in a process of its own (its own interpreter: it takes no GIL from the
    server under test); returns a callable that waits for it and gives its result."""
    program = ("import json, sys; from bench.floods import flood; "
               "print(json.dumps(flood(sys.argv[1], bytes.fromhex(sys.argv[2]), connections=int(sys.argv[3]), "
               "sources=int(sys.argv[4]), seconds=float(sys.argv[5]))))")
    process = subprocess.Popen([sys.executable, "-c", program, base_url, request.hex(), str(connections),
                                str(sources), str(seconds)], cwd=ROOT, stdout=subprocess.PIPE, text=True)

    def result():
        output, _ = process.communicate(timeout=seconds + 60)
        return json.loads(output)
    return result


def look_ups(base_url: str, token: str, seconds: float) -> list[tuple[int, float]]:
    """(status, seconds) of look-ups one after another on one keep-alive connection."""
    answers = []
    with HttpClient(base_url) as http:
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            started = time.monotonic()
            status = http.get("/keys/held-key", headers=bearer(token), timeout=20).status_code
            answers.append((status, time.monotonic() - started))
    return answers


@pytest.fixture
def flooded_kms(request, make_app):
    """A server of 8 threads (2 for unverified work) with its defenses on, and a client holding a
    token and a key."""
    settings = {"PROBE_CACHE": 1000, "SERVER_UNVERIFIED_RATE": 5, **getattr(request, "param", {})}
    app = make_app(SERVER_THREADS=8, LOGIN_MAX_FAILURES_PER_ADDRESS=1_000_000, REQUEST_READ_TIMEOUT=1000, **settings)
    server, base_url = serve_in_thread(app, threads=8)
    with HttpClient(base_url) as http:
        token = AuthActions(http).new_client("token-holder")
        assert http.post("/keys/actions/generate", json={"keyReference": "held-key"},
                         headers=bearer(token)).status_code == 200
        assert http.get("/keys/held-key", headers=bearer(token)).status_code == 200  # its token is now known
    yield app, server, base_url, token
    stop_server(server)


FLOODS = {
    "bad signup tokens": (request_bytes("POST", "/auth/signup", json.dumps(
        {"token": "kms_st_" + "x" * 43, "password": CLIENT_PASSWORD}).encode()), 401),
    "bad bearer tokens": (request_bytes("GET", "/keys/held-key", headers={"Authorization": f"Bearer {FORGED_JWT}"}),
                          401),
    "readiness probes": (request_bytes("GET", "/readyz"), 200),
    "liveness probes": (request_bytes("GET", "/healthz"), 200),
    "metrics scrapes": (request_bytes("GET", "/metrics"), 200),
    "wrong passwords": (request_bytes("POST", "/auth/login", json.dumps(
        {"clientname": ADMIN_NAME, "password": "Wrong-passw0rd!"}).encode()), None),
}


@pytest.mark.parametrize("kind", FLOODS)
def test_a_token_holder_is_served_first_during_a_flood(flooded_kms, kind):
    _, server, base_url, token = flooded_kms
    request, expected = FLOODS[kind]
    flood = flood_in_a_process(base_url, request, connections=150, sources=30, seconds=4)
    time.sleep(1.5)  # the flood is on
    answers = look_ups(base_url, token, 2)
    result = flood()
    statuses = Counter({int(key) if key.isdigit() else key: count for key, count in result["statuses"].items()})
    assert sum(count for key, count in statuses.items() if isinstance(key, int)) > 100, statuses  # it did flood
    if expected is not None:
        assert statuses[expected] > 0, statuses
    # Served throughout, and in good time (bench/bench_floods.py measures how well, beside the same
    # look-ups alone; this test runs on a machine shared with the flood and whatever else runs).
    assert {status for status, _ in answers} == {200}
    assert len(answers) >= 4
    assert statistics.median(seconds for _, seconds in answers) < 1.0, sorted(answers)[-5:]


def test_unverified_work_never_takes_more_than_its_threads(flooded_kms, monkeypatch):
    """While the flood runs, at most SERVER_THREADS // 4 threads work on it."""
    _, server, base_url, token = flooded_kms
    # Every signup reaches the application (as a flood of signups that differ would), none is
    # answered by the event loop as a repeat (kms.serving.early).
    monkeypatch.setattr(server.kms_early, "signup_refused", lambda request: None)
    dispatcher = server.task_dispatcher
    assert isinstance(dispatcher, PriorityDispatcher) and dispatcher.unverified_limit == 2
    flood = flood_in_a_process(base_url, FLOODS["bad signup tokens"][0], connections=100, sources=20, seconds=3)
    most, until = 0, time.monotonic() + 2.5
    time.sleep(0.5)
    while time.monotonic() < until:
        most = max(most, dispatcher.unverified_running)
        time.sleep(0.002)
    flood()
    assert most == 2


class _Task:
    def __init__(self, known: bool, source: str, log: list):
        self.known, self.source, self.log = known, source, log

    def service(self):
        self.log.append((self.known, self.source))
        time.sleep(0.01)

    def cancel(self):
        pass


def test_known_requests_go_first_and_sources_take_turns():
    log = []
    dispatcher = PriorityDispatcher(lambda task: (task.known, task.source, None), unverified_limit=1)
    for _ in range(3):
        dispatcher.add_task(_Task(False, "flooder", log))
    dispatcher.add_task(_Task(False, "other", log))
    dispatcher.add_task(_Task(True, None, log))
    dispatcher.set_thread_count(1)
    deadline = time.monotonic() + 5
    while len(log) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    dispatcher.shutdown()
    assert log == [(True, None), (False, "flooder"), (False, "other"), (False, "flooder"), (False, "flooder")]


def test_idle_sockets_from_one_source_leave_others_served(make_app):
    """A source holds at most its share of connections, and a connection that sends no byte
    within REQUEST_READ_TIMEOUT is closed."""
    app = make_app(SERVER_CONNECTION_LIMIT_PER_SOURCE=50, REQUEST_READ_TIMEOUT=1000)
    server, base_url = serve_in_thread(app, threads=4)
    host, port = base_url.rsplit("/", 1)[1].split(":")
    idle = []
    try:
        for _ in range(300):
            sock = __import__("socket").create_connection((host, int(port)), source_address=("127.0.0.2", 0))
            idle.append(sock)
        time.sleep(0.3)
        assert sum(1 for sock in idle if closed_by_peer(sock)) >= 240  # all but the source's share
        with HttpClient(base_url) as http:  # another source is served at once
            started = time.monotonic()
            assert http.get("/healthz", headers={"Connection": "close"}).status_code == 200
            assert time.monotonic() - started < 0.5
        time.sleep(2.5)  # past REQUEST_READ_TIMEOUT (and a maintenance pass): the silent ones are gone too
        assert all(closed_by_peer(sock) for sock in idle)
    finally:
        for sock in idle:
            sock.close()
        stop_server(server)


def _login(base_url: str, name: str, password: str, source: str = "127.0.0.1") -> int:
    return post_from(base_url, source, "/auth/login", {"clientname": name, "password": password})


def test_a_client_logging_in_before_every_call_is_served_during_a_wrong_password_flood(flooded_kms):
    """The original's Go SDK logs in before every call; a wrong-password flood from other sources
    must not lock it out (its repeated logins need no hash, and the flood's sources are shed)."""
    _, _, base_url, _ = flooded_kms
    flood = flood_in_a_process(base_url, FLOODS["wrong passwords"][0], connections=100, sources=20, seconds=5)
    time.sleep(1)
    statuses = [_login(base_url, "token-holder", CLIENT_PASSWORD) for _ in range(20)]
    flood()
    assert statuses.count(200) >= 16, statuses


def test_repeated_logins_skip_the_hash_until_the_client_changes(flooded_kms, monkeypatch):
    app, _, base_url, _ = flooded_kms
    passwords = app.extensions["kms"].passwords
    hashed = []
    real = passwords.verify_login
    monkeypatch.setattr(passwords, "verify_login", lambda *args, **kwargs: hashed.append(1) or real(*args, **kwargs))
    assert _login(base_url, "token-holder", CLIENT_PASSWORD) == 200
    first = len(hashed)
    for _ in range(5):
        assert _login(base_url, "token-holder", CLIENT_PASSWORD) == 200
    assert len(hashed) == first  # answered from the keyed hash of the credential, no Argon2
    assert _login(base_url, "token-holder", "Wrong-passw0rd!") == 401
    assert len(hashed) == first + 1  # a wrong password always pays the hash
    with HttpClient(base_url) as http:  # a disable and an enable move the epoch: the shortcut ends
        admin = AuthActions(http)
        client_id = admin.client_id("token-holder")
        for action in ("disable", "enable"):
            assert http.post(f"/clients/{client_id}/actions/{action}", headers=bearer(admin.admin_token)
                             ).status_code == 204
    assert _login(base_url, "token-holder", CLIENT_PASSWORD) == 200
    assert len(hashed) == first + 2


def test_repeated_logins_pay_the_hash_when_the_window_is_off(make_app, auth_for, monkeypatch):
    app = make_app(LOGIN_REPEAT_WINDOW=0)
    passwords = app.extensions["kms"].passwords
    hashed = []
    real = passwords.verify_login
    monkeypatch.setattr(passwords, "verify_login", lambda *args, **kwargs: hashed.append(1) or real(*args, **kwargs))

    def log_in_thrice(http, _token):
        name = http.get("/clients", headers=bearer(AuthActions(http).admin_token)).json()["clients"][-1]["clientname"]
        before = len(hashed)
        for _ in range(3):
            assert http.post("/auth/login", json={"clientname": name, "password": CLIENT_PASSWORD}).status_code == 200
        return len(hashed) - before

    assert auth_for(app, log_in_thrice) == 3


@pytest.mark.parametrize("flooded_kms", [{"SERVER_UNVERIFIED_RATE": 0}], indirect=True)  # all 100 reach the route
def test_refusals_cost_no_transaction_each_and_are_written_as_one_event_per_source(flooded_kms, db):
    app, _, base_url, _ = flooded_kms
    kms = app.extensions["kms"]

    def commits() -> int:
        with db.cursor() as cur:
            cur.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
            return cur.fetchone()[0]

    with db.cursor() as cur:
        cur.execute("SELECT pg_stat_clear_snapshot()")
    before = commits()
    body = {"token": "kms_st_" + "y" * 43, "password": CLIENT_PASSWORD}
    with HttpClient(base_url) as http:
        for _ in range(100):  # each on a connection of its own: a refused one is not read again for a second
            assert http.post("/auth/signup", json=body, headers={"Connection": "close"}).status_code == 401
    time.sleep(0.6)  # PostgreSQL's statistics are reported every half second or so
    with db.cursor() as cur:
        cur.execute("SELECT pg_stat_clear_snapshot()")
    assert commits() - before <= 130  # one read each (the token looked up, in autocommit), no write
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM audit_events WHERE action = 'signup' AND outcome = 'denied'")
        assert cur.fetchone()[0] == 0  # counted in memory, written below
    from kms.audit.service import flush_refusals
    from kms.context import Context
    with kms.pool.connection() as conn:
        assert flush_refusals(Context(kms=kms, conn=conn)) == 1
    with db.cursor() as cur:
        cur.execute("SELECT repeats, source_ip, actor FROM audit_events WHERE action = 'signup' AND outcome = 'denied'")
        assert cur.fetchall() == [(100, "127.0.0.1", "anonymous")]


@pytest.mark.parametrize("flooded_kms", [{"SERVER_UNVERIFIED_RATE": 0}], indirect=True)  # all 200 reach the route
def test_probes_answer_from_a_second_old_result(flooded_kms, db):
    _, _, base_url, _ = flooded_kms
    with HttpClient(base_url) as http:
        http.get("/readyz")
        with db.cursor() as cur:
            cur.execute("SELECT pg_stat_clear_snapshot()")
            cur.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
            before = cur.fetchone()[0]
        for _ in range(200):
            assert http.get("/readyz").status_code == 200
        scrapes = {http.get("/metrics").text for _ in range(20)}
    time.sleep(0.6)
    with db.cursor() as cur:
        cur.execute("SELECT pg_stat_clear_snapshot()")
        cur.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
        assert cur.fetchone()[0] - before <= 20  # not 200: one look at the database a second at most
    assert len(scrapes) <= 3  # renderings reused within the second


@pytest.mark.skipif(os.cpu_count() is None, reason="needs os.cpu_count()")
def test_the_go_sdks_pattern_of_a_login_before_every_call_succeeds(flooded_kms):
    """8 threads, each logging in before each look-up, as the original's SDK: no 429."""
    _, _, base_url, _ = flooded_kms
    outcomes = []

    def sdk():
        for _ in range(15):
            status = _login(base_url, "token-holder", CLIENT_PASSWORD)
            outcomes.append(status)

    threads = [threading.Thread(target=sdk) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count(200) == len(outcomes), Counter(outcomes)


def test_a_caller_re_sending_a_bad_token_is_read_once_a_second(flooded_kms):
    """A 401 to a caller nobody knows holds its connection for a second: a bad-token flood
    re-sending at once is answered once a second per connection, not thousands of times."""
    _, _, base_url, _ = flooded_kms
    with HttpClient(base_url) as http:
        started = time.monotonic()
        for _ in range(3):
            assert http.get("/keys/held-key", headers=bearer(FORGED_JWT)).status_code == 401
        held = time.monotonic() - started
    with HttpClient(base_url) as other:
        started = time.monotonic()
        assert other.get("/healthz").status_code == 200
        assert time.monotonic() - started < 0.5  # a new connection is read at once
    assert held >= 1.8  # the second and third waited for the hold


def _raw(base_url: str, method: str, path: str, headers: dict | None = None, version: str = "1.1",
         source: str = "127.0.0.1", body: bytes = b""):
    """One request on a connection of its own: (status, headers, body, whether the server closed it)."""
    host, port = base_url.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10, source_address=(source, 0)) as sock:
        request = request_bytes(method, path, body, headers=headers)
        sock.sendall(request.replace(b" HTTP/1.1\r\n", f" HTTP/{version}\r\n".encode(), 1))
        received = b""
        while b"\r\n\r\n" not in received:
            received += sock.recv(65536)
        head, body = received.split(b"\r\n\r\n", 1)  # (the answer's body from here on)
        lines = head.decode("latin-1").split("\r\n")
        answer_headers = dict(line.split(": ", 1) for line in lines[1:])
        length = 0 if method == "HEAD" else int(answer_headers["Content-Length"])
        while len(body) < length:
            body += sock.recv(65536)
        time.sleep(0.05)
        return int(lines[0].split()[1]), answer_headers, body, closed_by_peer(sock)


class _CountingApp:
    """Stands in for the server's application: how many requests reached it."""

    def __init__(self, app):
        self.app, self.calls = app, 0

    def __call__(self, environ, start_response):
        self.calls += 1
        return self.app(environ, start_response)


def _envelope(body: bytes) -> dict:
    answer = json.loads(body)
    assert answer.pop("requestId")
    return answer


def test_refusals_known_from_the_headers_are_answered_by_the_event_loop_as_the_app_answers(flooded_kms):
    """A token refused once, and tokenless requests over their source's rate, are answered without
    a server thread or Flask: the same status, envelope and headers, Retry-After on the 429, the
    connection held as after the application's answers (kms.serving.early)."""
    _, server, base_url, _ = flooded_kms
    counting = server.application = _CountingApp(server.application)
    forged = bearer(FORGED_JWT)
    status, headers, body, _ = _raw(base_url, "GET", "/keys/held-key", forged)  # refused by the app, remembered
    assert (status, counting.calls) == (401, 1)
    for version in ("1.1", "1.0"):
        again, again_headers, again_body, closed = _raw(base_url, "GET", "/keys/held-key", forged, version=version)
        assert again == 401 and _envelope(again_body) == _envelope(body)
        assert {name for name in again_headers if name != "Connection"} == set(headers)
        assert again_headers["Content-Type"] == "application/json"
        assert closed == (version == "1.0")  # HTTP/1.0 without keep-alive closes, as waitress does
    status, _, body, _ = _raw(base_url, "HEAD", "/keys/held-key", forged)
    assert status == 401 and body == b""
    status, _, _, closed = _raw(base_url, "GET", "/keys/held-key", {**forged, "Connection": "close"})
    assert status == 401 and closed
    assert _raw(base_url, "GET", "/healthz", forged)[0] == 200  # a public route ignores the header
    assert _raw(base_url, "GET", "/no-such-route", forged)[0] == 404
    assert counting.calls == 3  # only those two reached the application

    source = "127.0.9.9"
    statuses = [_raw(base_url, "GET", "/healthz", source=source) for _ in range(15)]  # burst: 2 s worth
    refused = [answer for answer in statuses if answer[0] == 429]
    assert refused and all(status == 200 for status, *_ in statuses[:10])
    assert counting.calls == 3 + 15 - len(refused)
    _, headers, body, closed = refused[0]
    assert headers["Retry-After"] == "1" and not closed
    assert _envelope(body)["error"] == "too_many_requests"

    # The hold: the next request on a refused connection is read only after a second.
    host, port = base_url.rsplit("/", 1)[1].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    started = time.monotonic()
    for _ in range(2):
        connection.request("GET", "/keys/held-key", headers=forged)
        response = connection.getresponse()
        response.read()
        assert response.status == 401
    connection.close()
    assert time.monotonic() - started >= 0.9
    assert counting.calls == 3 + 15 - len(refused)


def test_a_refused_signup_sent_again_is_answered_by_the_event_loop_and_still_audited(flooded_kms, db):
    """The same bad signup again (a flood re-sends one request): the application refused it once,
    the event loop answers the same 401 after that, without the database; each refusal is still
    counted for the audit. Another body still reaches the application."""
    app, server, base_url, _ = flooded_kms
    kms = app.extensions["kms"]
    counting = server.application = _CountingApp(server.application)
    bad = json.dumps({"token": "kms_st_" + "z" * 43, "password": CLIENT_PASSWORD}).encode()
    source = "127.0.9.10"
    first = _raw(base_url, "POST", "/auth/signup", source=source, body=bad)
    assert first[0] == 401 and counting.calls == 1
    kms.refusals.take()
    for _ in range(3):
        again = _raw(base_url, "POST", "/auth/signup", source=source, body=bad)
        assert again[0] == 401 and _envelope(again[2]) == _envelope(first[2]) == {
            "error": "invalid_signup_token", "message": _envelope(first[2])["message"]}
        assert set(again[1]) == set(first[1])
    assert counting.calls == 1
    assert kms.refusals.take() == {("signup", "denied", source): 3}  # audited as the service's refusals
    other = json.dumps({"token": "kms_st_" + "w" * 43, "password": CLIENT_PASSWORD}).encode()
    assert _raw(base_url, "POST", "/auth/signup", source=source, body=other)[0] == 401
    assert counting.calls == 2
    short = json.dumps({"token": "kms_st_" + "z" * 43, "password": "short"}).encode()
    assert _raw(base_url, "POST", "/auth/signup", source=source, body=short)[0] == 400  # the app validates it
