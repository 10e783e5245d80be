from marshmallow import fields, validate

from kms.rules import DAY_MS, PASSWORD_MAX, PASSWORD_MIN, PASSWORD_PATTERN, SIGNUP_TOKEN_MAX_TTL_MS
from schemas.common import CLIENTNAME, Milliseconds, Schema, StrictSchema, Timestamp, validate_password


class SignupTokenRequest(StrictSchema):
    clientname = fields.String(required=True, validate=CLIENTNAME)
    ttl = Milliseconds(load_default=DAY_MS, validate=validate.Range(min=1, max=SIGNUP_TOKEN_MAX_TTL_MS),
                       metadata={"description": "Lifetime in milliseconds; default 24 h, at most 30 days."})


class SignupTokenResponse(Schema):
    token = fields.String(required=True)
    expiresAt = Timestamp(required=True)


class SignupRequest(StrictSchema):
    token = fields.String(required=True, validate=validate.Length(min=1, max=4096))
    password = fields.String(required=True, validate=validate_password, load_only=True, metadata={
        "minLength": PASSWORD_MIN, "maxLength": PASSWORD_MAX, "pattern": PASSWORD_PATTERN,
        "description": "12-128 characters with at least 3 of: lowercase, uppercase, digit, symbol (any other "
                       "character)."})


class LoginRequest(StrictSchema):
    clientname = fields.String(required=True, validate=CLIENTNAME)
    password = fields.String(required=True, validate=validate.Length(min=1, max=128), load_only=True)


class TokenResponse(Schema):
    token = fields.String(required=True)
    expiresAt = Timestamp(required=True, metadata={"description": "When the token stops working."})
