"""Keys that never leave the KMS: encrypt, decrypt, reencrypt and generate-data-key on the server."""
from kms.observability.metrics import counts_as
from kms.operations import service
from kms.web.routing import NO_STORE, Blueprint, context, large_json_response, parse_path
from schemas.keys import KeyReferencePath
from schemas.operations import (CiphertextAnswer, DataKeyAnswer, DataKeyRequest, DecryptRequest, EncryptRequest,
                                PlaintextAnswer, ReencryptRequest)

bp = Blueprint("key_operations", __name__, url_prefix="/keys",
               description="Server-side operations with the caller's keys: the DEK never leaves the KMS")


_reference = KeyReferencePath()


def _run(operation: str, ref: str, body: dict):
    reference = parse_path(_reference, ref=ref)["ref"]
    return large_json_response(service.run(context(), operation, reference, body), NO_STORE)


@bp.route("/<keyref:ref>/actions/encrypt", methods=["POST"])
@bp.json_object(EncryptRequest())
@bp.response(200, CiphertextAnswer)
@counts_as("key_operations", "encrypt")
def encrypt(body, ref):
    """Encrypt a plaintext (or a batch: `items`) under the key's current version, bound to `context`."""
    return _run("encrypt", ref, body)


@bp.route("/<keyref:ref>/actions/decrypt", methods=["POST"])
@bp.json_object(DecryptRequest())
@bp.response(200, PlaintextAnswer)
@counts_as("key_operations", "decrypt")
def decrypt(body, ref):
    """Decrypt a ciphertext of this key made with the same `context` (or a batch). Anything wrong with
    it: 400 decryption_failed; a retired version: 410."""
    return _run("decrypt", ref, body)


@bp.route("/<keyref:ref>/actions/reencrypt", methods=["POST"])
@bp.json_object(ReencryptRequest())
@bp.response(200, CiphertextAnswer)
@counts_as("key_operations", "reencrypt")
def reencrypt(body, ref):
    """Decrypt and encrypt again under the current version of this key, or of `toKeyReference`, with
    `toContext` (default: the same context); the plaintext never leaves the server."""
    return _run("reencrypt", ref, body)


@bp.route("/<keyref:ref>/actions/generate-data-key", methods=["POST"])
@bp.json_object(DataKeyRequest(), required=False)
@bp.response(200, DataKeyAnswer)
@counts_as("key_operations", "generate_data_key")
def generate_data_key(body, ref):
    """A fresh 32-byte data key encrypted under the key's current version (bound to `context`), with
    its plaintext unless `plaintext` is false."""
    return _run("generate_data_key", ref, body)
