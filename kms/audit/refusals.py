"""Refusals of callers nobody knows (a bad signup token, a throttled login), counted in memory.

A flood of refusals must cost next to nothing: no transaction and no durable write per refusal.
Each process counts them per action, outcome and source, and writes one audit event per count
(`repeats`: how many refusals it stands for) every AUDIT_REFUSAL_INTERVAL, under the event's row
MAC like any other (kms.audit.service.flush_refusals). A process that dies loses at most one
interval's counts; docs/SECURITY.md says so.
"""
import logging
import threading
from collections import Counter

from kms.context import Context
from kms.failures import OncePer, log_failure

log = logging.getLogger("kms.audit")
_FAILURES = OncePer()


class RefusalCounts:
    def __init__(self):
        self._lock = threading.Lock()
        self._counts: Counter = Counter()

    def count(self, action: str, outcome: str, source: str | None):
        with self._lock:
            self._counts[(action, outcome, source or "unknown")] += 1

    def take(self) -> Counter:
        """Every count so far, which start again from zero."""
        with self._lock:
            counts, self._counts = self._counts, Counter()
        return counts

    def put_back(self, counts: Counter):
        """Counts that could not be written (the database was down): kept for the next time."""
        with self._lock:
            self._counts.update(counts)


class RefusalWriter(threading.Thread):
    """Writes a server process's counted refusals every AUDIT_REFUSAL_INTERVAL, and once more
    when it stops."""

    def __init__(self, kms, write):
        """`write(ctx)`: kms.audit.service.flush_refusals."""
        super().__init__(name="refusal-writer", daemon=True)
        self.kms = kms
        self.write = write
        self.interval = kms.settings.audit_refusal_interval_ms / 1000
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.wait(self.interval):
            self.write_now()
        self.write_now()

    def write_now(self):
        try:
            with self.kms.pool.connection() as conn:
                self.write(Context(kms=self.kms, conn=conn))
        except Exception as error:  # noqa: BLE001 - the counts are kept for the next time
            log_failure(log, logging.WARNING, "refusal counts not written; will retry", error, _FAILURES)

    def stop(self):
        self.stopping.set()
        self.join(timeout=10)
