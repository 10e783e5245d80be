from kms.auth.service import unlock_client
from kms.clients import service
from kms.errors import NotFound
from kms.web.routing import Blueprint, context, parse_path
from schemas.clients import ClientList, ClientPath, RoleRequest

bp = Blueprint("clients", __name__, url_prefix="/clients", description="Client management (admin)")

_path = ClientPath()


def _id(client_id: str):
    return parse_path(_path, id=client_id)["id"]


@bp.route("", methods=["GET"])
@bp.response(200, ClientList)
def list_clients():
    """Every client, without password hashes."""
    return {"clients": service.list_clients(context())}


@bp.route("/<clientid:client_id>/role", methods=["POST"])
@bp.arguments(RoleRequest)
@bp.response(204)
def set_role(body, client_id):
    """Change a client's role; its tokens stop working at once."""
    service.set_role(context(), _id(client_id), body["role"])


@bp.route("/<clientid:client_id>/actions/disable", methods=["POST"])
@bp.response(204)
def disable(client_id):
    """Disable a client; its tokens stop working at once."""
    service.set_enabled(context(), _id(client_id), False)


@bp.route("/<clientid:client_id>/actions/enable", methods=["POST"])
@bp.response(204)
def enable(client_id):
    """Enable a disabled client."""
    service.set_enabled(context(), _id(client_id), True)


@bp.route("/<clientid:client_id>", methods=["DELETE"])
@bp.response(204)
def delete(client_id):
    """Delete a client: its tokens stop working and its keys are scheduled for deletion."""
    service.delete_client(context(), _id(client_id))


@bp.route("/<clientid:client_id>/actions/unlock", methods=["POST"])
@bp.response(204)
def unlock(client_id):
    """Lift the client's login lock after failed logins (anyone may cause one: 5 failures lock the
    name for the failure window)."""
    ctx = context()
    if not unlock_client(ctx, client_id=_id(client_id)):
        raise NotFound("No client with that id.")
