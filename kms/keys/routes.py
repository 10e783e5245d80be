from kms import db, web
from kms.keys import service
from schemas.keys import (GenerateKeyRequest, KeyBundle, KeyList, KeyMetadata, KeyObject, KeyReferencePath,
                          KeyVersionList, KeyVersionPath, RetireRequest, RotationPeriodRequest)

bp = web.Blueprint("keys", __name__, url_prefix="/keys", description="Data encryption keys of the calling client")

_reference = KeyReferencePath()
_versioned = KeyVersionPath()


def _ref(ref: str) -> str:
    return web.parse_path(_reference, ref=ref)["ref"]


def _bundle(decrypt_with, encrypt_with):
    deprecated = "true" if decrypt_with.version != encrypt_with.version else "false"
    return web.json_response({"decryptWith": decrypt_with.to_json(), "encryptWith": encrypt_with.to_json()},
                             [*web.NO_STORE, ("X-Key-Deprecated", deprecated)])


def _key(material):
    return web.json_response(material.to_json(), web.NO_STORE)


@bp.route("/actions/generate", methods=["POST"])
@bp.arguments(GenerateKeyRequest)
@bp.response(200, KeyObject)
def generate(body):
    """Generate a new DEK under a reference (409 if the reference exists)."""
    return _key(service.generate_key(web.context(), body["keyReference"]))


@bp.route("", methods=["GET"])
@bp.response(200, KeyList)
def list_keys():
    """The caller's keys: metadata only, never DEK material."""
    return {"keys": service.list_keys(web.context())}


@bp.route("/<keyref:ref>", methods=["GET"])
@bp.response(200, KeyBundle)
def get_current(ref):
    """The current version, as both decryptWith and encryptWith."""
    return _bundle(*service.get_key(web.context(db_patience=db.LOOKUP_PATIENCE_S), _ref(ref)))


@bp.route("/<keyref:ref>/<version:version>", methods=["GET"])
@bp.response(200, KeyBundle)
def get_version(ref, version):
    """A given version to decrypt with, and the current one to encrypt with."""
    path = web.parse_path(_versioned, ref=ref, version=version)
    return _bundle(*service.get_key(web.context(db_patience=db.LOOKUP_PATIENCE_S), path["ref"], path["version"]))


@bp.route("/<keyref:ref>/versions", methods=["GET"])
@bp.response(200, KeyVersionList)
def versions(ref):
    """Every version of a key with its state: metadata only."""
    return {"versions": service.list_versions(web.context(), _ref(ref))}


@bp.route("/<keyref:ref>/actions/rotate", methods=["POST"])
@bp.response(200, KeyObject)
def rotate(ref):
    """Make a new version current; the previous one is kept for decryption."""
    return _key(service.rotate_key(web.context(), _ref(ref)))


@bp.route("/<keyref:ref>/actions/delete", methods=["DELETE"])
@bp.response(204)
def delete(ref):
    """Stop serving the key at once; destroy it after KEY_DELETION_WAIT."""
    service.delete_key(web.context(), _ref(ref))


@bp.route("/<keyref:ref>/actions/restore", methods=["POST"])
@bp.response(200, KeyMetadata)
def restore(ref):
    """Cancel a pending deletion."""
    return service.restore_key(web.context(), _ref(ref))


@bp.route("/<keyref:ref>/actions/retire", methods=["POST"])
@bp.arguments(RetireRequest)
@bp.response(200, KeyMetadata)
def retire(body, ref):
    """Retire every version below belowVersion: never served again, material erased."""
    return service.retire_versions(web.context(), _ref(ref), body["belowVersion"])


@bp.route("/<keyref:ref>/actions/set-rotation-period", methods=["POST"])
@bp.arguments(RotationPeriodRequest)
@bp.response(200, KeyMetadata)
def set_rotation_period(body, ref):
    """Rotate the key by itself once its current version is older than rotationPeriod (ms)."""
    return service.set_rotation_period(web.context(), _ref(ref), body["rotationPeriod"])
