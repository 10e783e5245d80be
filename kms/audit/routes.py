from kms.audit import service
from kms.web.routing import Blueprint, context
from schemas.audit import AuditList, AuditQuery

bp = Blueprint("audit", __name__, url_prefix="/audit", description="The audit trail (admin)")


@bp.route("", methods=["GET"])
@bp.arguments(AuditQuery, location="query")
@bp.response(200, AuditList)
def list_events(query):
    """Events after a sequence number, oldest first."""
    return {"events": service.list_events(context(), query["after"], query["limit"])}
