"""What every route uses between HTTP and its service: the blueprint with a total JSON parser,
path segments, whether a route is public, the caller's context, JSON answers built directly."""
import functools
import json
import re

import flask_smorest
import orjson
from flask import Response, current_app, request
from marshmallow import ValidationError
from webargs.flaskparser import FlaskParser
from werkzeug.routing import BaseConverter

from kms.context import Context
from kms.db import get_db
from kms.errors import BadRequest, Unauthorized
from kms.rules import CLIENTNAME_LENGTH, KEY_ADDRESS_PATTERN, KEY_REFERENCE_LENGTH, MAX_VERSION
from kms.web import CLAIMS, REQUEST_ID

NO_STORE = [("Cache-Control", "no-store")]
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))  # json.dumps(separators=...) builds one per call


def json_response(body: dict, headers: list[tuple[str, str]] | None = None) -> Response:
    """A JSON answer built directly, for bodies that are already plain JSON values. On the key
    routes this skips marshmallow's dump, a large part of a look-up's CPU; the route's schema
    still documents the body, and the schemathesis tests check they agree."""
    return Response(_COMPACT_JSON.encode(body).encode(), headers=headers, content_type="application/json")


def large_json_response(body: dict, headers: list[tuple[str, str]] | None = None) -> Response:
    """json_response by orjson, for answers of many or long strings (a batch of key operations:
    100 base64url values of 1 KiB took the standard encoder 0.4 to 0.9 ms, orjson 20 us). The body
    must be plain JSON values with string keys and integers within 64 bits."""
    return Response(orjson.dumps(body), headers=headers, content_type="application/json")


class Parser(FlaskParser):
    """webargs's JSON loading, made total: whatever bytes arrive, the caller gets a 400 envelope.

    json.loads itself raises RecursionError on deep nesting and ValueError on an integer literal
    past Python's 4,300-digit limit, and it accepts lone surrogates ("\\ud800"), which no database
    or hash can encode later; webargs catches none of these."""

    DEFAULT_VALIDATION_STATUS = 400

    def _raw_load_json(self, req):
        try:
            data = super()._raw_load_json(req)
        except json.JSONDecodeError:
            raise
        except (RecursionError, ValueError):
            raise json.JSONDecodeError("not a JSON value this server accepts", "?", 0) from None
        if _MAY_HOLD_SURROGATE.search(req.get_data(cache=True)) and not _is_encodable(data):
            raise json.JSONDecodeError("a string is not valid Unicode (lone surrogate)", "?", 0)
        return data


# A parsed string can get a lone surrogate only from a \uD800-\uDFFF escape (webargs decodes the body
# as strict UTF-8 first). A body without one is not walked: for a batch of key operations the walk
# costs more than the parse.
_MAY_HOLD_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")


def _is_encodable(data) -> bool:
    """Every string (and object key) in parsed JSON encodes as UTF-8. Iterative: the depth that
    json.loads allowed must not overflow the stack here either."""
    pending = [data]
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            try:
                value.encode()
            except UnicodeEncodeError:
                return False
        elif isinstance(value, dict):
            pending.extend(value.keys())
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
    return True


class Blueprint(flask_smorest.Blueprint):
    ARGUMENTS_PARSER = Parser()

    def public(self, view):
        """Declares a route callable without a bearer token (every other route needs one before
        anything else), in the app's check and in /openapi.json alike. Put it below `route`."""
        view.kms_public = True
        return self.doc(security=[])(view)


    def json_object(self, schema, **kwargs):
        """`arguments`, for a body its route checks itself (`schema` documents it and lets any JSON
        object through as it came): a body that is a JSON object goes to the route without webargs'
        machinery, a sixth of the CPU a single server-side decrypt took; anything else goes through
        `arguments`, for the same answer as ever."""
        def decorator(view):
            parsed = self.arguments(schema, **kwargs)(view)

            @functools.wraps(parsed)
            def route(*args, **route_kwargs):
                body = _json_object(request._get_current_object())
                if body is None:
                    return parsed(*args, **route_kwargs)
                return view(*args, body, **route_kwargs)
            return route
        return decorator


def _json_object(this_request) -> dict | None:
    """The body as a JSON object, when it is one that Parser would load as it is (what _check_request
    let through is JSON by its Content-Type); None for anything else, with no error."""
    data = this_request.get_data(cache=True)
    if not data or _MAY_HOLD_SURROGATE.search(data):
        return None
    try:
        body = json.loads(data.decode())
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    return body if isinstance(body, dict) else None


def is_public(view) -> bool:
    return getattr(view, "kms_public", False)


class _PathSegment(BaseConverter):
    """Any one path segment, as werkzeug's default; the route validates it after authenticating
    the caller (400 with the envelope), and /openapi.json documents what it accepts."""


class KeyReferenceSegment(_PathSegment):
    pass


class VersionSegment(_PathSegment):
    """Any segment but `generate`, so that /keys/actions/generate is not also the GET of version
    "generate" of a key named "actions" (its Allow header then names POST alone)."""
    regex = "(?!generate$)[^/]+"
    part_isolating = True  # one segment (werkzeug infers False from the "/" in the regex: a slower match)


class ClientIdSegment(_PathSegment):
    pass


class GrantIdSegment(_PathSegment):
    pass


# converter name -> (class, the parameter's schema in /openapi.json)
PATH_SEGMENTS = {
    "keyref": (KeyReferenceSegment, {"type": "string", "pattern": KEY_ADDRESS_PATTERN,
                                     "minLength": KEY_REFERENCE_LENGTH[0],
                                     "maxLength": CLIENTNAME_LENGTH[1] + 1 + KEY_REFERENCE_LENGTH[1]}),
    "version": (VersionSegment, {"type": "integer", "minimum": 1, "maximum": MAX_VERSION}),
    "clientid": (ClientIdSegment, {"type": "string", "format": "uuid"}),
    "grantid": (GrantIdSegment, {"type": "string", "format": "uuid"}),
}


def context(*, authenticated: bool = True, db_patience: float = 0.0) -> Context:
    """The request's Context. `db_patience`: how long opening a database connection may keep
    failing before the request gives up (kms.db.LOOKUP_PATIENCE_S for look-ups)."""
    kms = current_app.extensions["kms"]
    this_request = request._get_current_object()  # one context-local hop, not one per attribute
    environ = this_request.environ
    claims = None
    if authenticated:
        claims = environ.get(CLAIMS)  # verified before the route ran (kms.auth.tokens)
        if claims is None:
            raise Unauthorized()
    return Context(kms=kms, conn=get_db(db_patience), request_id=environ.get(REQUEST_ID), source_ip=this_request.remote_addr,
                   claims=claims)


def parse_path(schema, **values):
    """Validate path parameters with a schema's fields; a malformed one is a 400, like a malformed
    body. Field by field: path schemas have no schema-level rules, and Schema.load's machinery
    costs more than the field checks themselves on the key look-up."""
    parsed, problems = {}, {}
    for name, value in values.items():
        try:
            parsed[name] = schema.fields[name].deserialize(value)
        except ValidationError as error:
            problems[name] = error.messages
    if problems:
        raise BadRequest("Some path parameters are not valid; see fields.", code="validation_failed",
                         fields=problems)
    return parsed
