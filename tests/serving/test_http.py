"""The HTTP server (kms.serving.http) under attack: slow clients, connections arriving at once, huge
bodies and headers, smuggling, a guesser that ignores Retry-After, and a real proxy hop in front.
Each test performs the attack and checks what the caller and the operator see. (Hostile JSON:
tests/test_api.py; parallel guesses: tests/auth; floods of refusals: tests/audit.)"""
import http.client
import json
import socket
import socketserver
import threading
import time

import pytest

from tests.conftest import (ADMIN_NAME, ADMIN_PASSWORD, WRONG_PASSWORD as WRONG, HttpClient, closed_by_peer, serve_in_thread,
                            stop_server)


# TRUSTED_PROXY_HOPS through a real proxy hop

class ForwardingProxy(socketserver.ThreadingTCPServer):
    """A minimal reverse proxy, as haproxy or nginx would be: one request per connection, the
    caller's address appended to X-Forwarded-For, everything else passed through."""
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, backend_port: int):
        self.backend_port = backend_port
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        # shutdown() waits for the loop to look again: every 50 ms, not the default 500 ms
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()


class _ProxyHandler(socketserver.StreamRequestHandler):
    def handle(self):
        request_line = self.rfile.readline()
        headers, length = [], 0
        while (line := self.rfile.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
            if name.lower() in ("connection", "x-forwarded-for"):
                if name.lower() == "x-forwarded-for":
                    headers.append(("X-Forwarded-For", value.strip()))
                continue
            headers.append((name, value.strip()))
        body = self.rfile.read(length) if length else b""
        forwarded = [v for n, v in headers if n == "X-Forwarded-For"]
        headers = [(n, v) for n, v in headers if n != "X-Forwarded-For"]
        chain = ", ".join(forwarded + [self.client_address[0]])
        headers += [("X-Forwarded-For", chain), ("Connection", "close")]
        with socket.create_connection(("127.0.0.1", self.server.backend_port)) as backend:
            backend.sendall(request_line + "".join(f"{n}: {v}\r\n" for n, v in headers).encode("latin-1")
                            + b"\r\n" + body)
            while chunk := backend.recv(65536):
                self.wfile.write(chunk)


def via_proxy(proxy_port, method, path, body=None, headers=None, source="127.0.0.2"):
    """A request from `source` (a loopback address of its own) through the proxy."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=30, source_address=(source, 0))
    try:
        data = json.dumps(body).encode() if body is not None else None
        all_headers = {**({"Content-Type": "application/json"} if body is not None else {}), **(headers or {})}
        conn.request(method, path, body=data, headers=all_headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.fixture
def proxied(make_app):
    started = []

    def start(**settings):
        app = make_app(**settings)
        server, base_url = serve_in_thread(app, threads=4)
        proxy = ForwardingProxy(server.effective_port)
        started.append((server, proxy))
        return app, proxy.server_address[1]

    yield start
    for server, proxy in started:
        proxy.shutdown()
        proxy.server_close()
        stop_server(server)


def _login_source_ips(db):
    with db.cursor() as cur:
        cur.execute("SELECT DISTINCT source_ip FROM audit_events WHERE action = 'login'")
        return {row[0] for row in cur.fetchall()}


def test_with_one_trusted_hop_audit_and_throttle_see_the_callers_address(proxied, db):
    _, port = proxied(TRUSTED_PROXY_HOPS=1, LOGIN_MAX_FAILURES_PER_ADDRESS=3)
    # A forged X-Forwarded-For is kept, but the hop we trust names the real caller.
    forged = {"X-Forwarded-For": "203.0.113.9"}
    for i in range(3):
        status, _ = via_proxy(port, "POST", "/auth/login", {"clientname": f"ghost-{i}-svc", "password": WRONG},
                              headers=forged, source="127.0.0.2")
        assert status == 401
    assert _login_source_ips(db) == {"127.0.0.2"}
    status, _ = via_proxy(port, "POST", "/auth/login", {"clientname": ADMIN_NAME, "password": ADMIN_PASSWORD},
                          source="127.0.0.2")
    assert status == 429  # this caller is throttled ...
    status, _ = via_proxy(port, "POST", "/auth/login", {"clientname": ADMIN_NAME, "password": ADMIN_PASSWORD},
                          source="127.0.0.3")
    assert status == 200  # ... and another caller behind the same proxy is not
    with db.cursor() as cur:
        cur.execute("SELECT source_ip FROM audit_events WHERE action = 'login' AND outcome = 'success'")
        assert cur.fetchone()[0] == "127.0.0.3"


def test_without_trusted_hops_a_forged_header_changes_nothing(proxied, db):
    _, port = proxied(TRUSTED_PROXY_HOPS=0)
    status, _ = via_proxy(port, "POST", "/auth/login", {"clientname": "ghost-svc", "password": WRONG},
                          headers={"X-Forwarded-For": "203.0.113.9"}, source="127.0.0.2")
    assert status == 401
    assert _login_source_ips(db) == {"127.0.0.1"}  # the proxy's address, the only one we can know


# Slow clients

def test_hundreds_of_slow_clients_do_not_stop_normal_requests(make_app):
    app = make_app(REQUEST_READ_TIMEOUT=3000, SERVER_CONNECTION_LIMIT_PER_SOURCE=1000)  # all from one address
    server, base_url = serve_in_thread(app, threads=4)
    port = server.effective_port
    slow = []
    try:
        for _ in range(300):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            slow.append(sock)
        with HttpClient(base_url) as http:
            for _ in range(5):
                started = time.monotonic()
                assert http.get("/healthz", timeout=5).status_code == 200
                assert time.monotonic() - started < 2
            time.sleep(0.5)
            for sock in slow:  # a header line now and then keeps waitress's idle timer happy
                sock.sendall(b"X-Slow: 1\r\n")
            # After the read timeout every one of them has been closed.
            deadline = time.monotonic() + 10
            open_left = len(slow)
            while open_left and time.monotonic() < deadline:
                time.sleep(0.5)
                open_left = sum(1 for sock in slow if not closed_by_peer(sock))
            assert open_left == 0
            assert http.get("/healthz", timeout=5).status_code == 200
    finally:
        for sock in slow:
            sock.close()
        stop_server(server)


def test_connections_opened_at_once_are_all_taken_in_a_turn_or_two_of_the_event_loop(app):
    """waitress accepts one connection per turn of its event loop, and under load each turn waits
    for the GIL: 64 connections opened at once beside 16 busy ones waited up to 1.1 s to be
    accepted. The server takes every waiting connection in one turn (kms.serving.http)."""
    server, _ = serve_in_thread(app)
    turns, paused, resume = [0], threading.Event(), threading.Event()
    poll = server.poll

    def counted_poll(longest):
        if not resume.is_set():  # the loop waits while the connections pile up in the backlog
            paused.set()
            resume.wait(10)
        turns[0] += 1
        return poll(longest)

    server.poll = counted_poll
    waiting = []
    try:
        assert paused.wait(5)
        waiting = [socket.create_connection(("127.0.0.1", server.effective_port)) for _ in range(64)]
        resume.set()
        deadline = time.monotonic() + 10
        while len(server.active_channels) < 64 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert len(server.active_channels) == 64
        assert turns[0] <= 3, f"{turns[0]} turns of the loop to accept 64 waiting connections"
    finally:
        resume.set()
        for sock in waiting:
            sock.close()
        stop_server(server)


# Bodies over the limit are refused before they are read

def _raw_exchange(port, payload: bytes, more: bytes = b"", more_times: int = 0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        try:
            for _ in range(more_times):
                sock.sendall(more)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server stopped reading: what we want
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
        return received


def test_a_huge_declared_body_is_refused_at_once_with_the_envelope(live_server, app):
    port = int(live_server.rsplit(":", 1)[1])
    started = time.monotonic()
    answer = _raw_exchange(port, b"POST /auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: 200000000\r\n\r\n", b"x" * 65536, more_times=4)
    assert answer.startswith(b"HTTP/1.1 413 ")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"application/json" in head and b"x-request-id" in head.lower()
    assert json.loads(body)["error"] == "payload_too_large"
    assert time.monotonic() - started < 5


def test_a_chunked_body_over_the_limit_is_refused(live_server):
    port = int(live_server.rsplit(":", 1)[1])
    chunk = b"%x\r\n%s\r\n" % (32768, b"x" * 32768)
    answer = _raw_exchange(port, b"POST /auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n", chunk, more_times=40)  # 1.25 MiB
    assert answer.startswith(b"HTTP/1.1 413 ")


def test_oversized_headers_are_a_431_envelope(live_server):
    port = int(live_server.rsplit(":", 1)[1])
    answer = _raw_exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n")
    assert answer.startswith((b"HTTP/1.1 431 ", b"HTTP/1.0 431 "))
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"] == "request_header_fields_too_large"


# Request smuggling

def test_content_length_with_transfer_encoding_is_400_and_nothing_runs_after_it(live_server):
    port = int(live_server.rsplit(":", 1)[1])
    smuggled = (b"POST /auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"0\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = _raw_exchange(port, smuggled)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert answer.count(b"HTTP/1.1 ") == 1  # the connection was closed: no second response
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"] == "bad_request"


# A client that ignores Retry-After

def resend_login_at_once(base_url: str, body: str, seconds: float = 3.0) -> tuple[list, float]:
    """A client that ignores Retry-After: POST /auth/login with `body` on one keep-alive
    connection, again the moment each answer comes, for `seconds`. Returns its answers as
    (time, status, Retry-After) and how long a new connection waited for /healthz right after the
    first answer."""
    host, port = base_url.rsplit("/", 1)[1].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    answers, other_waited = [], None
    try:
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            connection.request("POST", "/auth/login", body=body, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            answers.append((time.monotonic(), response.status, response.headers.get("Retry-After")))
            if other_waited is None:
                with HttpClient(base_url) as other:
                    asked = time.monotonic()
                    assert other.get("/healthz").status_code == 200
                    other_waited = time.monotonic() - asked
    finally:
        connection.close()
    return answers, other_waited


def gaps_between(answers: list) -> list[float]:
    return [later[0] - earlier[0] for earlier, later in zip(answers, answers[1:])]


def test_a_guesser_that_ignores_retry_after_is_read_once_a_second(live_server):
    """A throttled guesser re-sending at once on its connection gets one answer a second (the
    hold is capped at a second, whatever Retry-After says), not hundreds; no server thread waits
    with it, and other connections are served at once. The server holds the connection of every
    429 it sends, reading the hold off the answer's Retry-After: a login flood's refusals
    (Retry-After: 1, kms.auth.passwords) are held the same way."""
    body = json.dumps({"clientname": ADMIN_NAME, "password": WRONG})
    with HttpClient(live_server) as fresh:
        while fresh.post("/auth/login", data=body, headers={"Content-Type": "application/json",
                                                            "Connection": "close"}).status_code != 429:
            pass
    answers, other_waited = resend_login_at_once(live_server, body)
    assert all(status == 429 and int(retry_after) > 1 for _, status, retry_after in answers)
    assert 2 <= len(answers) <= 4, gaps_between(answers)  # without the hold: hundreds in 3 s
    assert all(0.9 <= gap < 1.6 for gap in gaps_between(answers)), gaps_between(answers)
    assert other_waited < 0.5


# The event loop asks a connection what it waits for only when that may have changed

def _request(sock, path: str = "/healthz") -> bytes:
    """One keep-alive request on `sock`; its whole answer (headers and a Content-Length body)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536)
    head, _, body = received.partition(b"\r\n\r\n")
    length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_idle_keep_alive_connections_are_not_asked_on_every_turn_and_all_are_served(make_app):
    """Idle keep-alive connections stay registered for reading between turns instead of being asked
    on each one (kms.serving.http._Interest); every one of them is still served when it speaks
    again, more of them than server threads, in any order."""
    app = make_app(SERVER_CONNECTION_LIMIT_PER_SOURCE=1000)
    server, _ = serve_in_thread(app, threads=2)
    port = server.effective_port
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(40)]
    busy = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        for sock in idle:
            assert _request(sock).startswith(b"HTTP/1.1 200")
        time.sleep(0.2)
        asked = [0]
        channels = [channel for channel in server.active_channels.values()]
        for channel in channels:
            readable = channel.readable

            def counted(readable=readable):
                asked[0] += 1
                return readable()
            channel.readable = counted
        for _ in range(30):  # 30 requests, each a turn or two of the loop, while 40 connections idle
            assert _request(busy).startswith(b"HTTP/1.1 200")
        # Asked: the busy connection on its turns, and every connection once per second of
        # maintenance; asking all of them on every turn would be 40 x 30 at least.
        assert asked[0] < 300, f"{asked[0]} questions to connections for 30 requests"
        for sock in reversed(idle):  # every idle one is served again
            assert _request(sock).startswith(b"HTTP/1.1 200")
        for sock in idle[:10]:  # several at once, more than the two server threads
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        for sock in idle[:10]:
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 200")
    finally:
        for sock in idle + [busy]:
            sock.close()
        stop_server(server)


def test_an_answer_a_slow_reader_cannot_take_at_once_is_sent_whole(live_server, app):
    """An answer larger than the socket takes at once stays with the event loop, which sends the
    rest as the client reads (the server thread has moved on): it must be asked to write."""
    port = int(live_server.rsplit(":", 1)[1])
    with app.test_client() as local:
        expected = local.get("/openapi.json").data
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    try:
        sock.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.5)  # the server thread writes what fits and finishes
        answer = _request_rest(sock)
        assert answer.startswith(b"HTTP/1.1 200")
        assert answer.partition(b"\r\n\r\n")[2] == expected
        assert _request(sock).startswith(b"HTTP/1.1 200")  # and the connection goes on
    finally:
        sock.close()


def _request_rest(sock) -> bytes:
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(1024)
        time.sleep(0.001)
    head, _, body = received.partition(b"\r\n\r\n")
    length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        body += sock.recv(1024)
        time.sleep(0.001)
    return head + b"\r\n\r\n" + body
