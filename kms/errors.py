"""One error hierarchy, one JSON envelope: {"error", "message", "requestId"[, "fields"]}.

Messages are written for the caller and never carry secrets or internals.
"""
import logging

import psycopg2
import psycopg2.errors
from flask import jsonify
from werkzeug.exceptions import HTTPException

from kms.keyproviders.base import KekUnavailable
from kms.observability import request_id

log = logging.getLogger("kms.errors")


class ApiError(Exception):
    status = 500
    code = "internal_error"
    message = "The server failed to handle the request; try again later."

    def __init__(self, message: str | None = None, *, code: str | None = None, fields: dict | None = None,
                 headers: dict | None = None):
        super().__init__(message or self.message)
        self.message = message or self.message
        self.code = code or self.code
        self.fields = fields
        self.headers = headers or {}


class BadRequest(ApiError):
    status, code, message = 400, "bad_request", "The request is not valid."


class Unauthorized(ApiError):
    status, code, message = 401, "unauthorized", "Authentication is required; log in and send the token as a Bearer token."


class Forbidden(ApiError):
    status, code, message = 403, "forbidden", "This action needs the admin role."


class NotFound(ApiError):
    status, code, message = 404, "not_found", "No such resource."


class Conflict(ApiError):
    status, code, message = 409, "conflict", "The request conflicts with the current state."


class Gone(ApiError):
    status, code, message = 410, "gone", "This resource is no longer served."


class Throttled(ApiError):
    status, code, message = 429, "too_many_requests", "Too many attempts; wait before trying again."

    def __init__(self, retry_after: int, message: str | None = None):
        super().__init__(message, headers={"Retry-After": str(max(1, int(retry_after)))})


class ServiceUnavailable(ApiError):
    status, code, message = 503, "service_unavailable", "The database is unavailable; retry shortly."

    def __init__(self, message: str | None = None, retry_after: int = 2):
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class StoredDataCorrupt(ApiError):
    """Stored ciphertext failed authentication: never serve anything in its place."""
    status, code, message = 500, "integrity_error", "Stored key material failed its integrity check; an operator has been alerted."


class IntegrityFailure(ApiError):
    """A stored row failed its MAC check (kms.rows): it is not obeyed. The caller gets 401 for a
    session or signup token (as if it did not exist) and 500 integrity_error for anything else;
    the operator gets a log line, a metric and an audit event (register_error_handlers)."""
    code = "integrity_error"
    message = StoredDataCorrupt.message

    def __init__(self, table: str, row_id, status: int = 500):
        if status == 401:
            super().__init__(Unauthorized.message, code="unauthorized")
        else:
            super().__init__()
        self.status = status
        self.table = table
        self.row_id = str(row_id)


HTTP_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    409: "conflict", 410: "gone", 413: "payload_too_large", 415: "unsupported_media_type",
    422: "bad_request", 429: "too_many_requests", 500: "internal_error", 503: "service_unavailable",
}
HTTP_MESSAGES = {
    404: "No such route.",
    405: "This method is not allowed on this route.",
    413: "The request body is too large.",
    415: "Send the body as JSON with Content-Type: application/json.",
    500: ApiError.message,
}


def error_response(status: int, code: str, message: str, fields: dict | None = None, headers: dict | None = None):
    body = {"error": code, "message": message, "requestId": request_id()}
    if fields:
        body["fields"] = fields
    response = jsonify(body)
    response.status_code = status
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


def handle_http_exception(error: HTTPException):
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


def register_error_handlers(app):
    @app.errorhandler(ApiError)
    def _api_error(error: ApiError):
        if error.status >= 500:
            log.error("request failed", extra={"error_code": error.code})
        return error_response(error.status, error.code, error.message, error.fields, error.headers)

    @app.errorhandler(IntegrityFailure)
    def _integrity_failure(error: IntegrityFailure):
        report_integrity_failure(error.table, error.row_id)
        return error_response(error.status, error.code, error.message)

    @app.errorhandler(KekUnavailable)
    def _kek_unavailable(_error):
        log.warning("a KEK's token does not answer", extra={"error_code": "KekUnavailable"})
        return _api_error(ServiceUnavailable("The key encryption key's HSM does not answer; retry shortly."))

    @app.errorhandler(psycopg2.errors.ReadOnlySqlTransaction)
    def _read_only(_error):
        # The server this session is on was demoted to a standby: never use the session again.
        from flask import g
        conn = g.get("db")
        if conn is not None:
            conn.close()  # the pool retires it, and its siblings, when it is given back
        log.warning("database session on a read-only server", extra={"error_code": "ReadOnlySqlTransaction"})
        return _api_error(ServiceUnavailable())

    @app.errorhandler(psycopg2.OperationalError)
    @app.errorhandler(psycopg2.InterfaceError)
    def _database_down(error):
        # Lock or statement time-outs are OperationalErrors too: both mean "try again".
        log.warning("database unavailable", extra={"error_code": type(error).__name__})
        return _api_error(ServiceUnavailable())

    @app.errorhandler(Exception)
    def _unexpected(error):
        if isinstance(error, HTTPException):
            return handle_http_exception(error)
        # The exception's text may quote data; log the type and where, never the message.
        log.error("unhandled exception", extra={"error_code": type(error).__name__,
                                                 "where": _where(error)})
        return error_response(500, "internal_error", ApiError.message)


def _where(error: BaseException) -> str:
    tb = error.__traceback__
    frames = []
    while tb is not None:
        frames.append(f"{tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno}")
        tb = tb.tb_next
    return " > ".join(frames[-6:])


def report_integrity_failure(table: str, row_id: str):
    """Tell the operator a stored row failed its check: a log line (no secrets: a table and a row
    id) and, within a request, a metric and an audit event in a transaction of its own."""
    from flask import has_request_context
    log.error("stored row failed its integrity check; not obeyed", extra={"table": table, "rowId": row_id})
    if not has_request_context():
        return
    try:
        from kms.web import context
        ctx = context(authenticated=False)
        ctx.kms.metrics.integrity_failures.labels(table).inc()
        from kms.audit.service import record_alone
        record_alone(ctx, "integrity.failure", "detected", target=f"{table}:{row_id}", actor="kms")
    except Exception as failure:  # noqa: BLE001 - the answer to the caller must not depend on this
        log.error("could not record an integrity failure", extra={"error_code": type(failure).__name__})
