"""What the public probes answer with, reused while fresh: anyone may call them, so none may cost
much however often it is called."""
import threading
import time



class ProbeAnswers:
    """The last readiness result and metrics rendering of this process, each reused while fresh.
    One thread computes a stale one at a time; the others take the last one meanwhile (or wait
    for the first)."""

    def __init__(self, fresh_s: float):
        """`fresh_s`: PROBE_CACHE, how long an answer is reused (0: never)."""
        self._ready = _Reused(fresh_s)
        self._metrics = _Reused(fresh_s)

    def readiness(self, compute):
        return self._ready.get(compute)

    def metrics(self, compute):
        return self._metrics.get(compute)


class _Reused:
    def __init__(self, fresh_s: float):
        self.fresh_s = fresh_s
        self._lock = threading.Lock()
        self._value = None
        self._at = float("-inf")

    def get(self, compute):
        if time.monotonic() - self._at < self.fresh_s:
            return self._value
        if not self._lock.acquire(blocking=self._value is None):
            return self._value  # another thread is computing it: the last one is fresh enough
        try:
            if time.monotonic() - self._at >= self.fresh_s:
                self._value, self._at = compute(), time.monotonic()
            return self._value
        finally:
            self._lock.release()
