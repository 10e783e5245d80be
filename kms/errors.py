"""One error hierarchy: each class knows its HTTP status, its snake_case code and a message
written for the caller (kms.web.envelope turns them into the JSON envelope). Pure: it needs
nothing, so every layer may raise these.

Messages never carry secrets or internals.
"""


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


class KekNotHeld(ServiceUnavailable):
    """The DEK asked for is wrapped under a KEK version this server does not hold (yet): another
    server may answer, or this one once restarted with it."""
    code = "kek_unavailable"
    message = "This server does not hold the key encryption key that key is stored under; retry shortly."

    def __init__(self, retry_after: int = 10):
        super().__init__(self.message, retry_after=retry_after)


class StoredDataCorrupt(ApiError):
    """Stored ciphertext failed authentication: never serve anything in its place."""
    status, code, message = 500, "integrity_error", "Stored key material failed its integrity check; an operator has been alerted."


class IntegrityFailure(ApiError):
    """A stored row failed its MAC check, or is an older copy of itself put back (kms.rows): it is
    not obeyed. The caller gets 401 for a session or signup token (as if it did not exist) and 500
    integrity_error for anything else; the operator gets a log line, a metric and an audit event
    (kms.audit.integrity)."""
    code = "integrity_error"
    message = StoredDataCorrupt.message

    def __init__(self, table: str, row_id, status: int = 500, *, rolled_back: bool = False):
        self.rolled_back = rolled_back
        if status == 401:
            super().__init__(Unauthorized.message, code="unauthorized")
        elif status == 404:  # a grant: as if there were none (no key is revealed to exist)
            super().__init__("No key with that reference.", code="not_found")
        else:
            super().__init__()
        self.status = status
        self.table = table
        self.row_id = str(row_id)
