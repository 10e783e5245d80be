from kms import db
from kms.keys import service
from kms.observability.metrics import counts_as
from kms.web.routing import NO_STORE, Blueprint, context, json_response, parse_path
from schemas.keys import (GenerateKeyRequest, KeyBundle, KeyList, KeyMetadata, KeyObject, KeyReferencePath,
                          KeyVersionList, KeyVersionPath, RetireRequest, RotationPeriodRequest, SetExportableRequest)

bp = Blueprint("keys", __name__, url_prefix="/keys", description="Data encryption keys of the calling client")

_reference = KeyReferencePath()
_versioned = KeyVersionPath()


def _ref(ref: str) -> str:
    return parse_path(_reference, ref=ref)["ref"]


def _bundle(decrypt_with, encrypt_with):
    deprecated = "true" if decrypt_with.version != encrypt_with.version else "false"
    return json_response({"decryptWith": decrypt_with.to_json(), "encryptWith": encrypt_with.to_json()},
                             [*NO_STORE, ("X-Key-Deprecated", deprecated)])


def _key(material):
    return json_response(material.to_json(), NO_STORE)


@bp.route("/actions/generate", methods=["POST"])
@bp.arguments(GenerateKeyRequest)
@bp.response(200, KeyObject)
@counts_as("key_operations", "generate")
def generate(body):
    """Generate a new DEK under a reference (409 if the reference exists); with `exportable: false`
    its DEK is never returned, here or later."""
    return _key(service.generate_key(context(), body["keyReference"], body["exportable"]))


@bp.route("", methods=["GET"])
@bp.response(200, KeyList)
@counts_as("key_operations", "list")
def list_keys():
    """The caller's keys: metadata only, never DEK material."""
    return {"keys": service.list_keys(context())}


@bp.route("/<keyref:ref>", methods=["GET"])
@bp.response(200, KeyBundle)
@counts_as("key_operations", "lookup")
def get_current(ref):
    """The current version, as both decryptWith and encryptWith."""
    return _bundle(*service.get_key(context(db_patience=db.LOOKUP_PATIENCE_S), _ref(ref)))


@bp.route("/<keyref:ref>/<version:version>", methods=["GET"])
@bp.response(200, KeyBundle)
@counts_as("key_operations", "lookup")
def get_version(ref, version):
    """A given version to decrypt with, and the current one to encrypt with."""
    path = parse_path(_versioned, ref=ref, version=version)
    return _bundle(*service.get_key(context(db_patience=db.LOOKUP_PATIENCE_S), path["ref"], path["version"]))


@bp.route("/<keyref:ref>/versions", methods=["GET"])
@bp.response(200, KeyVersionList)
@counts_as("key_operations", "list_versions")
def versions(ref):
    """Every version of a key with its state: metadata only."""
    return {"versions": service.list_versions(context(), _ref(ref))}


@bp.route("/<keyref:ref>/actions/rotate", methods=["POST"])
@bp.response(200, KeyObject)
@counts_as("key_operations", "rotate")
def rotate(ref):
    """Make a new version current; the previous one is kept for decryption."""
    return _key(service.rotate_key(context(), _ref(ref)))


@bp.route("/<keyref:ref>/actions/delete", methods=["DELETE"])
@bp.response(204)
@counts_as("key_operations", "delete")
def delete(ref):
    """Stop serving the key at once; destroy it after KEY_DELETION_WAIT."""
    service.delete_key(context(), _ref(ref))


@bp.route("/<keyref:ref>/actions/restore", methods=["POST"])
@bp.response(200, KeyMetadata)
@counts_as("key_operations", "restore")
def restore(ref):
    """Cancel a pending deletion."""
    return service.restore_key(context(), _ref(ref))


@bp.route("/<keyref:ref>/actions/retire", methods=["POST"])
@bp.arguments(RetireRequest)
@bp.response(200, KeyMetadata)
@counts_as("key_operations", "retire")
def retire(body, ref):
    """Retire every version below belowVersion: never served again, material erased."""
    return service.retire_versions(context(), _ref(ref), body["belowVersion"])


@bp.route("/<keyref:ref>/actions/set-rotation-period", methods=["POST"])
@bp.arguments(RotationPeriodRequest)
@bp.response(200, KeyMetadata)
@counts_as("key_operations", "set_rotation_period")
def set_rotation_period(body, ref):
    """Rotate the key by itself once its current version is older than rotationPeriod (ms)."""
    return service.set_rotation_period(context(), _ref(ref), body["rotationPeriod"])


@bp.route("/<keyref:ref>/actions/set-exportable", methods=["POST"])
@bp.arguments(SetExportableRequest)
@bp.response(200, KeyMetadata)
@counts_as("key_operations", "set_exportable")
def set_exportable(body, ref):
    """Stop the key's DEK from ever being returned again (there is no way back)."""
    return service.make_not_exportable(context(), _ref(ref))
