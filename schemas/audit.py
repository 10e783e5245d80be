from marshmallow import fields, validate

from schemas.common import Schema, StrictSchema, Timestamp


class AuditQuery(StrictSchema):
    after = fields.Integer(load_default=0, validate=validate.Range(min=0))
    limit = fields.Integer(load_default=100, validate=validate.Range(min=1, max=1000))


class AuditEvent(Schema):
    seq = fields.Integer(required=True)
    at = Timestamp(required=True)
    actor = fields.String(required=True)
    action = fields.String(required=True)
    target = fields.String(allow_none=True)
    version = fields.Integer(allow_none=True)
    outcome = fields.String(required=True)
    requestId = fields.String(allow_none=True)
    sourceIp = fields.String(allow_none=True)
    repeats = fields.Integer(allow_none=True, metadata={
        "description": "How many more times the same refusal came from this source in its minute (null: once)."})
    detail = fields.String(allow_none=True, metadata={
        "description": "JSON: what one event standing for a batch of key operations touched (items, failed, "
                       "versions, contextKeys); never a plaintext, ciphertext or context value."})


class AuditList(Schema):
    events = fields.List(fields.Nested(AuditEvent), required=True)
