"""waitress, hardened for an edge that strangers can reach.

What waitress does not bound by itself, and what this module adds:
- Slow clients. waitress closes a connection only after `channel_timeout` of silence, so a client
  that sends one header byte every few seconds holds its connection for ever; about a hundred of
  them filled the default connection limit and took the service down. Here a request must arrive
  whole (headers and body) within `REQUEST_READ_TIMEOUT`, the connection limit is sized for
  hundreds of idle sockets, and the event loop uses epoll, which has no 1,024-descriptor ceiling.
- Bodies. waitress buffers up to 1 GiB of a request to disk before the application can say 413;
  here it stops reading at `MAX_BODY_BYTES` and closes the connection.
- Request smuggling. A request with both Content-Length and Transfer-Encoding is refused with 400
  and its connection closed (RFC 9112, section 6.3), so no trailing bytes run as a second request.
- Its own error pages (400, 413, 431, 501) are text; here they are the JSON envelope of API.md.
- Proxy headers are left for the application (werkzeug's ProxyFix, `TRUSTED_PROXY_HOPS`): waitress's
  own clearing removed X-Forwarded-For before ProxyFix could see it.
- Stopping. waitress closes every connection when it stops, and a connection closed with bytes
  still unread is reset (the kernel discards the answers written before); connections not yet
  accepted are reset too. Here a drain takes every connection waiting in the backlog, reads and
  answers every request already received, marks the last answer `Connection: close`, and closes
  each connection by shutting down its sending side first and reading until the client closes
  (a lingering close), so the client reads every answer.
- Floods that ignore Retry-After. After a 429 the connection is not read again until its
  Retry-After has passed (at most HOLD_AFTER_429_MAX_S): a client re-sending at once then waits for
  its next answer, without holding a server thread, instead of being refused hundreds or thousands
  of times a second (the login throttles and the flood shedder in kms.auth).
"""
import heapq
import logging
import math
import resource
import select
import socket
import time
from collections import deque


from waitress.adjustments import Adjustments
from waitress.channel import ClientDisconnected, HTTPChannel
from waitress.parser import HTTPRequestParser, ParsingError
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask, ThreadedTaskDispatcher, WSGITask
from waitress.utilities import build_http_date
from waitress.wasyncore import readwrite

from kms.errors import ApiError
from kms.ids import random_uuid
from kms.serving.dispatch import PriorityDispatcher, SourceCounts, request_classifier
from kms.serving.early import EarlyRefusals
from kms.web import CLAIMS, SIGNUP_TOKEN_REFUSED, UNVERIFIED_SOURCE
from kms.web.envelope import HTTP_CODES, envelope_json
from kms.web.limits import UnverifiedRate

log = logging.getLogger("kms.http")

MAX_HEADER_BYTES = 32 * 1024
IDLE_TIMEOUT_S = 60  # a keep-alive connection with no request in progress
HOLD_AFTER_429_MAX_S = 1.0  # a client sharing the connection for other calls waits no longer
MAINTENANCE_INTERVAL_S = 1  # how often slow requests are looked for
BALANCE_RECHECK_S = 0.02  # how soon a worker kept from accepting by the balance looks again
ACCEPTS_PER_TURN = 64  # connections taken from the backlog per turn of the event loop, at most
LINGER_S = 2.0  # how long a drained connection is read (and what comes discarded) for its client to close

_ERROR_MESSAGES = {
    400: "The request is not valid HTTP/1.1.",
    413: "The request body is too large.",
    431: "The request headers are too large.",
    500: ApiError.message,
    501: "That transfer coding is not supported; send the body with Content-Length or chunked.",
}


class RequestParser(HTTPRequestParser):
    def parse_header(self, header_plus):
        super().parse_header(header_plus)
        # (waitress pops Transfer-Encoding from an HTTP/1.1 request's headers and sets `chunked`)
        if (self.chunked or "TRANSFER_ENCODING" in self.headers) and "CONTENT_LENGTH" in self.headers:
            # Which one frames the body is what smuggling exploits: answer neither.
            raise ParsingError("Content-Length and Transfer-Encoding together")


