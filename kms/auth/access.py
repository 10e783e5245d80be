"""Who is calling: the per-request token check against the database."""
from kms import db, rows
from kms.context import Caller, Context
from kms.errors import Forbidden, Unauthorized

TOKEN_NOT_LIVE = "The token has been revoked or has expired; log in again."


def check_caller_row(kms, row, *, text_ids: bool = False):
    """Believe an `authenticate`-shaped row (session columns, then client columns) only once both
    MACs check out: a forged or revived session, or a client made admin or re-enabled in the
    database, is refused (401) and reported. `text_ids`: ids and expiry came as text."""
    rows.check_session(kms, row[:6], rows.typed_session if text_ids else None)
    rows.check_client(kms, row[6:13], status_code=401, typed=rows.typed_client if text_ids else None)


def caller_from_row(kms, row) -> Caller:
    check_caller_row(kms, row)
    return Caller(id=row[6], role=row[9], session=row[:4])


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
