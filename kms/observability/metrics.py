"""Prometheus metrics: per request (by route template, method and status, and the domain
counters a route declares with counts_as), and gauges read when scraped. With several worker
processes, any worker's /metrics answers for all of them (prometheus-client's multiprocess mode).
"""
import fcntl
import glob
import json
import logging
import os
import threading
import time
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess
from prometheus_client import values as prometheus_values
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily

from kms.failures import OncePer, log_failure

log = logging.getLogger("kms")

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

OUTCOMES = {200: "success", 201: "success", 204: "success", 400: "invalid", 401: "unauthenticated",
            403: "forbidden", 404: "not_found", 409: "conflict", 410: "retired", 413: "invalid", 415: "invalid",
            429: "throttled", 503: "unavailable"}


def outcome(status: int) -> str:
    return OUTCOMES.get(status, "error" if status >= 500 else "invalid")


def use_multiprocess_metrics():
    """In a worker process, before any metric exists: values live in files under
    PROMETHEUS_MULTIPROC_DIR (set by the parent), which any worker's /metrics sums."""
    prometheus_values.ValueClass = prometheus_values.get_value_class()


# What dead processes counted, one file per kind: `counter_dead.db`, `gauge_max_dead.db`...
DEAD = "dead"
LOCK_FILE = "files.lock"


def _add(old, new):
    return new if old is None else (old[0] + new[0], 0.0)


def _larger(old, new):
    return new if old is None or new[0] > old[0] else old


def _smaller(old, new):
    return new if old is None or new[0] < old[0] else old


def _newer(old, new):
    return new if old is None or new[1] >= old[1] else old


# How a dead process's values fold into what the dead before it left, per kind of file
# (prometheus-client names them `<kind>_<pid>.db`). Live gauges are not here: they are dropped.
# Histograms are stored per bucket, not cumulated, so they add up as counters do.
_FOLD = {"counter": _add, "histogram": _add, "summary": _add, "gauge_sum": _add, "gauge_max": _larger,
         "gauge_min": _smaller, "gauge_mostrecent": _newer}


