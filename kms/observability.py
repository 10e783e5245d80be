"""Request ids, one JSON log line per request, Prometheus metrics.

Log lines name the route template (`/keys/<ref>`), never the raw path: a raw path carries the
key reference. Bodies and headers are never logged.
"""
import json
import logging
import os
import re
import sys
import threading
import time
import weakref
from collections import deque

from flask import Response, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily

from kms.ids import random_uuid

log = logging.getLogger("kms")

_STANDARD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line. Exception text is deliberately dropped: it may quote data."""

    _encoder = json.JSONEncoder(default=str)  # json.dumps(default=...) would build one per line

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            # 2026-12-01T07:34:29.123+00:00; strftime costs half of datetime's isoformat
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}+00:00",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            entry["exception"] = record.exc_info[0].__name__
        return self._encoder.encode(entry)


class BatchingHandler(logging.Handler):
    """Appends records to a deque; one timer thread formats and writes them in batches.

    Measured on this service with 64 connections: a plain StreamHandler made request threads queue
    on its lock (each hand-off also waits for the GIL) and cut /healthz from 1,400 to 60 req/s; a
    background thread woken per record cost every request about 0.5 ms of GIL hand-offs. Appending
    to a deque takes no lock, and the writer wakes a few times a second. Formatting a batch in a
    row, rather than one record in each request, keeps the formatter's code in the CPU's caches.
    A record is formatted when it is written, up to `interval` later: log constant messages with
    values in `extra` (as this service does), not mutable objects as arguments.
    """

    def __init__(self, stream, interval: float = 0.25, max_pending: int = 100_000):
        super().__init__()
        self.stream = getattr(stream, "buffer", stream)  # bytes go straight to the file
        self.interval = interval
        self._pending: deque = deque(maxlen=max_pending)
        self._write_lock = threading.Lock()
        self._stopped = threading.Event()
        self._start_writer()
        _open_handlers.add(self)

    def _start_writer(self):
        self._writer = threading.Thread(target=self._write_periodically, name="log-writer", daemon=True)
        self._writer.start()

    def _after_fork_in_child(self):
        # A forked worker has no writer thread; what was pending is the parent's to write.
        self._pending.clear()
        self._write_lock = threading.Lock()
        self._stopped = threading.Event()
        self._start_writer()

    def handle(self, record) -> bool:
        # No handler lock: deque.append is atomic.
        if self.filter(record):
            self.emit(record)
            return True
        return False

    def emit(self, record):
        self._pending.append(record)

    def flush(self):
        with self._write_lock:
            lines = []
            while self._pending:
                record = self._pending.popleft()
                try:
                    lines.append(self.format(record))
                except Exception:  # noqa: BLE001 - one bad record must not lose the batch
                    self.handleError(record)
            if lines:
                # One write for the batch: a line-buffered text stream (stderr is one) would make
                # a syscall per line, each giving up the GIL and queueing to get it back.
                self.stream.write(("\n".join(lines) + "\n").encode())
                self.stream.flush()

    def _write_periodically(self):
        while not self._stopped.wait(self.interval):
            try:
                self.flush()
            except (OSError, ValueError):
                pass

    def close(self):
        self._stopped.set()
        self.flush()
        super().close()


_open_handlers: "weakref.WeakSet[BatchingHandler]" = weakref.WeakSet()


def _before_fork():
    for handler in list(_open_handlers):
        handler._write_lock.acquire()  # no batch half-written across the fork


def _after_fork_in_parent():
    for handler in list(_open_handlers):
        handler._write_lock.release()


def _after_fork_in_child():
    for handler in list(_open_handlers):
        handler._after_fork_in_child()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)


class _DropRawPaths(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and "while serving" in record.msg:
            record.msg, record.args = record.msg.split(" %s")[0], ()
        return True


def configure_logging(level: str = "INFO", stream=None) -> logging.Handler:
    """JSON lines on stderr, written in batches (see BatchingHandler)."""
    handler = BatchingHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        if isinstance(existing, BatchingHandler):
            root.removeHandler(existing)
            existing.close()
    root.addHandler(handler)
    root.setLevel(level)
    # The logging HOWTO's optimisations: no caller lookup, thread or process names per record.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    # waitress logs the request line of a failed request; keep its own log terse.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    # and it names the raw path (which carries a key reference) when a client disconnects or a
    # request fails: keep the message, drop the path.
    waitress_log = logging.getLogger("waitress")
    if not any(isinstance(f, _DropRawPaths) for f in waitress_log.filters):
        waitress_log.addFilter(_DropRawPaths())
    return handler


KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# Route template -> the key operation it performs, for kms_key_operations_total.
KEY_OPERATIONS = {
    ("/keys/actions/generate", "POST"): "generate",
    ("/keys/<ref>", "GET"): "lookup",
    ("/keys/<ref>/<version>", "GET"): "lookup",
    ("/keys/<ref>/actions/rotate", "POST"): "rotate",
    ("/keys/<ref>/actions/retire", "POST"): "retire",
    ("/keys/<ref>/actions/set-rotation-period", "POST"): "set_rotation_period",
    ("/keys/<ref>/actions/delete", "DELETE"): "delete",
    ("/keys/<ref>/actions/restore", "POST"): "restore",
    ("/keys/<ref>/versions", "GET"): "list_versions",
    ("/keys", "GET"): "list",
}
OUTCOMES = {200: "success", 201: "success", 204: "success", 400: "invalid", 401: "unauthenticated",
            403: "forbidden", 404: "not_found", 409: "conflict", 410: "retired", 413: "invalid", 415: "invalid",
            429: "throttled", 503: "unavailable"}


def outcome(status: int) -> str:
    return OUTCOMES.get(status, "error" if status >= 500 else "invalid")


def use_multiprocess_metrics():
    """In a worker process, before any metric exists: values live in files under
    PROMETHEUS_MULTIPROC_DIR (set by the parent), which any worker's /metrics sums."""
    from prometheus_client import values
    values.ValueClass = values.get_value_class()


