"""Request ids, one JSON log line per request, Prometheus metrics.

Log lines name the route template (`/keys/<ref>`), never the raw path: a raw path carries the
key reference. Bodies and headers are never logged.
"""
import json
import logging
import sys
import time
import uuid
from datetime import datetime, timezone

from flask import Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

_STANDARD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line. Exception text is deliberately dropped: it may quote data."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            entry["exception"] = record.exc_info[0].__name__
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO", stream=None):
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        if isinstance(existing.formatter, JsonFormatter):
            root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    # waitress logs the request line of a failed request; keep its own log terse.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("kms_http_requests", "HTTP requests by route template, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("kms_http_request_duration_seconds", "HTTP request latency by route template",
                                 ["route", "method"], registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))

    def render(self) -> Response:
        return Response(generate_latest(self.registry), content_type=CONTENT_TYPE_LATEST)


access_log = logging.getLogger("kms.access")


def init_app(app, metrics: Metrics):
    @app.before_request
    def _start_request():
        g.request_id = str(uuid.uuid4())
        g.started = time.perf_counter()

    @app.after_request
    def _finish_request(response):
        route = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
        elapsed = time.perf_counter() - g.get("started", time.perf_counter())
        response.headers["X-Request-ID"] = g.get("request_id", "")
        metrics.requests.labels(route, request.method, str(response.status_code)).inc()
        metrics.latency.labels(route, request.method).observe(elapsed)
        if access_log.isEnabledFor(logging.INFO):
            access_log.info("request", extra={
                "requestId": g.get("request_id"), "method": request.method, "route": route,
                "status": response.status_code, "durationMs": round(elapsed * 1000, 2),
            })
        return response

    app.add_url_rule("/metrics", "metrics", metrics.render, methods=["GET"])