@contextmanager
def _files_locked(directory: str, exclusive: bool):
    """Scrapes read the directory's files under a shared lock, and folding a dead process's files
    into the aggregate takes it alone: no scrape sees a count twice, or a file vanish under it."""
    with open(os.path.join(directory, LOCK_FILE), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield


def fold_dead_process(pid: int, directory: str):
    """A dead process's metric files, merged into one aggregate file per kind and removed: a
    scrape reads a bounded number of files however many processes died. Counters and histograms
    keep their totals, and max, min and sum gauges their meaning across processes; its live
    gauges (pool in use) are dropped, as prometheus-client's mark_process_dead does."""
    with _files_locked(directory, exclusive=True):
        multiprocess.mark_process_dead(pid, directory)
        suffix = f"_{pid}.db"
        for path in glob.glob(os.path.join(directory, "*" + suffix)):
            kind = os.path.basename(path)[:-len(suffix)]
            fold = _FOLD.get(kind)
            if fold is None:  # a kind kept per process ("all" gauges): left as it is
                continue
            aggregate = os.path.join(directory, f"{kind}_{DEAD}.db")
            values: dict = {}
            for source in (aggregate, path):
                if os.path.exists(source):
                    for key, value, timestamp, _position in MmapedDict.read_all_values_from_file(source):
                        values[key] = fold(values.get(key), (value, timestamp))
            partial = aggregate + ".partial"  # not *.db: no scrape reads it
            if os.path.exists(partial):
                os.remove(partial)
            merged = MmapedDict(partial)
            try:
                for key, (value, timestamp) in values.items():
                    merged.write_value(key, value, timestamp)
            finally:
                merged.close()
            os.replace(partial, aggregate)
            os.remove(path)


def counts_as(counter: str, action: str | None = None):
    """Declares on a route (below `route`) the domain counter its requests feed besides the HTTP
    ones: `counts_as("logins")` (kms_logins_total by outcome) or `counts_as("key_operations",
    "rotate")` (kms_key_operations_total by action and outcome). HEAD requests feed none."""
    def declare(view):
        view.kms_counts = (counter, action)
        return view
    return declare


def counted_by(view) -> tuple[str, str | None] | None:
    return getattr(view, "kms_counts", None)


class Metrics:
    """Process metrics, and in a server with several workers the sum over all of them (counters of
    workers that died included: prometheus-client's multiprocess mode, with the files of the dead
    folded into one per kind by fold_dead_process)."""

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
        self.operation_items = Counter("kms_key_operation_items", "Items of server-side key operations (encrypt, "
                                       "decrypt, reencrypt, generate_data_key) by action and outcome, a batch "
                                       "counting each of its items", ["action", "outcome"], registry=registry)
        self._item_counters: dict = {}  # (action, outcome) -> its child of operation_items: labels() costs more
        self.integrity_failures = Counter("kms_integrity_failures", "Stored rows refused for a failed MAC check",
                                          ["table"], registry=registry)
        self.kek_unavailable = Counter("kms_kek_unavailable", "Look-ups answered 503 kek_unavailable: the DEK is "
                                       "wrapped under a KEK version this process does not hold", ["kek_version"],
                                       registry=registry)
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
        self.audit_sealing_stalled = Gauge("kms_audit_sealing_stalled",
                                           "1 while the oldest unsealed audit event is older than 5 seal intervals "
                                           "(the log names what blocks sealing)", registry=registry,
                                           multiprocess_mode="max")
        self._head: dict | None = None
        self._collectors: list = []
        self._children: dict = {}

    def observe(self, route: str, method: str, status: int, seconds: float, counts: tuple | None = None):
        """One request: `route` its template, `counts` what its route declared (counts_as)."""
        # Labels come from closed sets (route templates, known methods, statuses the server
        # writes): a caller inventing methods or paths must not grow memory or /metrics.
        if method not in KNOWN_METHODS:
            method = "other"
        # labels() takes a lock and builds a key on every call; remember the children instead.
        key = (route, method, status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = self._children_for(route, method, status, counts)
        for counter in children[1:]:
            counter.inc()
        children[0].observe(seconds)

    def _children_for(self, route: str, method: str, status: int, counts: tuple | None) -> tuple:
        children = [self.latency.labels(route, method), self.requests.labels(route, method, str(status))]
        if counts is not None and method != "HEAD":
            counter, action = counts
            if counter == "logins":
                children.append(self.logins.labels(outcome(status)))
            elif counter == "key_operations":
                children.append(self.key_operations.labels(action, outcome(status)))
            else:
                raise ValueError(f"no counter named {counter}")
        return tuple(children)

    def count_items(self, action: str, outcomes: dict):
        """A server-side operation's items by outcome (error code, or success): closed sets both."""
        for name, count in outcomes.items():
            if count:
                child = self._item_counters.get((action, name))
                if child is None:
                    child = self._item_counters[action, name] = self.operation_items.labels(action, name)
                child.inc(count)

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

    def render(self) -> bytes:
        """The text exposition of every metric (of every worker, in multiprocess mode)."""
        if self.multiprocess_dir:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)
            with _files_locked(self.multiprocess_dir, exclusive=False):
                processes = generate_latest(registry)
        else:
            processes = generate_latest(self.registry)
        return processes + generate_latest(_Collected(self._collectors + [self._head_collector]))

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


def database_collector(read, every_s: float = 10.0):
    """Gauges read from the database at scrape time, at most every `every_s`: what the operator of
    a KMS watches beyond requests. `read()` returns the families (the domains' gauges, composed
    by the app factory); it is not asked again for `every_s`, nor waited for when the database
    does not answer: a scrape always answers."""
    cached = {"at": float("-inf"), "families": []}
    failures = OncePer()
    lock = threading.Lock()

    def collect():
        with lock:
            now = time.monotonic()
            if now - cached["at"] >= every_s:
                try:
                    cached["families"] = read()
                    cached["at"] = now
                except Exception as error:  # noqa: BLE001 - a scrape must answer even with the database down
                    log_failure(log, logging.WARNING, "metrics from the database unavailable", error, failures)
                    cached["families"], cached["at"] = [], now - every_s + 1  # retry in a second
            families = cached["families"]
        yield GaugeMetricFamily("kms_metrics_database_up", "1 when the database gauges below are current",
                                value=1 if families else 0)
        yield from families

    return collect
