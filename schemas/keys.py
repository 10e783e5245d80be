from marshmallow import fields, validate

from kms.rules import DAY_MS, MAX_VERSION
from schemas.common import KEY_REFERENCE, AsciiInteger, Milliseconds, Schema, StrictSchema, Timestamp

KEY_STATES = ("in-use", "deprecated", "retired")


class GenerateKeyRequest(StrictSchema):
    keyReference = fields.String(required=True, validate=KEY_REFERENCE)


class KeyReferencePath(StrictSchema):
    ref = fields.String(required=True, validate=KEY_REFERENCE)


class KeyVersionPath(KeyReferencePath):
    version = AsciiInteger(required=True, validate=validate.Range(min=1, max=MAX_VERSION))


class KeyObject(Schema):
    dek = fields.String(required=True, metadata={"description": "base64url of 32 bytes"})
    version = fields.Integer(required=True)
    encoding = fields.String(required=True)
    expiresAt = Timestamp(required=True, metadata={"description": "Cache the DEK no longer than this."})


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
