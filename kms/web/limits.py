"""Requests nobody can vouch for, limited per source address before Flask.

The server's dispatcher marks a request *unverified* when it carries no bearer token the worker
has already verified (kms.serving.dispatch). Such requests cost little each, but from a few
hundred connections they add up to most of a worker's time. So each source address may send
SERVER_UNVERIFIED_RATE of those without any token (probes, /metrics, signups, /openapi.json) a
second, with a burst of twice that; beyond it the server's event loop answers 429 with
Retry-After at once, before any server thread or Flask (kms.serving.early), and does not read its
connection again for a second (as after every 429).

Not counted here: logins (the hasher's admission bounds them, per source and per client name, and
a client that logs in before every call needs many), and requests with a token the worker has not
verified yet (a new token is verified once; a bad one is a 401, remembered, after which the server
does not read its connection again for a second).
"""
import threading
import time

BURST = 2.0  # seconds' worth
MESSAGE = "Too many requests from this address without a valid token; retry in a second."


class UnverifiedRate:
    """A token bucket per source address: `rate` a second, a burst of BURST seconds' worth."""

    def __init__(self, rate: float):
        self.rate = rate
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # source -> (tokens, when)

    def allow(self, source: str) -> bool:
        now = time.monotonic()
        with self._lock:
            tokens, then = self._buckets.get(source, (self.rate * BURST, now))
            tokens = min(self.rate * BURST, tokens + (now - then) * self.rate)
            allowed = tokens >= 1
            if allowed:
                tokens -= 1
            if len(self._buckets) >= 10_000 and source not in self._buckets:
                self._buckets.clear()  # a full table of sources forgets them all: they start with a burst again
            self._buckets[source] = (tokens, now)
        return allowed
