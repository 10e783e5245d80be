from kms import web
from kms.auth import service
from schemas.auth import LoginRequest, SignupRequest, SignupTokenRequest, SignupTokenResponse, TokenResponse

bp = web.Blueprint("auth", __name__, url_prefix="/auth", description="Signup tokens, signup, login, logout")


@bp.route("/signup/generate", methods=["POST"])
@bp.arguments(SignupTokenRequest)
@bp.response(200, SignupTokenResponse)
def generate_signup_token(body):
    """Issue a one-time signup token bound to a client name (admin)."""
    token, expires_at = service.issue_signup_token(web.context(), body["clientname"], body["ttl"])
    return {"token": token, "expiresAt": expires_at}, web.NO_STORE


@bp.route("/signup", methods=["POST"])
@bp.doc(security=[])
@bp.arguments(SignupRequest)
@bp.response(200, TokenResponse)
def signup(body):
    """Register with a signup token; answers with an access token for the new client."""
    grant = service.signup(web.context(authenticated=False), body["token"], body["password"])
    return web.mint_token(grant), web.NO_STORE


@bp.route("/login", methods=["POST"])
@bp.doc(security=[])
@bp.arguments(LoginRequest)
@bp.response(200, TokenResponse)
def login(body):
    """Exchange a client name and password for an access token."""
    grant = service.login(web.context(authenticated=False), body["clientname"], body["password"])
    return web.mint_token(grant), web.NO_STORE


@bp.route("/logout", methods=["POST"])
@bp.response(204)
def logout():
    """Revoke the calling token at once."""
    service.logout(web.context())
