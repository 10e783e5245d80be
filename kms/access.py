"""Who is calling: the per-request check of a bearer token's session (and its client) against the
database, which every domain's service runs first. Below the domains: it knows rows, not workflows."""
from kms import db
from kms.context import Caller, Context
from kms.errors import Forbidden, Unauthorized
from kms.rows import CLIENTS, SESSIONS

TOKEN_NOT_LIVE = "The token has been revoked or has expired; log in again."


def caller_from_row(kms, row) -> Caller:
    """Believe an `authenticate` row (its session_* and client_* columns) only once both MACs
    check out: a forged or revived session, or a client made admin or re-enabled in the
    database, is refused (401) and reported."""
    SESSIONS.check(kms, row, prefix="session_")
    CLIENTS.check(kms, row, prefix="client_", refused_with=401)
    return Caller(id=row.client_id, role=row.client_role,
                  session=(row.session_jti, row.session_client_id, row.session_expires_at, row.session_epoch,
                           row.session_revision))


def authenticate(cur, ctx: Context) -> Caller:
    """The token's session must be live and its client active: revocation takes effect at once."""
    if ctx.claims is None:
        raise Unauthorized()
    db.execute_prepared(cur, "authenticate", {"jti": ctx.claims.jti, "client_id": ctx.claims.client_id})
    row = cur.fetchone()
    if row is None:
        raise Unauthorized(TOKEN_NOT_LIVE)
    return caller_from_row(ctx.kms, row)


def require_admin(cur, ctx: Context) -> Caller:
    caller = authenticate(cur, ctx)
    if not caller.is_admin:
        raise Forbidden()
    return caller
