"""`kms serve`: one process, or (`SERVER_WORKERS=N`) N waitress processes on one listening
socket, supervised by their parent.

One process is bound by the GIL; N worker processes use N cores, as `gunicorn -w N` does, with
waitress as the server. The parent binds the socket once, prepares the database once (migrations,
secret checks, the first admin), then forks the workers and only supervises:
- a worker that dies is replaced, after a back-off that grows while workers keep dying young;
- SIGTERM, SIGINT or SIGHUP: every worker drains its in-flight requests, then the parent exits 0;
- a worker never outlives its parent: Linux sends it SIGTERM when the parent dies (PDEATHSIG),
  however the parent died.
Shared state lives in PostgreSQL (sessions, throttles, locks), so workers need no coordination
beyond three things the parent hands them: the host-wide bound on password hashing (HashGate),
each worker's connection count (to accept least-loaded first) and a directory for the metrics
every worker's /metrics sums. The audit sealer runs in a supervised process of its own
(`kms-sealer`; workers are `kms-worker-N` in ps).
"""
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass

from kms.app import create_app
from kms.audit.sealer import start_sealer
from kms.auth.passwords import HashGate
from kms.config import ConfigError
from kms.failures import cause
from kms.observability.metrics import fold_dead_process, use_multiprocess_metrics
from kms.runtime import Kms
from kms.serving.lifecycle import bind_listener, die_with_parent, name_this_process, stop_on_signals
from kms.serving.server import DRAIN_TIMEOUT_S, serve_app

log = logging.getLogger("kms")

REAP_INTERVAL_S = 0.2
STABLE_AFTER_S = 10.0  # a worker that lived this long resets the back-off
MAX_BACKOFF_S = 30.0
EMPTY_SLOT = 1 << 40  # the connection count of a slot whose worker is dead or not started


def run_server(settings, workers: int | None = None) -> int:
    """`kms serve`: bind first, prepare the database once, then serve in this process
    (one worker) or under a supervisor (several)."""
    workers = workers or settings.server_workers
    sock = bind_listener(settings.server_host, settings.server_port)
    try:
        kms = Kms.start(settings, pool_size=None if workers == 1 else 2)
    except BaseException:
        sock.close()
        raise
    if workers == 1:
        stopping = threading.Event()
        stop_on_signals(stopping)
        serve_app(create_app(kms=kms), sock, stopping)
        return 0
    kms.close()  # nothing of the database crosses the fork: each worker opens its own pool
    return Supervisor(settings, sock, workers).run()


SEALER_SLOT = -1  # the audit sealer's process; workers are slots 0 .. N-1


@dataclass
class Worker:
    slot: int  # 0 .. N-1, or SEALER_SLOT
    pid: int
    started: float


