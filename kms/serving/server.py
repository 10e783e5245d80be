"""Serving: one process (`SERVER_WORKERS=1`), or one worker of several (kms/serving/workers.py).

Both run the same loop: waitress's event loop until a stop signal, then a drain — the listening
socket is no longer read, every request already received is answered and its answer written,
and only then are connections closed — bounded by DRAIN_TIMEOUT_S.
"""
import logging
import threading
import time

from waitress import wasyncore

from kms.audit.freshness import ChangeFollower, catch_up
from kms.audit.refusals import RefusalWriter
from kms.audit.sealer import start_sealer
from kms.audit.service import flush_refusals
from kms.serving.http import create_server

log = logging.getLogger("kms")

LOOP_TIMEOUT_S = 0.5  # how soon a stop signal is noticed
DRAIN_TIMEOUT_S = 30.0


def _in_flight(server) -> int:
    """Connections with a request being read, run or answered."""
    return sum(1 for channel in list(server.active_channels.values())
               if channel.requests or channel.request is not None or channel.total_outbufs_len)


def serve_until(server, stopping: threading.Event, drain_timeout: float = DRAIN_TIMEOUT_S) -> int:
    """Run `server` until `stopping` is set, drain it, close it. Returns how many connections
    still had a request in flight when the drain timed out."""
    while not stopping.is_set():
        server.poll(LOOP_TIMEOUT_S)
    server.accepting = False  # readable() is now False: other workers take new connections
    deadline = time.monotonic() + drain_timeout
    while _in_flight(server) and time.monotonic() < deadline:
        server.poll(0.05)
    left = _in_flight(server)
    if left:
        log.warning("stopped with requests still in flight", extra={"connections": left})
    server.task_dispatcher.shutdown(timeout=5)
    wasyncore.close_all(server._map)
    return left


def _sample_pool(kms, stopping: threading.Event, every_s: float = 1.0):
    """The pool's gauges, kept current in every worker (a scrape reaches only one of them)."""
    kms.metrics.sample_pool(kms.pool)
    while not stopping.wait(every_s):
        kms.metrics.sample_pool(kms.pool)


def serve_app(app, sock, stopping: threading.Event, *, run_sealer: bool = True, balance=None):
    """Serve `app` on the bound `sock` until `stopping` is set; the audit sealer runs beside it."""
    kms = app.extensions["kms"]
    server = create_server(app, kms.settings, sock=sock, balance=balance)
    sealer = start_sealer(kms) if run_sealer else None
    refusals = RefusalWriter(kms, flush_refusals)
    refusals.start()
    with kms.pool.connection() as conn:  # before the first request: every row change so far
        catch_up(kms, conn)
    follower = ChangeFollower(kms, kms.pool.connection)
    follower.start()
    sampler = threading.Thread(target=_sample_pool, args=(kms, stopping), name="pool-sampler", daemon=True)
    sampler.start()
    log.info("serving", extra={"host": kms.settings.server_host, "port": int(server.effective_port),
                               "threads": kms.settings.server_threads})
    started, unanswered = time.monotonic(), None
    try:
        unanswered = serve_until(server, stopping)
    finally:
        follower.stop()
        refusals.stop()
        if sealer:
            sealer.stop()
        kms.close()
        log.info("stopped", extra={
            "did": "stopped accepting, answered the requests in flight, wrote the refusal counts, stopped the "
                   "audit sealer, closed the database pool",
            "unansweredConnections": unanswered, "servedSeconds": round(time.monotonic() - started, 1)})

