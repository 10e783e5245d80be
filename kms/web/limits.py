"""Requests nobody can vouch for, limited per source address before Flask.

The server's dispatcher marks a request *unverified* when it carries no bearer token the worker
has already verified (kms.serving.dispatch). Such requests cost little each, but from a few
hundred connections they add up to most of a worker's time. So each source address may send
SERVER_UNVERIFIED_RATE of those without any token (probes, /metrics, signups, /openapi.json) a
second, with a burst of twice that; beyond it a request is answered 429 with Retry-After at once,
before Flask, and its connection is not read again for a second (as after every 429).

Not counted here: logins (the hasher's admission bounds them, per source and per client name, and
a client that logs in before every call needs many), and requests with a token the worker has not
verified yet (a new token is verified once; a bad one is a 401, after which the server does not
read its connection again for a second).
"""
import threading
import time

from kms.web import REQUEST_ID, SHED, UNVERIFIED_SOURCE
from kms.web.envelope import envelope_json

BURST = 2.0  # seconds' worth
MESSAGE = "Too many requests from this address without a valid token; retry in a second."


class UnverifiedLimiter:
    def __init__(self, wsgi_app, exempt_path: str, rate: float):
        self.wsgi_app = wsgi_app
        self.exempt_path = exempt_path
        self.rate = rate
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # source -> (tokens, when)

    def _allow(self, source: str) -> bool:
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

    def __call__(self, environ, start_response):
        source = environ.get(UNVERIFIED_SOURCE)
        if (source is None or "HTTP_AUTHORIZATION" in environ or environ["PATH_INFO"] == self.exempt_path
                or self._allow(source)):
            return self.wsgi_app(environ, start_response)
        environ[SHED] = "unverified"
        body = envelope_json("too_many_requests", MESSAGE, environ.get(REQUEST_ID))
        start_response("429 TOO MANY REQUESTS", [("Content-Type", "application/json"),
                                                 ("Content-Length", str(len(body))), ("Retry-After", "1")])
        return [body]
