"""The probes and /metrics: public routes for the orchestrator and the monitoring system.

Anyone may call them, so none may cost much: /healthz touches nothing, /readyz answers from a
result at most PROBE_CACHE (a second) old, /metrics renders at most once in that time, one thread
at a time, and every other scrape meanwhile gets that rendering (kms.observability.probes).
"""
from flask import Response, current_app, jsonify
from prometheus_client import CONTENT_TYPE_LATEST

from kms import db
from kms.web.envelope import error_response
from kms.web.routing import Blueprint


bp = Blueprint("Operations", __name__, description="Probes and metrics, for orchestrators and monitoring")

_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}


@bp.route("/healthz", methods=["GET"])
@bp.public
@bp.doc(responses={"200": {"description": "Alive", "content": {"application/json": {"schema": {
    "type": "object", "properties": {"status": {"type": "string", "enum": ["ok"]}}}}}}})
def healthz():
    """Liveness: the process answers (it does not touch the database)"""
    return jsonify(status="ok")


@bp.route("/readyz", methods=["GET"])
@bp.public
@bp.doc(responses={
    "200": {"description": "Ready", "content": {"application/json": {"schema": {
        "type": "object", "properties": {"status": {"type": "string", "enum": ["ready"]},
                                         "schemaVersion": {"type": "integer"}}}}}},
    "503": {"description": "Not ready (database unreachable or schema not current); see Retry-After",
            "content": _ERROR}})
def readyz():
    """Readiness: the database answers and its schema is current"""
    kms = current_app.extensions["kms"]
    state = kms.probes.readiness(lambda: _readiness(kms))
    if state[0] != "ready":
        _, message, retry_after = state
        return error_response(503, "not_ready", message, headers={"Retry-After": retry_after})
    return jsonify(status="ready", schemaVersion=state[1])


def _readiness(kms) -> tuple:
    """("ready", schema version) or ("not_ready", message, Retry-After)."""
    try:
        with kms.pool.connection() as conn:
            current = db.schema_version(conn)
    except db.ReadOnlyDatabase:
        return "not_ready", "Only a read-only standby answers; waiting for a primary.", "2"
    except Exception:  # noqa: BLE001 - any failure here means "not ready"
        return "not_ready", "The database does not answer.", "2"
    if current != db.latest_schema_version():
        return "not_ready", "The database schema is not current; run migrations.", "5"
    return "ready", current


@bp.route("/metrics", methods=["GET"])
@bp.public
@bp.doc(responses={"200": {"description": "Prometheus text exposition format 0.0.4",
                           "content": {"text/plain": {"schema": {"type": "string"}}}}})
def metrics():
    """Prometheus metrics of the whole server (all workers); keep it on the internal network"""
    kms = current_app.extensions["kms"]
    body = kms.probes.metrics(lambda: _render_metrics(kms))
    return Response(body, content_type=CONTENT_TYPE_LATEST)


def _render_metrics(kms) -> bytes:
    kms.metrics.sample_pool(kms.pool)
    return kms.metrics.render()
