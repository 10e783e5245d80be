"""The probes and /metrics: public routes for the orchestrator and the monitoring system."""
from flask import current_app, jsonify

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
    try:
        with kms.pool.connection() as conn:
            current = db.schema_version(conn)
    except db.ReadOnlyDatabase:
        return error_response(503, "not_ready", "Only a read-only standby answers; waiting for a primary.",
                              headers={"Retry-After": "2"})
    except Exception:  # noqa: BLE001 - any failure here means "not ready"
        return error_response(503, "not_ready", "The database does not answer.", headers={"Retry-After": "2"})
    expected = db.latest_schema_version()
    if current != expected:
        return error_response(503, "not_ready", "The database schema is not current; run migrations.",
                              headers={"Retry-After": "5"})
    return jsonify(status="ready", schemaVersion=current)


@bp.route("/metrics", methods=["GET"])
@bp.public
@bp.doc(responses={"200": {"description": "Prometheus text exposition format 0.0.4",
                           "content": {"text/plain": {"schema": {"type": "string"}}}}})
def metrics():
    """Prometheus metrics of the whole server (all workers); keep it on the internal network"""
    kms = current_app.extensions["kms"]
    kms.metrics.sample_pool(kms.pool)
    return kms.metrics.render()
