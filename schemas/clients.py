from marshmallow import fields, validate

from schemas.common import Schema, StrictSchema, Timestamp


class ClientPath(StrictSchema):
    id = fields.UUID(required=True)


class Client(Schema):
    id = fields.UUID(required=True)
    clientname = fields.String(required=True)
    role = fields.String(required=True)
    status = fields.String(required=True)
    createdAt = Timestamp(required=True)
    lastLoginAt = Timestamp(allow_none=True)


class ClientList(Schema):
    clients = fields.List(fields.Nested(Client), required=True)


class RoleRequest(StrictSchema):
    role = fields.String(required=True, validate=validate.OneOf(("client", "admin")))
