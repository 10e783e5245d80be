"""Request and answer schemas of the server-side key operations (kms/operations).

The service checks every item itself (kms.operations.service), so that one bad item of a batch
gets its own error while the others go on; these schemas check the body's shape and document it.
Limits stated here are the defaults (kms.config); an operator may change them."""
from marshmallow import ValidationError, fields

from kms.config import DEFAULT
from schemas.common import KEY_ADDRESS, Schema, StrictBoolean, StrictSchema

# base64url (RFC 4648), padded or not: only the lengths a whole number of bytes can have.
BASE64URL = r"^(?:[A-Za-z0-9_-]{4})*(?:[A-Za-z0-9_-]{2}(?:==)?|[A-Za-z0-9_-]{3}=?)?$"
PLAINTEXT_CHARS = (DEFAULT.operation_max_plaintext_bytes + 2) // 3 * 4


class ContextField(fields.Dict):
    """A flat object of strings, its problems said in one flat message (the error envelope's
    `fields` holds lists of strings); its bounds are the service's to check (they are settings)."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, dict) or not all(type(text) is str for text in value.values()):
            raise ValidationError("An object whose values are strings.")
        return value


def Context(**kwargs):
    return ContextField(keys=fields.String(), values=fields.String(), allow_none=True, metadata={
        "maxProperties": DEFAULT.operation_max_context_pairs,
        "description": "Encryption context: a flat object of strings, bound to the ciphertext as associated data "
                       "(canonically encoded), so that it decrypts only with the same context. At most "
                       f"{DEFAULT.operation_max_context_pairs} pairs and {DEFAULT.operation_max_context_bytes} bytes "
                       "of keys and values (OPERATION_MAX_CONTEXT_PAIRS, OPERATION_MAX_CONTEXT_BYTES)."}, **kwargs)


def Ciphertext(**kwargs):
    return fields.String(metadata={"description": "A ciphertext of this KMS (docs/API.md, \"Ciphertext format\"): "
                                                  "base64url."}, **kwargs)


def Plaintext(**kwargs):
    return fields.String(metadata={
        "pattern": BASE64URL, "maxLength": PLAINTEXT_CHARS,
        "description": f"base64url of at most {DEFAULT.operation_max_plaintext_bytes} bytes (OPERATION_MAX_PLAINTEXT)"},
        **kwargs)


class Items(fields.List):
    """`items` of a batch: a list of anything, each element answered on its own, with its result or
    its error (an element that is not a valid item gets its error, and the others go on), so the
    document says each should be an item body without making a bad one a bad request."""

    def __init__(self, item_schema, **kwargs):
        fields_list = ", ".join(f"`{name}`" for name in item_schema._declared_fields)
        super().__init__(fields.Raw(), metadata={
            "minItems": 1, "maxItems": DEFAULT.operation_max_batch,
            "description": f"A batch: at most {DEFAULT.operation_max_batch} items (OPERATION_MAX_BATCH), each an "
                           f"object as the single request's body ({fields_list}), each answered in order with its "
                           "result or its error."}, **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, list):
            raise ValidationError("A list of objects.")
        return value


class EncryptItem(StrictSchema):
    plaintext = Plaintext(required=True)
    context = Context()


class CheckedByTheService(StrictSchema):
    """A request body these schemas document and the service checks, field by field and item by item
    (kms.operations.service.parse_items: the same rules, one error per bad item of a batch, every
    unknown field refused). Loading returns the body as it came: checking it twice would cost a
    tenth of a single decrypt."""

    def load(self, data, *, many=None, partial=None, unknown=None):
        if not isinstance(data, dict):
            raise ValidationError({"_schema": ["The body must be a JSON object."]})
        return data


class EncryptRequest(CheckedByTheService):
    plaintext = Plaintext()
    context = Context()
    items = Items(EncryptItem)


class DecryptItem(StrictSchema):
    ciphertext = Ciphertext(required=True)
    context = Context()


class DecryptRequest(CheckedByTheService):
    ciphertext = Ciphertext()
    context = Context()
    items = Items(DecryptItem)


def KeyReference(**kwargs):
    return fields.String(validate=KEY_ADDRESS, **kwargs)


class ReencryptItem(StrictSchema):
    ciphertext = Ciphertext(required=True)
    context = Context()
    toKeyReference = KeyReference(allow_none=True, metadata={
        "description": "Another key of the caller's to re-encrypt under (default: this key)"})
    toContext = Context()


class ReencryptRequest(CheckedByTheService):
    ciphertext = Ciphertext()
    context = Context()
    toKeyReference = KeyReference(allow_none=True, metadata={
        "description": "Another key of the caller's to re-encrypt under (default: this key)"})
    toContext = Context()
    items = Items(ReencryptItem)


class DataKeyItem(StrictSchema):
    context = Context()
    plaintext = StrictBoolean(metadata={"description": "false: the data key only encrypted (default true)"})


class DataKeyRequest(CheckedByTheService):
    context = Context()
    plaintext = StrictBoolean(metadata={"description": "false: the data key only encrypted (default true)"})
    items = Items(DataKeyItem)


class ItemError(Schema):
    error = fields.String(metadata={"description": "snake_case error code of this item"})
    message = fields.String()
    status = fields.Integer(metadata={"description": "the HTTP status this error has when it is a request's"})
    problems = fields.Dict(data_key="fields", keys=fields.String(), values=fields.List(fields.String()))


class CiphertextResult(ItemError):
    ciphertext = fields.String(metadata={"description": "base64url, the KMS's ciphertext format"})
    version = fields.Integer(metadata={"description": "the key version it was encrypted under"})


class PlaintextResult(ItemError):
    plaintext = fields.String(metadata={"description": "base64url"})
    version = fields.Integer()


class DataKeyResult(CiphertextResult):
    plaintext = fields.String(metadata={"description": "base64url of the 32-byte data key (unless plaintext: false)"})


def _answer(result):
    class Answer(result):
        results = fields.List(fields.Nested(result), metadata={"description": "A batch's: one per item, in order"})
    Answer.__name__ = result.__name__.replace("Result", "Answer")
    return Answer


CiphertextAnswer = _answer(CiphertextResult)
PlaintextAnswer = _answer(PlaintextResult)
DataKeyAnswer = _answer(DataKeyResult)
