from marshmallow import Schema, ValidationError, fields, validate

from kms.rules import (CLIENTNAME_PATTERN, CLIENTNAME_PROBLEM, KEY_ADDRESS_PATTERN, KEY_ADDRESS_PROBLEM,
                       KEY_REFERENCE_PATTERN, KEY_REFERENCE_PROBLEM, password_problem)
from kms.timefmt import rfc3339

# `$` would also match before a final newline: \Z does not.
CLIENTNAME = validate.Regexp(CLIENTNAME_PATTERN.removesuffix("$") + r"\Z", error=CLIENTNAME_PROBLEM)
KEY_REFERENCE = validate.Regexp(KEY_REFERENCE_PATTERN.removesuffix("$") + r"\Z", error=KEY_REFERENCE_PROBLEM)
KEY_ADDRESS = validate.Regexp(KEY_ADDRESS_PATTERN.removesuffix("$") + r"\Z", error=KEY_ADDRESS_PROBLEM)


def validate_password(password: str):
    problem = password_problem(password)
    if problem:
        raise ValidationError(problem)


class Timestamp(fields.DateTime):
    """RFC 3339, UTC, millisecond precision: 2026-11-30T10:00:00.000Z."""

    def _serialize(self, value, attr, obj, **kwargs):
        return None if value is None else rfc3339(value)


class StrictSchema(Schema):
    """Request bodies: unknown fields are rejected (marshmallow's default, stated here on purpose)."""

    class Meta:
        unknown = "raise"


class AsciiInteger(fields.Integer):
    """A whole number written in ASCII digits only, as a path segment carries it: int() alone
    would also take " 1" and fullwidth digits."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not (isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 10):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


def Milliseconds(**kwargs):
    return fields.Integer(strict=True, **kwargs)


class ErrorSchema(Schema):
    """The envelope of every error answer; documented for every route in /openapi.json."""
    error = fields.String(required=True, metadata={"description": "snake_case error code"})
    message = fields.String(required=True, metadata={"description": "what the caller can do"})
    requestId = fields.String(required=True, allow_none=True)
    problems = fields.Dict(data_key="fields", keys=fields.String(), values=fields.List(fields.String()),
                           metadata={"description": "validation problems by field"})


class StrictBoolean(fields.Boolean):
    """true or false only: marshmallow's Boolean also takes 0, 1, "yes", "off" and the like."""

    def _deserialize(self, value, attr, data, **kwargs):
        if type(value) is not bool:
            raise self.make_error("invalid")
        return value
