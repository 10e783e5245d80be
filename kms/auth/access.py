"""Who is calling: the per-request token check against the database."""
from kms import db
from kms.context import Caller, Context
from kms.errors import Forbidden, Unauthorized

TOKEN_NOT_LIVE = "The token has been revoked or has expired; log in again."


def authenticate(cur, ctx: Context) -> Caller:
    """The token's session must be live and its client active: revocation takes effect at once."""
    if ctx.claims is None:
        raise Unauthorized()
    db.execute_prepared(cur, "authenticate", {"jti": ctx.claims.jti, "client_id": ctx.claims.client_id})
    row = cur.fetchone()
    if row is None:
        raise Unauthorized(TOKEN_NOT_LIVE)
    return Caller(id=row[0], role=row[1])


def require_admin(cur, ctx: Context) -> Caller:
    caller = authenticate(cur, ctx)
    if not caller.is_admin:
        raise Forbidden()
    return caller