class JsonErrorTask(ErrorTask):
    """waitress's answer to a request it could not parse, as our JSON envelope; the connection
    is closed after it."""

    def execute(self):
        status = self.request.error.code
        request_id = random_uuid()
        body = envelope_json(HTTP_CODES.get(status, "bad_request"), _ERROR_MESSAGES.get(status, _ERROR_MESSAGES[400]),
                             request_id)
        self.status = f"{status} {self.request.error.reason}"
        self.response_headers.extend([("Content-Type", "application/json"), ("X-Request-ID", request_id)])
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)
        log.info("request refused before the application", extra={"requestId": request_id, "status": status})
        metrics = getattr(self.channel.server, "kms_metrics", None)
        if metrics is not None:
            metrics.observe("<unparsed>", "other", status, 0.0)


class ApplicationTask(WSGITask):
    def get_environment(self):
        environ = super().get_environment()
        claims = getattr(self.request, "kms_claims", None)
        if claims is not None:  # the dispatcher found the bearer token verified already (kms.serving.dispatch)
            environ[CLAIMS] = claims
        else:
            source = getattr(self.request, "kms_unverified_source", None)
            if source is not None:  # ... or found no token this worker knows
                environ[UNVERIFIED_SOURCE] = source
        return environ

    def execute(self):
        super().execute()
        if (self.environ or {}).get(SIGNUP_TOKEN_REFUSED) and getattr(self.request, "kms_signup_key", None) is not None:
            self.channel.server.kms_early.signup_refused(self.request)  # (kms.serving.early)
        if self.status.startswith("429"):
            self.channel.hold_reading(min(_retry_after_s(self.response_headers), HOLD_AFTER_429_MAX_S))
        elif (self.status.startswith("401") and self.channel.server.kms_hold_unknown_refused
              and getattr(self.request, "kms_unverified_source", None) is not None
              and self.request.path != self.channel.server.kms_login_path):
            # A caller nobody knows, refused (a bad token, a bad signup token): one re-sending at once
            # is answered once a second. (A failed login has throttles of its own.)
            self.channel.hold_reading(HOLD_AFTER_429_MAX_S)


    def build_response_header(self):
        channel = self.channel
        if channel.server.kms_draining and not self.close_on_finish and channel.nothing_after(self.request):
            self.set_close_on_finish()  # the server is stopping: this connection's last answer
        return super().build_response_header()


def _retry_after_s(headers) -> float:
    for name, value in headers:
        if name.lower() == "retry-after":
            return float(value) if value.isdigit() else 0.0
    return 0.0


