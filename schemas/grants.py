from datetime import datetime, timezone

from marshmallow import ValidationError, fields, validate, validates

from kms.config import DEFAULT
from kms.rules import GRANT_OPERATIONS as OPERATIONS
from schemas.audit import AuditEvent, AuditQuery
from schemas.common import CLIENTNAME, Schema, StrictSchema, Timestamp
from schemas.keys import KeyReferencePath
from schemas.operations import ContextField


class OperationList(fields.List):
    """Operation names, its problems said in one flat message (the error envelope's `fields` holds
    lists of strings, never an item's own)."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, list) or not all(isinstance(name, str) and name in OPERATIONS for name in value):
            raise ValidationError("A list of operations, each one of: " + ", ".join(OPERATIONS) + ".")
        return list(value)


class GrantRequest(StrictSchema):
    grantee = fields.String(required=True, validate=CLIENTNAME, metadata={
        "description": "The clientname of the one client the grant is for (never a wildcard)."})
    operations = OperationList(fields.String(validate=validate.OneOf(OPERATIONS)), required=True,
                             validate=validate.Length(min=1, max=len(OPERATIONS)), metadata={
        "description": "What the grantee may do with the key: fetch (the DEK routes; exportable keys only), encrypt, "
                       "decrypt, reencrypt, generate-data-key. Never rotate, retire, delete, restore, set-* or grant."})
    expiresAt = fields.AwareDateTime(format="iso", load_default=None, allow_none=True, metadata={
        "description": "RFC 3339 with a time zone; the grant allows nothing from then on."})
    contextSubset = ContextField(keys=fields.String(), values=fields.String(), allow_none=True, load_default=None,
                                 metadata={"maxProperties": DEFAULT.operation_max_context_pairs,
                                           "description": "Pairs the grantee's `context` must contain, each exactly "
                                                          "(else 403); bounded as a context is (else 400)."})

    @validates("expiresAt")
    def _in_the_future(self, value, **kwargs):
        if value is None:
            return
        try:
            value = value.astimezone(timezone.utc)
        except OverflowError:  # past year 9999 in UTC: no time we can store or compare
            raise ValidationError("Not a valid datetime.") from None
        if value <= datetime.now(timezone.utc):
            raise ValidationError("Must be in the future.")


class Grant(Schema):
    id = fields.UUID(required=True)
    grantee = fields.String(required=True)
    operations = fields.List(fields.String(), required=True)
    expiresAt = Timestamp(allow_none=True)
    contextSubset = fields.Dict(keys=fields.String(), values=fields.String(), allow_none=True)
    createdAt = Timestamp(required=True)
    owner = fields.String(metadata={"description": "The key's owner (listings of grants made to a client)."})
    keyReference = fields.String(metadata={"description": "The key's reference, as its owner names it: address it "
                                                          "as {owner}:{keyReference}."})


class GrantList(Schema):
    grants = fields.List(fields.Nested(Grant), required=True)


class GrantPath(KeyReferencePath):
    id = fields.UUID(required=True)


class GrantUses(Schema):
    uses = fields.List(fields.Nested(AuditEvent), required=True)


GrantUsesQuery = AuditQuery
