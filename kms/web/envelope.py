"""The one JSON error envelope, `{"error", "message", "requestId"[, "fields"]}`, and the Flask
error handlers that answer every failure with it.

Every answer that is not a success is built by `envelope_json`: Flask's (below), the login flood
shedder's (kms.auth.flood) and waitress's own refusals (kms.serving.http).
"""
import json
import logging
from typing import Callable

import psycopg2
import psycopg2.errors
from flask import Response, g, request
from werkzeug.exceptions import HTTPException

from kms.crypto import KekMissing
from kms.errors import ApiError, IntegrityFailure, KekNotHeld, ServiceUnavailable
from kms.keyproviders.base import KekUnavailable
from kms.failures import OncePer, log_failure
from kms.web import REQUEST_ID

log = logging.getLogger("kms.errors")
_FAILURES = OncePer()

HTTP_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    409: "conflict", 410: "gone", 413: "payload_too_large", 415: "unsupported_media_type",
    422: "bad_request", 429: "too_many_requests", 431: "request_header_fields_too_large", 500: "internal_error",
    501: "not_implemented", 503: "service_unavailable",
}
HTTP_MESSAGES = {
    404: "No such route.",
    405: "This method is not allowed on this route.",
    413: "The request body is too large.",
    415: "Send the body as JSON with Content-Type: application/json.",
    500: ApiError.message,
}

# Sorted keys, no spaces, a final newline: what Flask's jsonify wrote before this builder existed.
_ENCODER = json.JSONEncoder(separators=(",", ":"), sort_keys=True)


def envelope_json(code: str, message: str, request_id: str | None, fields: dict | None = None) -> bytes:
    body = {"error": code, "message": message, "requestId": request_id}
    if fields:
        body["fields"] = fields
    return (_ENCODER.encode(body) + "\n").encode()


def error_response(status: int, code: str, message: str, fields: dict | None = None,
                   headers: dict | None = None) -> Response:
    response = Response(envelope_json(code, message, request.environ.get(REQUEST_ID), fields), status=status,
                        content_type="application/json")
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _validation_fields(messages) -> dict:
    """webargs keys messages by location ({"json": {...}}); callers only care about the field."""
    fields = {}
    for location_messages in (messages or {}).values():
        if isinstance(location_messages, dict):
            for name, problems in location_messages.items():
                fields[name] = problems if isinstance(problems, list) else [problems]
        else:
            fields["_body"] = location_messages if isinstance(location_messages, list) else [location_messages]
    return fields


def handle_http_exception(error: HTTPException) -> Response:
    status = error.code or 500
    data = getattr(error, "data", None) or {}
    if status in (400, 422) and "messages" in data:
        fields = _validation_fields(data["messages"])
        if "_body" in fields and len(fields) == 1:
            return error_response(400, "bad_request", "The body must be a JSON object.", fields)
        return error_response(400, "validation_failed", "Some fields are not valid; see fields.", fields)
    message = HTTP_MESSAGES.get(status) or (error.description if status < 500 else ApiError.message)
    headers = dict(data.get("headers") or {})
    if getattr(error, "valid_methods", None):  # 405 names what is allowed (RFC 9110)
        headers["Allow"] = ", ".join(sorted(error.valid_methods))
    return error_response(status, HTTP_CODES.get(status, "error"), message, headers=headers)


def register_error_handlers(app, report_integrity_failure: Callable[..., None]):
    """Every exception a request can end in becomes the envelope. `report_integrity_failure(table,
    row_id)` tells the operator about a stored row that failed its check (the app factory passes
    the audit domain's reporter: this layer knows no domain)."""

    @app.errorhandler(ApiError)
    def _api_error(error: ApiError):
        if error.status >= 500:
            log_failure(log, logging.ERROR, "request failed", error, _FAILURES)
        return error_response(error.status, error.code, error.message, error.fields, error.headers)

    @app.errorhandler(IntegrityFailure)
    def _integrity_failure(error: IntegrityFailure):
        report_integrity_failure(error.table, error.row_id, rolled_back=error.rolled_back)
        return error_response(error.status, error.code, error.message)

    @app.errorhandler(KekUnavailable)
    def _kek_unavailable(_error):
        log_failure(log, logging.WARNING, "a KEK's token does not answer", _error, _FAILURES)
        return _api_error(ServiceUnavailable("The key encryption key's HSM does not answer; retry shortly."))

    @app.errorhandler(KekMissing)
    def _kek_missing(error: KekMissing):
        # (a key look-up answers this itself, counted; this is any other secret under a missing KEK)
        log.warning("a stored secret is wrapped under a KEK version this server does not hold; answered 503 "
                    "kek_unavailable", extra={"kekVersion": error.version})
        return _api_error(KekNotHeld())

    @app.errorhandler(psycopg2.errors.ReadOnlySqlTransaction)
    def _read_only(_error):
        # The server this connection reaches was demoted to a standby: never use the connection again.
        conn = g.get("db")
        if conn is not None:
            conn.close()  # the pool retires it, and its siblings, when it is given back
        log_failure(log, logging.WARNING, "database session on a read-only server", _error, _FAILURES)
        return _api_error(ServiceUnavailable())

    @app.errorhandler(psycopg2.OperationalError)
    @app.errorhandler(psycopg2.InterfaceError)
    def _database_down(error):
        # Lock or statement time-outs are OperationalErrors too: both mean "try again".
        log_failure(log, logging.WARNING, "database unavailable", error, _FAILURES)
        return _api_error(ServiceUnavailable())

    @app.errorhandler(Exception)
    def _unexpected(error):
        if isinstance(error, HTTPException):
            return handle_http_exception(error)
        # The exception's text may quote data: its cause is scrubbed (kms.failures.cause).
        log_failure(log, logging.ERROR, "unhandled exception", error, _FAILURES, where=_where(error))
        return error_response(500, "internal_error", ApiError.message)


def _where(error: BaseException) -> str:
    tb = error.__traceback__
    frames = []
    while tb is not None:
        frames.append(f"{tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno}")
        tb = tb.tb_next
    return " > ".join(frames[-6:])