class Channel(HTTPChannel):
    parser_class = RequestParser
    error_task_class = JsonErrorTask
    task_class = ApplicationTask
    request_started = None  # time.time() when the first byte of the request in progress came
    read_again_at = 0.0  # time.monotonic() before which the connection is not read
    spoke = False  # a byte has come on this connection
    counted_source = None  # the source whose open connections count this one

    def __init__(self, server, sock, addr, adj, map=None):
        super().__init__(server, sock, addr, adj, map)
        interest = server._interest
        if interest is not None and self._fileno is not None:
            interest.touched(self._fileno)  # asked what it waits for on the next turn
        limit = server.kms_per_source_limit
        if limit:
            source = addr[0] if isinstance(addr, tuple) else str(addr)
            self.counted_source = source
            if server.kms_sources.opened(source) > limit:  # this source holds its share already
                server.kms_refused_connections += 1
                self.handle_close()

    def del_channel(self, map=None):
        """Every close ends here (waitress's handle_close and close alike)."""
        if self.counted_source is not None:
            self.server.kms_sources.closed(self.counted_source)
            self.counted_source = None
        fd, interest = self._fileno, self.server._interest
        super().del_channel(map)
        if interest is not None and fd is not None:
            interest.forget(fd)  # (before the socket is closed, and its number given to another)

    def service(self):
        """A server thread serves this connection's request (see _Interest)."""
        interest, fd = self.server._interest, self._fileno
        if interest is None or fd is None:
            return super().service()
        interest.serving.add(fd)
        try:
            return super().service()
        finally:
            # waitress woke the loop at the end of service(), after the last change to this
            # connection; until the loop's next turn asks it, it is in `serving` or in `done`.
            interest.done.append(fd)
            interest.serving.discard(fd)

    def answer_early(self, refusal):
        """Answer this connection's first request with `refusal` (kms.serving.early) without a
        server thread: the answer the application would write, then the hold after it. Called
        where waitress hands the request to the dispatcher, holding requests_lock."""
        started = time.perf_counter()
        request = self.requests.pop(0)
        request_id = random_uuid()
        body = envelope_json(refusal.code, refusal.message, request_id)
        connection = request.headers.get("CONNECTION", "").lower()
        if request.version == "1.0":
            close = connection != "keep-alive"
        else:
            close = connection == "close" or (self.server.kms_draining and self.nothing_after(request))
        lines = [f"HTTP/{request.version} {refusal.status}", "Content-Type: application/json",
                 f"Content-Length: {len(body)}"]
        if refusal.retry_after is not None:
            lines.append(f"Retry-After: {refusal.retry_after}")
        lines.append(f"X-Request-Id: {request_id}")  # (as waitress writes header names)
        if close:
            lines.append("Connection: close")
        elif request.version == "1.0":
            lines.append("Connection: Keep-Alive")
        lines += [f"Date: {build_http_date(time.time())}", f"Server: {self.adj.ident}", "", ""]
        answer = "\r\n".join(lines).encode("latin-1") + (b"" if request.command == "HEAD" else body)
        request.close()
        try:
            self.write_soon(answer)
        except ClientDisconnected:
            close = True
        self.last_activity = time.time()
        if close:
            self.close_when_flushed = True
            for pending in self.requests:
                pending.close()
            self.requests = []
        elif refusal.hold_s:
            self.hold_reading(refusal.hold_s)
        self.server.kms_early.answered(refusal, request.command, started)

    def nothing_after(self, request) -> bool:
        """Whether `request` is the last one this connection has sent so far: none queued behind
        it, none half-read, no byte waiting to be read."""
        return self.requests in ([], [request]) and self.request is None and not self.bytes_waiting()

    def bytes_waiting(self) -> bool:
        """Whether the kernel holds bytes from the client that are not read yet (a look, not a read)."""
        try:
            return bool(self.socket.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except OSError:  # nothing waiting (EAGAIN), or the connection is gone
            return False

    def drained(self) -> bool:
        """While stopping: every request received is answered and its answer sent, and nothing
        more is waiting to be read."""
        return (not self.requests and self.request is None and not self.total_outbufs_len
                and not self.bytes_waiting())

    def handle_close(self):
        """Every close of a connection by the server. While the server drains, a lingering one:
        the answers already written reach the client before the connection goes, and bytes it
        sends meanwhile do not reset it (a socket closed with bytes unread is reset, and the
        client's kernel then drops the answers it had not read yet)."""
        kept = None
        if self.server.kms_draining and self.socket is not None:
            try:
                kept = self.socket.dup()  # the connection outlives waitress's close of its socket
            except OSError:
                kept = None
        super().handle_close()
        if kept is not None:
            try:
                kept.shutdown(socket.SHUT_WR)  # the client reads the answers, then end of stream
            except OSError:
                kept.close()
                return
            self.server.linger(kept)

    def hold_reading(self, seconds: float):
        """Read nothing more from this connection for `seconds` (called from a server thread once
        the answer is written, or from the event loop's; the event loop wakes when the hold ends:
        Server.poll)."""
        self.read_again_at = until = time.monotonic() + seconds
        interest, fd = self.server._interest, self._fileno
        if interest is not None and fd is not None:
            interest.hold(fd, self, until)

    def readable(self):
        if self.read_again_at and time.monotonic() < self.read_again_at:
            return False
        return super().readable()

    def received(self, data):
        if data:
            self.spoke = True
        if self.request is None and self.request_started is None and data:
            self.request_started = time.time()
        result = super().received(data)
        if self.request is None:  # nothing half-received: the clock stops
            self.request_started = None
        return result


class _Interest:
    """What the event loop polls each object of its map for, kept between turns.

    wasyncore asks every object on every turn what it waits for (readable(), writable()), and a
    turn comes with almost every request. Here an object is asked again only when what it waits
    for may have changed:
    - when it is opened, and on the turn after an event on it (a request's bytes are read, its
      answer written, a close);
    - on every turn while a server thread serves its request (`serving`; the thread may leave
      output for the loop to send, and waits for it when there is much), and on the turn after
      that thread is done (`done`: it marks the connection before it wakes the loop);
    - once its reading hold ends (kms: after a 429, or a refused unknown caller): a held connection
      is polled for nothing and asked nothing meanwhile (`held`, a heap by time);
    - every object after maintenance (once a second).
    An idle keep-alive connection waiting for its next request, one whose request waits for a
    free server thread, and a held one are not asked: nothing but an event, a server thread or the
    clock changes them. Objects other than connections (the listening socket, the trigger) are
    asked on every turn. The poll object is epoll where there is one: its cost per turn is the
    connections with an event, not every open connection (hundreds of idle or held ones in a
    flood)."""

    def __init__(self):
        self.epoll = hasattr(select, "epoll")
        self.pollster = select.epoll() if self.epoll else select.poll()
        self.registered: dict = {}  # fd -> (object, flags)
        self.ask_next: set = set()  # fds to ask on the next turn
        self.always: dict = {}  # fd -> object, asked on every turn
        self.serving: set = set()  # fds whose request a server thread is serving (added there)
        self.done: deque = deque()  # fds whose request a server thread finished (appended there)
        self.newly_held: deque = deque()  # (until, fd, object) appended by whoever holds it
        self.held: list = []  # heap of (until, sequence, fd, object)
        self._held_sequence = 0
        self.ask_all = True

    def to_ask(self, socket_map: dict) -> list:
        newly_held, held = self.newly_held, self.held
        while newly_held:
            until, fd, obj = newly_held.popleft()
            self._held_sequence += 1
            heapq.heappush(held, (until, self._held_sequence, fd, obj))
        if held and held[0][0] <= time.monotonic():
            now = time.monotonic()
            while held and held[0][0] <= now:
                _until, _sequence, fd, obj = heapq.heappop(held)
                if socket_map.get(fd) is obj:
                    self.ask_next.add(fd)
        if self.ask_all:
            self.ask_all = False
            for fd in [fd for fd, (obj, _) in self.registered.items() if socket_map.get(fd) is not obj]:
                self.forget(fd)  # closed (its number may already name a new connection)
            self.always = {fd: obj for fd, obj in socket_map.items() if not isinstance(obj, Channel)}
            self.ask_next.clear()
            return list(socket_map.items())
        wanted = self.ask_next
        self.ask_next = set()
        wanted.update(list(self.serving))  # (list(): copied in one step, while server threads change it)
        done = self.done
        while done:
            wanted.add(done.popleft())
        asked = list(self.always.items())
        for fd in wanted:
            obj = socket_map.get(fd)
            if obj is not None and fd not in self.always:
                asked.append((fd, obj))
        return asked

    def next_hold_end(self) -> float:
        return self.held[0][0] if self.held else math.inf

    def hold(self, fd: int, obj, until: float):
        self.newly_held.append((until, fd, obj))

    def set(self, fd: int, obj, flags: int):
        known = self.registered.get(fd)
        if known is None or known[0] is not obj or known[1] != flags:
            if flags:
                if self.epoll:
                    try:
                        self.pollster.register(fd, flags)
                    except FileExistsError:
                        self.pollster.modify(fd, flags)
                else:
                    self.pollster.register(fd, flags)  # (or modify)
                self.registered[fd] = (obj, flags)
            else:
                self.forget(fd)

    def touched(self, fd: int):
        self.ask_next.add(fd)

    def forget(self, fd: int):
        if self.registered.pop(fd, None) is not None:
            try:
                self.pollster.unregister(fd)
            except (KeyError, ValueError, OSError):
                pass

    def wait(self, timeout: float) -> list:
        if self.epoll:
            return self.pollster.poll(timeout)
        return self.pollster.poll(math.ceil(timeout * 1000))


class Server(TcpWSGIServer):
    channel_class = Channel
    read_timeout_s = 10.0
    kms_metrics = None
    kms_per_source_limit = 0  # open connections one source may hold (0: no limit)
    kms_login_path = "/auth/login"  # read off the app's URL map in create_server
    kms_hold_unknown_refused = True  # hold a refused unknown caller's connection (SERVER_UNVERIFIED_RATE > 0)
    kms_refused_connections = 0
    kms_draining = False  # stopping: see drain_step()
    # Workers sharing one listening socket: (shared array of each worker's open connections, this
    # worker's slot). See readable().
    kms_balance = None
    _wake_at = math.inf  # when the event loop must look again, though nothing happens (poll)
    _interest = None  # what the event loop polls each connection for (poll)

    def wake_by(self, when: float):
        """Called while the loop asks who is readable: poll no longer than until `when`."""
        self._wake_at = min(self._wake_at, when)

    def poll(self, longest: float):
        """One turn of the event loop: wasyncore.poll2, except that
        - it sleeps no longer than until the first held connection may be read again, or, while the balance
          keeps this worker from accepting, BALANCE_RECHECK_S. With a fixed timeout, an idle worker
          that had stopped accepting slept through the other worker's connections filling up, and a
          new connection waited in the backlog that long (most visibly during a login flood, whose
          held connections are idle);
        - it asks a connection what it waits for (readable, writable) only when that may have
          changed, and keeps one poll object registered across turns (see _Interest). wasyncore
          asks every connection on every turn, and a turn comes with almost every request: with 64
          keep-alive connections that was an eighth of a worker's CPU; during a flood whose
          connections are held after their refusals, a fifth of the worker's time under the GIL
          went to asking held connections and polling them."""
        self._wake_at = math.inf
        interest = self._interest
        if interest is None:
            interest = self._interest = _Interest()
        for fd, obj in interest.to_ask(self._map):
            flags = 0
            if obj.readable():
                flags |= select.POLLIN | select.POLLPRI
            if obj.writable() and not obj.accepting:  # (accepting sockets are not writable)
                flags |= select.POLLOUT
            interest.set(fd, obj, flags)
        timeout = max(0.0, min(longest, self._wake_at - time.monotonic(),
                               interest.next_hold_end() - time.monotonic()))
        for fd, flags in interest.wait(timeout):
            obj = self._map.get(fd)
            if obj is not None:
                interest.touched(fd)
                readwrite(obj, flags)

    def changed_connections(self):
        """Maintenance may have changed any connection: the next turn asks every one of them again."""
        if self._interest is not None:
            self._interest.ask_all = True

    def readable(self):
        """Whether to accept now. Alone, as waitress decides. As one of several workers on one
        socket, only while this worker holds no more connections than the least loaded one (plus
        one): the kernel would otherwise hand a burst of keep-alive connections to whichever worker
        polls first, and one GIL would serve most of them while the other worker idled."""
        accepting = super().readable()
        if self.kms_balance is None or not accepting:
            return accepting
        counts, slot = self.kms_balance
        mine = counts[slot] = len(self.active_channels)
        if mine <= min(counts) + 1:
            return True
        self.wake_by(time.monotonic() + BALANCE_RECHECK_S)  # the others' counts change unseen
        return False

    def handle_accept(self):
        """Take every connection waiting (up to ACCEPTS_PER_TURN), while the connection limit and
        the balance allow, instead of waitress's one per turn of the event loop: under load a turn
        waits for the GIL, and 64 connections opened at once beside 16 busy ones waited up to
        1.1 s (p50 0.42 s) for their turn to be accepted."""
        for _ in range(ACCEPTS_PER_TURN):
            open_before = len(self._map)
            super().handle_accept()
            if len(self._map) == open_before or not self.readable():  # none left, or no more now
                return

    def start_draining(self) -> int:
        """Stop accepting, and take every connection already waiting in the backlog (their requests
        may be there whole: closing the listening socket would reset them). How many were taken."""
        self.kms_draining = True
        self.accepting = False
        self.kms_lingering = []
        taken = 0
        while True:
            try:
                accepted = self.accept()
            except OSError:
                continue
            if accepted is None:
                return taken
            conn, addr = accepted
            try:
                self.set_socket_options(conn)
            except OSError:
                conn.close()
                continue
            self.channel_class(self, conn, self.fix_addr(addr), self.adj, map=self._map)
            taken += 1

    def linger(self, sock: socket.socket):
        sock.setblocking(False)
        self.kms_lingering.append((sock, time.monotonic() + LINGER_S))

    def drain_step(self) -> bool:
        """One turn of the drain: read, run and answer what connections have sent, close those that
        are done. True while some connection is still open."""
        self.poll(0.05)
        for channel in list(self.active_channels.values()):
            if channel.drained():
                channel.handle_close()  # (our close(): a lingering one)
        now, still = time.monotonic(), []
        for sock, until in self.kms_lingering:
            try:
                while sock.recv(65536):  # what the client sent after its answers: discarded
                    pass
                sock.close()  # the client closed its side
            except BlockingIOError:
                if now < until:
                    still.append((sock, until))
                else:
                    sock.close()
            except OSError:
                sock.close()
        self.kms_lingering = still
        return bool(self.active_channels or still)

    def close_lingering(self):
        for sock, _until in self.kms_lingering:
            sock.close()
        self.kms_lingering = []

    def maintenance(self, now):
        """waitress closes connections idle past IDLE_TIMEOUT_S; here also one whose request has
        not arrived whole within REQUEST_READ_TIMEOUT, and one that has not sent a byte within it
        (idle sockets must not fill the house)."""
        super().maintenance(now)
        self.changed_connections()  # (once a second: every connection is asked again)
        cutoff = now - self.read_timeout_s
        for channel in list(self.active_channels.values()):
            started = channel.request_started
            if channel.requests:
                continue
            if (started is not None and started < cutoff) or (not channel.spoke and channel.creation_time < cutoff):
                channel.will_close = True


def _allow_descriptors(connection_limit: int):
    """epoll has no descriptor ceiling, the process limit does: raise the soft limit if needed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connection_limit + 256  # database connections, logs, the listening socket
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new_soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))


def create_server(app, settings, *, host: str | None = None, port: int | None = None,
                  threads: int | None = None, sock: socket.socket | None = None, map: dict | None = None,
                  balance=None) -> Server:
    """A waitress server for `app` with the limits of `settings`; it listens at once (on `sock`
    when given, already bound). `balance`: see Server.readable."""
    if sock is not None:
        listen = {"sockets": [sock]}
    else:
        listen = {"host": settings.server_host if host is None else host,
                  "port": settings.server_port if port is None else port}
    adj = Adjustments(
        **listen,
        threads=threads or settings.server_threads,
        ident="kms",
        clear_untrusted_proxy_headers=False,  # see the module's docstring
        connection_limit=settings.connection_limit,
        channel_timeout=IDLE_TIMEOUT_S,
        cleanup_interval=MAINTENANCE_INTERVAL_S,
        max_request_header_size=MAX_HEADER_BYTES,
        max_request_body_size=settings.max_body_bytes + 1,  # waitress refuses at >=; Flask allows ==
        asyncore_use_poll=True,
    )
    _allow_descriptors(adj.connection_limit)
    kms = getattr(app, "extensions", {}).get("kms")
    early = None
    if kms is not None:
        unverified = settings.server_unverified_threads or max(1, adj.threads // 4)
        if "kms.observer" in app.extensions:  # (the whole application, not a test's bare one)
            # The rate is per source address across the server: each of its workers allows its
            # part (a source's connections are spread over the workers by the balance).
            rate = settings.server_unverified_rate / (len(balance[0]) if balance is not None else 1)
            early = EarlyRefusals(app, kms, UnverifiedRate(rate) if rate else None,
                                  hold_unknown_refused=settings.server_unverified_rate > 0)
        dispatcher = PriorityDispatcher(request_classifier(kms, settings.trusted_proxy_hops, early),
                                        min(unverified, adj.threads))
    else:
        dispatcher = ThreadedTaskDispatcher()
    dispatcher.set_thread_count(adj.threads)
    server = Server(app, {} if map is None else map, True, sock, dispatcher=dispatcher, adj=adj,
                    **({"bind_socket": False, "sockinfo": (sock.family, sock.type, sock.proto, sock.getsockname())}
                       if sock is not None else {}))
    server.read_timeout_s = settings.request_read_timeout_ms / 1000
    server.kms_balance = balance
    server.kms_early = early
    server.kms_metrics = kms.metrics if kms is not None else None
    server.kms_sources = SourceCounts()
    server.kms_hold_unknown_refused = settings.server_unverified_rate > 0
    url_map = getattr(app, "url_map", None)
    if url_map is not None and "auth.login" in url_map._rules_by_endpoint:
        server.kms_login_path = next(url_map.iter_rules("auth.login")).rule
    # Behind a proxy every connection comes from the proxy: the proxy limits connections per client.
    server.kms_per_source_limit = 0 if settings.trusted_proxy_hops else settings.connection_limit_per_source
    return server
