"""Serving: one process (`SERVER_WORKERS=1`), or one worker of several (kms/serving/workers.py).

Both run the same loop: waitress's event loop until a stop signal, then a drain (kms.serving.http):
no new connection is taken, but every connection already waiting in the listening socket's
backlog is; every request whose bytes arrived is read, run and answered; each connection is then
closed gently (its last answer says `Connection: close`, the sending side is shut first) so the
client reads every answer — bounded by DRAIN_TIMEOUT_S.
"""
import logging
import threading
import time

from waitress import wasyncore

from kms.audit.freshness import ChangeFollower, catch_up
from kms.audit.refusals import RefusalWriter
from kms.audit.sealer import start_sealer
from kms.audit.service import flush_refusals
from kms.keys.kek_holders import KekPublisher
from kms.serving.http import create_server

log = logging.getLogger("kms")

LOOP_TIMEOUT_S = 0.5  # how soon a stop signal is noticed
DRAIN_TIMEOUT_S = 30.0


def serve_until(server, stopping: threading.Event, drain_timeout: float = DRAIN_TIMEOUT_S) -> int:
    """Run `server` until `stopping` is set, drain it, close it. Returns how many connections
    were still open when the drain timed out."""
    while not stopping.is_set():
        server.poll(LOOP_TIMEOUT_S)
    server.start_draining()  # other workers, if any, stop too: the parent signals them all
    deadline = time.monotonic() + drain_timeout
    while server.drain_step() and time.monotonic() < deadline:
        pass
    left = len(server.active_channels)
    if left:
        log.warning("stopped with requests still in flight", extra={"connections": left})
    server.close_lingering()
    server.kms_draining = False
    server.task_dispatcher.shutdown(timeout=5)
    wasyncore.close_all(server._map)
    return left


def _sample_pool(kms, stopping: threading.Event, every_s: float = 1.0):
    """The pool's gauges, kept current in every worker (a scrape reaches only one of them)."""
    kms.metrics.sample_pool(kms.pool)
    while not stopping.wait(every_s):
        kms.metrics.sample_pool(kms.pool)


def serve_app(app, sock, stopping: threading.Event, *, run_sealer: bool = True, balance=None,
              server_pid: int | None = None):
    """Serve `app` on the bound `sock` until `stopping` is set; the audit sealer runs beside it,
    and the KEK versions this process holds are published while it serves (kms.keys.kek_holders;
    `server_pid`: the `kms serve` process, when this is one of its workers)."""
    kms = app.extensions["kms"]
    publisher = KekPublisher(kms, server_pid)
    publisher.start()
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
        publisher.stop()
        follower.stop()
        refusals.stop()
        if sealer:
            sealer.stop()
        kms.close()
        log.info("stopped", extra={
            "did": "stopped accepting, answered the requests in flight, wrote the refusal counts, stopped the "
                   "audit sealer, closed the database pool",
            "unansweredConnections": unanswered, "servedSeconds": round(time.monotonic() - started, 1)})

