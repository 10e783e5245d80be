"""Grants: a key's owner shares it with another client, for named operations (kms.grants.service)."""
from kms.grants import service
from kms.observability.metrics import counts_as
from kms.web.routing import Blueprint, context, parse_path
from schemas.clients import ClientPath
from schemas.grants import Grant, GrantList, GrantPath, GrantRequest, GrantUses, GrantUsesQuery
from schemas.keys import KeyReferencePath

bp = Blueprint("grants", __name__, url_prefix="", description="Sharing a key with another client")

_reference = KeyReferencePath()
_grant = GrantPath()
_client = ClientPath()


@bp.route("/keys/<keyref:ref>/grants", methods=["POST"])
@bp.arguments(GrantRequest)
@bp.response(201, Grant)
@counts_as("key_operations", "grant")
def create(body, ref):
    """Grant another client operations on this key (the owner only). The grantee names the key
    `{owner}:{ref}`."""
    reference = parse_path(_reference, ref=ref)["ref"]
    return service.create_grant(context(), reference, body["grantee"], body["operations"], body["expiresAt"],
                                body["contextSubset"])


@bp.route("/keys/<keyref:ref>/grants", methods=["GET"])
@bp.response(200, GrantList)
@counts_as("key_operations", "list_grants")
def list_key_grants(ref):
    """The live grants on this key (the owner only)."""
    return {"grants": service.list_key_grants(context(), parse_path(_reference, ref=ref)["ref"])}


@bp.route("/keys/<keyref:ref>/grants/<grantid:grant_id>", methods=["DELETE"])
@bp.response(204)
@counts_as("key_operations", "revoke_grant")
def revoke(ref, grant_id):
    """End a grant: it allows nothing from now on, in every server process. The key's owner, or an
    admin naming the key `{owner}:{ref}`."""
    path = parse_path(_grant, ref=ref, id=grant_id)
    service.revoke_grant(context(), path["ref"], path["id"])


@bp.route("/keys/<keyref:ref>/grants/<grantid:grant_id>/uses", methods=["GET"])
@bp.arguments(GrantUsesQuery, location="query")
@bp.response(200, GrantUses)
@counts_as("key_operations", "grant_uses")
def uses(query, ref, grant_id):
    """What a grant on this key was used for (the owner only): the audit events naming it, oldest first."""
    path = parse_path(_grant, ref=ref, id=grant_id)
    return {"uses": service.grant_uses(context(), path["ref"], path["id"], query["after"], query["limit"])}


@bp.route("/grants", methods=["GET"])
@bp.response(200, GrantList)
@counts_as("key_operations", "grants_to_me")
def grants_to_me():
    """The live grants made to the caller: each key's owner and reference, to name it `{owner}:{keyReference}`."""
    return {"grants": service.list_grants_to_me(context())}


@bp.route("/clients/<clientid:client_id>/grants", methods=["GET"])
@bp.response(200, GrantList)
def client_grants(client_id):
    """Admin: the live grants made by or to a client."""
    return {"grants": service.list_client_grants(context(), parse_path(_client, id=client_id)["id"])}