class Supervisor:
    def __init__(self, settings, sock, workers: int):
        self.settings = settings
        self.sock = sock
        self.count = workers
        self.hash_gate = HashGate(shared=True)
        # Each worker's open connections, for accepting least-loaded first (http.Server.readable);
        # a slot with no live worker counts as full.
        self.connections = multiprocessing.get_context("fork").RawArray("l", [EMPTY_SLOT] * workers)
        self.metrics_dir = tempfile.mkdtemp(prefix="kms-metrics-")
        self.workers: dict[int, Worker] = {}  # pid -> worker
        self.failures: dict[int, int] = {}  # deaths in a row, young, per slot
        self.respawn_at: dict[int, float] = {}  # slot -> when
        self.stopping = threading.Event()

    def run(self) -> int:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        stop_on_signals(self.stopping)
        try:
            for slot in range(self.count):
                self._spawn(slot)
            if self.settings.audit_seal_interval_ms > 0:
                self._spawn(SEALER_SLOT)
            log.info("serving", extra={"host": self.settings.server_host, "port": self.sock.getsockname()[1],
                                       "workers": self.count, "threads": self.settings.server_threads})
            while not self.stopping.is_set():
                self._reap()
                self._respawn_due()
                self.stopping.wait(REAP_INTERVAL_S)
            stopped, killed = self._stop_workers()
        finally:
            self.sock.close()
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
        log.info("stopped", extra={"did": "stopped the workers (each drained its requests first), closed the "
                                          "listening socket, removed the metrics directory",
                                   "workersStopped": stopped, "workersKilled": killed})
        return 0

    def _spawn(self, slot: int):
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the parent's code
            code = 1
            try:
                if slot == SEALER_SLOT:
                    self.sock.close()  # it serves nothing
                    code = run_sealer(self.settings)
                else:
                    code = run_worker(self.settings, self.sock, slot, self.hash_gate, (self.connections, slot))
            except BaseException as error:  # noqa: BLE001 - report, then exit with a code the parent sees
                log.error("worker failed", extra={"slot": slot, "error_code": type(error).__name__,
                                                  "cause": cause(error)})
            finally:
                logging.shutdown()
                os._exit(code)
        self.workers[pid] = Worker(slot, pid, time.monotonic())

    def _reap(self):
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            self._forget_metrics(pid)
            if worker.slot != SEALER_SLOT:
                self.connections[worker.slot] = EMPTY_SLOT
            lived = time.monotonic() - worker.started
            failures = self.failures[worker.slot] = 0 if lived >= STABLE_AFTER_S else self.failures.get(worker.slot, 0) + 1
            delay = 0.0 if failures <= 1 else min(MAX_BACKOFF_S, 2.0 ** (failures - 1))
            log.warning("worker died; replacing it", extra={"slot": worker.slot, "pid": pid, "exit": _describe(status),
                                                           "livedSeconds": round(lived, 1), "restartInSeconds": delay})
            self.respawn_at[worker.slot] = time.monotonic() + delay

    def _respawn_due(self):
        now = time.monotonic()
        for slot, when in list(self.respawn_at.items()):
            if when <= now:
                del self.respawn_at[slot]
                self._spawn(slot)

    def _stop_workers(self) -> tuple[int, int]:
        """(how many stopped, how many of them were killed after the drain timeout)."""
        count = len(self.workers)
        for pid in self.workers:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + DRAIN_TIMEOUT_S + 10
        while self.workers and time.monotonic() < deadline:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid:
                self.workers.pop(pid, None)
            else:
                time.sleep(0.05)
        killed = len(self.workers)
        for pid in self.workers:  # stuck past its drain: no choice left
            log.error("worker did not stop; killing it", extra={"pid": pid})
            _signal(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        self.workers.clear()
        return count, killed

    def _forget_metrics(self, pid: int):
        """A dead worker's counters stay in the sums, merged with those of the dead before it; its
        live gauges (pool in use) go; its files go."""
        try:
            fold_dead_process(pid, self.metrics_dir)
        except (OSError, ValueError, RuntimeError) as error:  # a damaged file: the supervisor keeps going
            log.error("a dead worker's metrics could not be merged",
                      extra={"pid": pid, "error_code": type(error).__name__})


def _become_child(name: str) -> threading.Event | None:
    """What every process the supervisor forks does first: die with the parent, take a name,
    stop on SIGTERM or SIGHUP (Ctrl-C reaches the whole group; the parent decides, and passes it
    on as SIGTERM), keep its metrics in the shared directory. None when the parent is gone."""
    if not die_with_parent(signal.SIGTERM):
        return None
    name_this_process(name)
    stopping = threading.Event()
    stop_on_signals(stopping, (signal.SIGTERM, signal.SIGHUP))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    use_multiprocess_metrics()
    return stopping


def run_worker(settings, sock, slot: int, hash_gate, balance=None) -> int:
    """A worker's life: its own pool and app (the parent prepared the database), served on the
    shared socket until SIGTERM."""
    stopping = _become_child(f"kms-worker-{slot}")
    if stopping is None:
        return 0
    kms = Kms.open(settings, hash_gate=hash_gate)
    kms.pool.warm()
    serve_app(create_app(kms=kms), sock, stopping, run_sealer=False, balance=balance, server_pid=os.getppid())
    return 0


def run_sealer(settings) -> int:
    """The audit sealer, in a process of its own beside the workers: chaining a second's worth of
    events is a burst of Python work, and in a worker it made that worker's requests queue for
    the GIL (look-up tails of hundreds of milliseconds under load)."""
    stopping = _become_child("kms-sealer")
    if stopping is None:
        return 0
    kms = Kms.open(settings, pool_size=1)
    sealer = start_sealer(kms)
    try:
        stopping.wait()
    finally:
        sealer.stop()
        sealer.join(timeout=30)
        kms.close()
    return 0


def _signal(pid: int, sig: int):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return signal.Signals(os.WTERMSIG(status)).name
    return f"exit {os.WEXITSTATUS(status)}"
