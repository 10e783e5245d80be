"""Every request gets a fresh id, its latency and counts in the metrics, and one access-log line,
named by its route template."""
import logging
import re
import time

from kms.ids import random_uuid
from kms.observability.metrics import Metrics, counted_by
from kms.web import ANSWERED_ENDPOINT, REQUEST_ID, SHED

access_log = logging.getLogger("kms.access")

UNMATCHED = ("<unmatched>", None)  # no route: 404, 405, or refused before routing


class _EverySecond:
    """Counts events and logs how many at most once a second: a flood must not turn into a flood
    of log lines."""

    def __init__(self, message: str):
        self.message = message
        self.pending = 0
        self.since = float("-inf")  # the first one is logged at once: a flood has begun

    def count(self, route: str, status: int):
        self.pending += 1  # a lost increment under a race only blurs a summary
        now = time.monotonic()
        if now - self.since >= 1.0:
            pending, self.pending, self.since = self.pending, 0, now
            access_log.warning(self.message, extra={"refused": pending, "route": route, "status": status})


class RequestObserver:
    """WSGI middleware around the Flask app: every request gets a fresh id (in the environ and the
    X-Request-ID header), its latency in the metrics and one access-log line, by route template.

    Middleware rather than before/after_request hooks: it sees the environ and the status line
    directly, without the context-local look-ups hooks pay for on every request. The route is read
    off the Flask request (`environ["werkzeug.request"]`) when the response starts, while Flask's
    request context is still live; a request answered before Flask names its endpoint in the
    environ (ANSWERED_ENDPOINT).
    """

    def __init__(self, wsgi_app, metrics: Metrics, url_map, view_functions: dict):
        self.wsgi_app = wsgi_app
        self.metrics = metrics
        self._url_map = url_map
        self._view_functions = view_functions
        self._shed_summaries = {
            "login": _EverySecond("logins refused in a flood, before the application (one line a second instead "
                                  "of one a request; kms_logins_total counts each)"),
            "unverified": _EverySecond("requests without a known token refused over their source's rate, before "
                                       "the application (one line a second; kms_http_requests_total counts each)"),
            "token": _EverySecond("requests with a token this worker refused before, refused again before the "
                                  "application (one line a second; kms_http_requests_total counts each)"),
        }
        self._by_endpoint: dict = {}  # endpoint -> (route template, what its route counts as)

    def _route(self, endpoint: str) -> tuple[str, tuple | None]:
        found = self._by_endpoint.get(endpoint)
        if found is None:
            rule = next(self._url_map.iter_rules(endpoint))
            template = re.sub(r"<\w+:(\w+)>", r"<\1>", rule.rule)  # /keys/<keyref:ref> -> /keys/<ref>
            found = self._by_endpoint[endpoint] = (template, counted_by(self._view_functions.get(endpoint)))
        return found

    def refused_before_app(self, endpoint: str | None, method: str, status: int, seconds: float, shed: str):
        """A request the server refused itself (kms.serving.early): counted as if it had passed
        here, by the route it would have reached (`endpoint`; None: unmatched), and summed up in the
        log."""
        route, counts = self._route(endpoint) if endpoint is not None else UNMATCHED
        self.metrics.observe(route, method, status, seconds, counts)
        self._shed_summaries[shed].count(route, status)

    def __call__(self, environ, start_response):
        started = time.perf_counter()
        request_id = environ[REQUEST_ID] = random_uuid()
        seen = [UNMATCHED, 500]  # (route template, counts), status

        def start_with_request_id(status, headers, exc_info=None):
            flask_request = environ.get("werkzeug.request")
            if flask_request is not None and flask_request.url_rule is not None:
                seen[0] = self._route(flask_request.url_rule.endpoint)
            elif ANSWERED_ENDPOINT in environ:
                seen[0] = self._route(environ[ANSWERED_ENDPOINT])
            seen[1] = int(status[:3])
            headers.append(("X-Request-ID", request_id))
            return start_response(status, headers, exc_info)

        body = self.wsgi_app(environ, start_with_request_id)
        elapsed = time.perf_counter() - started
        ((route, counts), status), method = seen, environ["REQUEST_METHOD"]
        self.metrics.observe(route, method, status, elapsed, counts)
        if SHED in environ:  # a refusal in a flood: counted above, summed up in the log
            self._shed_summaries[environ[SHED]].count(route, status)
        elif access_log.isEnabledFor(logging.INFO):
            # REMOTE_ADDR as the application saw it: the caller's, behind TRUSTED_PROXY_HOPS too
            access_log.info("request", extra={"requestId": request_id, "client": environ.get("REMOTE_ADDR"),
                                              "method": method, "route": route, "status": status,
                                              "durationMs": round(elapsed * 1000, 2)})
        return body
