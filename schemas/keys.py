from marshmallow import fields, validate

from kms.rules import DAY_MS, MAX_VERSION
from schemas.common import KEY_ADDRESS, KEY_REFERENCE, AsciiInteger, Milliseconds, Schema, StrictBoolean, StrictSchema, Timestamp

KEY_STATES = ("in-use", "deprecated", "retired")


class GenerateKeyRequest(StrictSchema):
    keyReference = fields.String(required=True, validate=KEY_REFERENCE)
    exportable = StrictBoolean(load_default=True, metadata={
        "description": "false: the key's DEK is never returned on any route; it is used only through the key's "
                       "encrypt, decrypt, reencrypt and generate-data-key actions."})


class SetExportableRequest(StrictSchema):
    exportable = StrictBoolean(required=True, validate=validate.Equal(False), metadata={
        "description": "Only false: exportability can be turned off, never back on."})


class KeyReferencePath(StrictSchema):
    """A key as the path names it: the caller's reference, or `{owner}:{reference}` of a key shared
    with it (routes a grant never opens answer that 404, as for no such key)."""
    ref = fields.String(required=True, validate=KEY_ADDRESS)


class KeyVersionPath(KeyReferencePath):
    version = AsciiInteger(required=True, validate=validate.Range(min=1, max=MAX_VERSION))


class KeyObject(Schema):
    dek = fields.String(metadata={"description": "base64url of 32 bytes; absent for a key that is not exportable"})
    version = fields.Integer(required=True)
    encoding = fields.String()
    expiresAt = Timestamp(metadata={"description": "Cache the DEK no longer than this."})
    exportable = fields.Boolean(metadata={"description": "Present (false) only for a key that is not exportable: "
                                                         "then there is no dek."})


class KeyBundle(Schema):
    decryptWith = fields.Nested(KeyObject, required=True)
    encryptWith = fields.Nested(KeyObject, required=True)


class RetireRequest(StrictSchema):
    belowVersion = fields.Integer(strict=True, required=True, validate=validate.Range(min=2, max=MAX_VERSION))


class RotationPeriodRequest(StrictSchema):
    rotationPeriod = Milliseconds(required=True, allow_none=True,
                                  validate=validate.Range(min=60_000, max=3650 * DAY_MS),
                                  metadata={"description": "Milliseconds (at least one minute), or null to stop."})


class KeyMetadata(Schema):
    keyReference = fields.String(required=True, allow_none=True, metadata={
        "description": "null for a key imported from the original KMS (`kms import-seed`) that its owner has not "
                       "named since: the original kept only a hash of the reference."})
    currentVersion = fields.Integer(required=True)
    state = fields.String(required=True, validate=validate.OneOf(("enabled", "pending-deletion")))
    rotationPeriod = fields.Integer(allow_none=True)
    exportable = fields.Boolean(required=True)
    createdAt = Timestamp(required=True)
    rotatedAt = Timestamp(required=True)
    destroyAt = Timestamp(allow_none=True)


class KeyList(Schema):
    keys = fields.List(fields.Nested(KeyMetadata), required=True)


class KeyVersion(Schema):
    version = fields.Integer(required=True)
    state = fields.String(required=True, validate=validate.OneOf(KEY_STATES))
    createdAt = Timestamp(required=True)


class KeyVersionList(Schema):
    versions = fields.List(fields.Nested(KeyVersion), required=True)
