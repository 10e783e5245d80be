from flask import request

from kms.auth import service
from kms.auth.tokens import mint_token
from kms.errors import Unauthorized
from kms.observability.metrics import counts_as
from kms.web import SIGNUP_TOKEN_REFUSED
from kms.web.routing import NO_STORE, Blueprint, context
from schemas.auth import LoginRequest, SignupRequest, SignupTokenRequest, SignupTokenResponse, TokenResponse

bp = Blueprint("auth", __name__, url_prefix="/auth", description="Signup tokens, signup, login, logout")


@bp.route("/signup/generate", methods=["POST"])
@bp.arguments(SignupTokenRequest)
@bp.response(200, SignupTokenResponse)
def generate_signup_token(body):
    """Issue a one-time signup token bound to a client name (admin)."""
    token, expires_at = service.issue_signup_token(context(), body["clientname"], body["ttl"])
    return {"token": token, "expiresAt": expires_at}, NO_STORE


@bp.route("/signup", methods=["POST"])
@bp.public
@bp.arguments(SignupRequest)
@bp.response(200, TokenResponse)
def signup(body):
    """Register with a signup token; answers with an access token for the new client."""
    try:
        grant = service.signup(context(authenticated=False), body["token"], body["password"])
    except Unauthorized as refused:
        if refused.code == "invalid_signup_token":  # unknown, used, expired or forged: it stays so
            request.environ[SIGNUP_TOKEN_REFUSED] = True  # (the server answers it again itself)
        raise
    return mint_token(grant), NO_STORE


@bp.route("/login", methods=["POST"])
@bp.public
@counts_as("logins")
@bp.arguments(LoginRequest)
@bp.response(200, TokenResponse)
def login(body):
    """Exchange a client name and password for an access token."""
    grant = service.login(context(authenticated=False), body["clientname"], body["password"])
    return mint_token(grant), NO_STORE


@bp.route("/logout", methods=["POST"])
@bp.response(204)
def logout():
    """Revoke the calling token at once."""
    service.logout(context())