class Metrics:
    """Process metrics, and in a server with several workers the sum over all of them (counters of
    workers that died included: prometheus-client's multiprocess mode)."""

    def __init__(self):
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("kms_http_requests", "HTTP requests by route template, method and status",
                                ["route", "method", "status"], registry=registry)
        self.latency = Histogram("kms_http_request_duration_seconds", "HTTP request latency by route template",
                                 ["route", "method"], registry=registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.logins = Counter("kms_logins", "Logins by outcome (throttled: refused with 429 in a flood or "
                              "after too many failures)", ["outcome"], registry=registry)
        self.key_operations = Counter("kms_key_operations", "Key operations by action and outcome",
                                      ["action", "outcome"], registry=registry)
        self.integrity_failures = Counter("kms_integrity_failures", "Stored rows refused for a failed MAC check",
                                          ["table"], registry=registry)
        self.pool_size = Gauge("kms_db_pool_connections", "Database connections the pools may hold",
                               registry=registry, multiprocess_mode="livesum")
        self.pool_in_use = Gauge("kms_db_pool_connections_in_use", "Database connections lent to requests",
                                 registry=registry, multiprocess_mode="livesum")
        self.pool_waiting = Gauge("kms_db_pool_waiting", "Requests waiting for a database connection",
                                  registry=registry, multiprocess_mode="livesum")
        self.audit_head_position = Gauge("kms_audit_chain_head_position", "Position of the audit chain's head",
                                         registry=registry, multiprocess_mode="max")
        self.audit_chain_tampered = Gauge("kms_audit_chain_tampered", "1 once the sealer found the chain tampered with",
                                          registry=registry, multiprocess_mode="max")
        self._head: dict | None = None
        self._collectors: list = []
        self._children: dict = {}

    def observe(self, route: str, method: str, status: int, seconds: float):
        # Labels come from closed sets (route templates, known methods, statuses the server
        # writes): a caller inventing methods or paths must not grow memory or /metrics.
        if method not in KNOWN_METHODS:
            method = "other"
        # labels() takes a lock and builds a key on every call; remember the children instead.
        key = (route, method, status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = self._children_for(route, method, status)
        for counter in children[1:]:
            counter.inc()
        children[0].observe(seconds)

    def _children_for(self, route: str, method: str, status: int) -> tuple:
        children = [self.latency.labels(route, method), self.requests.labels(route, method, str(status))]
        if route == "/auth/login":
            children.append(self.logins.labels(outcome(status)))
        action = KEY_OPERATIONS.get((route, method))
        if action:
            children.append(self.key_operations.labels(action, outcome(status)))
        return tuple(children)

    def publish_audit_head(self, position: int, mac: str):
        """The sealer's newest head, for whichever worker answers the scrape."""
        self.audit_head_position.set(position)
        self._head = {"position": str(position), "mac": mac}
        if self.multiprocess_dir:
            path = os.path.join(self.multiprocess_dir, "audit-head.json")
            with open(path + ".tmp", "w") as file:
                json.dump(self._head, file)
            os.replace(path + ".tmp", path)

    def _audit_head(self) -> dict | None:
        if self.multiprocess_dir:
            try:
                with open(os.path.join(self.multiprocess_dir, "audit-head.json")) as file:
                    return json.load(file)
            except (OSError, ValueError):
                return None
        return self._head

    def sample_pool(self, pool):
        self.pool_size.set(pool.size)
        self.pool_in_use.set(pool.in_use)
        self.pool_waiting.set(pool.waiting)

    def add_collector(self, collector):
        """A collector that reads its values when scraped (the database's backlog, for example)."""
        self._collectors.append(collector)

    def render(self) -> Response:
        if self.multiprocess_dir:
            from prometheus_client import multiprocess
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)
        else:
            registry = self.registry
        text = generate_latest(registry) + generate_latest(_Collected(self._collectors + [self._head_collector]))
        return Response(text, content_type=CONTENT_TYPE_LATEST)

    def _head_collector(self):
        head = self._audit_head()
        if head is not None:
            family = InfoMetricFamily("kms_audit_chain_head", "The audit chain's head: record it outside the "
                                      "database and check with `kms audit verify --head POSITION:MAC`")
            family.add_metric([], head)
            yield family


class _Collected:
    """A registry-like object for generate_latest() over plain collect functions."""

    def __init__(self, functions):
        self.functions = functions

    def collect(self):
        for function in self.functions:
            yield from function()


def database_collector(kms, every_s: float = 10.0):
    """Gauges read from the database at scrape time, at most every `every_s`: what the operator of
    a KMS watches beyond requests (the cron's backlog, KEK versions still wrapping DEKs, the audit
    events not yet sealed). Not answered when the database is not; never blocks a scrape long."""
    cached = {"at": float("-inf"), "families": []}
    lock = threading.Lock()

    def read() -> list:
        from kms import db
        with kms.pool.connection() as conn, db.transaction(conn) as cur:
            cur.execute("SET LOCAL statement_timeout = 2000")
            cur.execute(db.sql.operational_backlog)
            rotation_due, destruction_due, unsealed, unsealed_age = cur.fetchone()
            cur.execute(db.sql.kek_usage)
            kek_usage = cur.fetchall()
        families = []
        for name, text, value in (
                ("kms_keys_rotation_due", "Keys past their rotation period (`kms keys rotate-due` rotates them)",
                 rotation_due),
                ("kms_keys_destruction_due", "Deleted keys whose wait is over, not yet destroyed", destruction_due),
                ("kms_audit_unsealed_events", "Audit events not yet sealed into the chain", unsealed),
                ("kms_audit_unsealed_oldest_seconds", "Age of the oldest unsealed audit event",
                 float(unsealed_age or 0))):
            families.append(GaugeMetricFamily(name, text, value=value))
        versions = GaugeMetricFamily("kms_kek_wrapped_dek_versions", "DEK versions wrapped by each KEK version "
                                     "(0 for a configured one that wraps none)", labels=["kek_version"])
        counts = dict(kek_usage)
        for version in sorted(set(counts) | set(kms.keyring.kek_versions)):
            versions.add_metric([str(version)], counts.get(version, 0))
        families.append(versions)
        active = GaugeMetricFamily("kms_kek_active_version", "The KEK version new DEKs are wrapped with",
                                   value=kms.keyring.kek_active)
        families.append(active)
        return families

    def collect():
        with lock:
            now = time.monotonic()
            if now - cached["at"] >= every_s:
                try:
                    cached["families"] = read()
                    cached["at"] = now
                except Exception as error:  # noqa: BLE001 - a scrape must answer even with the database down
                    log.warning("metrics from the database unavailable", extra={"error_code": type(error).__name__})
                    cached["families"], cached["at"] = [], now - every_s + 1  # retry in a second
            families = cached["families"]
        yield GaugeMetricFamily("kms_metrics_database_up", "1 when the database gauges below are current",
                                value=1 if families else 0)
        yield from families

    return collect


access_log = logging.getLogger("kms.access")


class _EverySecond:
    """Counts events and logs how many at most once a second: a flood must not turn into a flood
    of log lines."""

    def __init__(self, message: str):
        self.message = message
        self.pending = 0
        self.since = float("-inf")  # the first one is logged at once: a flood has begun

    def count(self):
        self.pending += 1  # a lost increment under a race only blurs a summary
        now = time.monotonic()
        if now - self.since >= 1.0:
            pending, self.pending, self.since = self.pending, 0, now
            access_log.warning(self.message, extra={"refused": pending, "route": "/auth/login", "status": 429})
REQUEST_ID = "kms.request_id"  # the WSGI environ key of the request's id


def request_id() -> str | None:
    """The current request's id (for error bodies and audit records)."""
    return request.environ.get(REQUEST_ID)


class RequestObserver:
    """WSGI middleware around the Flask app: every request gets a fresh id (in the environ and the
    X-Request-ID header), its latency in the metrics and one access-log line, by route template.

    Middleware rather than before/after_request hooks: it sees the environ and the status line
    directly, without the context-local look-ups hooks pay for on every request. The route template
    is read off the Flask request (`environ["werkzeug.request"]`) when the response starts, while
    Flask's request context is still live.
    """

    def __init__(self, wsgi_app, metrics: Metrics):
        self.wsgi_app = wsgi_app
        self.metrics = metrics
        self._shed_summary = _EverySecond("logins refused in a flood, before the application (one line a second "
                                          "instead of one a request; kms_logins_total counts each)")
        self._templates: dict = {}  # rule -> its template without converter names, once per rule

    def _template(self, rule: str) -> str:
        template = self._templates.get(rule)
        if template is None:  # /keys/<keyref:ref> -> /keys/<ref>
            template = self._templates[rule] = re.sub(r"<\w+:(\w+)>", r"<\1>", rule)
        return template

    def __call__(self, environ, start_response):
        started = time.perf_counter()
        request_id = environ[REQUEST_ID] = random_uuid()
        seen = ["<unmatched>", 500]  # route template, status

        def start_with_request_id(status, headers, exc_info=None):
            flask_request = environ.get("werkzeug.request")
            if flask_request is not None and flask_request.url_rule is not None:
                seen[0] = self._template(flask_request.url_rule.rule)
            elif "kms.route" in environ:  # answered before Flask (LoginFloodShedder)
                seen[0] = environ["kms.route"]
            seen[1] = int(status[:3])
            headers.append(("X-Request-ID", request_id))
            return start_response(status, headers, exc_info)

        body = self.wsgi_app(environ, start_with_request_id)
        elapsed = time.perf_counter() - started
        (route, status), method = seen, environ["REQUEST_METHOD"]
        self.metrics.observe(route, method, status, elapsed)
        if "kms.shed" in environ:  # a refusal in a flood: counted above, summed up in the log
            self._shed_summary.count()
        elif access_log.isEnabledFor(logging.INFO):
            access_log.info("request", extra={"requestId": request_id, "method": method, "route": route,
                                              "status": status, "durationMs": round(elapsed * 1000, 2)})
        return body


def init_app(app, kms):
    metrics = kms.metrics
    app.wsgi_app = RequestObserver(app.wsgi_app, metrics)
    metrics.add_collector(database_collector(kms))

    def render_metrics():
        metrics.sample_pool(kms.pool)
        return metrics.render()

    app.add_url_rule("/metrics", "metrics", render_metrics, methods=["GET"])
