"""Bearer tokens: verified once per token and remembered until they expire, minted for a new
session, and every token problem answered with the 401 envelope.

Verifying a JWT costs more CPU than the rest of a key look-up, and a service sends the same token
many times, so only the signature check is remembered: every request still checks the token's
session row in the database (kms.access), so logout and revocation take effect at once.
"""
import hashlib
import time
import uuid
from datetime import timedelta

import flask_jwt_extended.exceptions
import jwt.exceptions
from flask_jwt_extended import JWTManager, create_access_token, get_jwt, verify_jwt_in_request

from kms.auth.service import Grant
from kms.context import TokenClaims
from kms.errors import Unauthorized
from kms.expiring import ExpiringMap
from kms.web import CLAIMS
from kms.web.envelope import error_response


REFUSED_MEMORY_S = 60.0  # how long a refused token is answered 401 without looking at it again


NOT_OURS = "The token is not a KMS access token."


class VerifiedTokenCache:
    """Tokens verified (their claims, until they expire) and tokens refused (their 401 message, for
    REFUSED_MEMORY_S): the server answers a refused token again before Flask (kms.serving.early).
    What made a token fail (its signature, form, type or expiry) does not change with time."""

    def __init__(self, size: int = 4096):
        self._entries = ExpiringMap(size)
        self._refused = ExpiringMap(size)

    @staticmethod
    def _key(token: str) -> bytes:
        return hashlib.sha256(token.encode()).digest()  # tokens themselves are not kept

    def get(self, token: str):
        return self._entries.get(self._key(token), time.time())  # a JWT's exp is wall-clock time

    def put(self, token: str, claims, expires_at: float):
        self._entries.put(self._key(token), claims, expires_at)

    def refused(self, token: str) -> str | None:
        """The message `token` was refused with, if it was lately."""
        return self._refused.get(self._key(token), time.monotonic())

    def refuse(self, token: str, message: str):
        self._refused.put(self._key(token), message, time.monotonic() + REFUSED_MEMORY_S)


def bearer_claims(kms, header: str) -> TokenClaims:
    """Verify the bearer token (the Authorization header) once per token: its signature, expiry
    and type (flask-jwt-extended). Whether its session is still live is checked by the service,
    against the database."""
    cache = kms.verified_tokens
    cached = cache.get(header)
    if cached is not None:
        return cached
    try:
        verify_jwt_in_request()
    except jwt.exceptions.ImmatureSignatureError:  # issued in the future (another server's clock): not yet
        raise
    except (flask_jwt_extended.exceptions.JWTExtendedException, jwt.exceptions.PyJWTError):
        if header:
            cache.refuse(header, Unauthorized.message)  # (the 401 the error handlers answer: _unauthorized)
        raise
    claims = get_jwt()
    try:
        verified = TokenClaims(client_id=uuid.UUID(claims["sub"]), jti=uuid.UUID(claims["jti"]))
        expires = claims["exp"]
        if not isinstance(expires, int) or isinstance(expires, bool):  # we never sign a token without exp
            raise ValueError(expires)
    except (KeyError, TypeError, ValueError, AttributeError):
        cache.refuse(header, NOT_OURS)
        raise Unauthorized(NOT_OURS) from None
    cache.put(header, verified, expires)
    return verified


def verify_bearer_first(kms, this_request):
    """Before a route parses its body or path: a caller without a valid token gets 401 and
    learns nothing of what the route would accept. The claims go in the environ for the route's
    context (kms.web.routing.context). The server may have found them in the verified-token cache
    already, when it chose which request to serve first (kms.serving.dispatch)."""
    environ = this_request.environ
    if CLAIMS not in environ:
        environ[CLAIMS] = bearer_claims(kms, this_request.headers.get("Authorization", ""))


def mint_token(grant: Grant) -> dict:
    token = create_access_token(
        identity=str(grant.client_id),
        additional_claims={"jti": str(grant.jti), "role": grant.role},
        expires_delta=timedelta(milliseconds=grant.ttl_ms),
    )
    # No `ttl`: the original's Go SDK decodes it as a time.Duration (nanoseconds) and deadlocks.
    return {"token": token, "expiresAt": grant.expires_at}


def _unauthorized(*_args):
    return error_response(401, "unauthorized", Unauthorized.message)


def init_jwt(app):
    """flask-jwt-extended answers token problems with its own bodies; make every one of them
    (missing, garbage, tampered, alg none, expired, wrong type) our 401 envelope."""
    manager = JWTManager(app)
    for loader in (manager.unauthorized_loader, manager.invalid_token_loader, manager.expired_token_loader,
                   manager.revoked_token_loader, manager.needs_fresh_token_loader,
                   manager.token_verification_failed_loader, manager.user_lookup_error_loader):
        loader(_unauthorized)
    handlers = app.error_handler_spec[None][None]
    for exception_class in list(handlers):
        if issubclass(exception_class, (flask_jwt_extended.exceptions.JWTExtendedException,
                                        jwt.exceptions.PyJWTError)):
            handlers[exception_class] = _unauthorized
    app.register_error_handler(jwt.exceptions.PyJWTError, _unauthorized)
