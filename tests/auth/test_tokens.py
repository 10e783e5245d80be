"""Access tokens: logout and revocation take effect at once, in every server process; a token
that is forged, tampered, expired, of another kind or missing a claim is a 401, never a 500; and
the role comes from the database, not the token."""
import base64
import json
import time

import jwt
import pytest

from tests.conftest import CLIENT_PASSWORD, HttpClient, bearer, envelope, serve_in_thread, stop_server


# Revocation

def test_logout_revokes_the_token_at_once(client, auth):
    token = auth.new_client()
    assert client.post("/auth/logout", headers=bearer(token)).status_code == 204
    response = client.get("/keys", headers=bearer(token))
    assert response.status_code == 401


def test_logout_revokes_only_that_token(client, auth):
    auth.new_client("billing")
    first = auth.login("billing", CLIENT_PASSWORD)
    second = auth.login("billing", CLIENT_PASSWORD)
    client.post("/auth/logout", headers=bearer(first))
    assert client.get("/keys", headers=bearer(second)).status_code == 200


@pytest.mark.parametrize("action,method,body", [
    ("actions/disable", "post", None),
    ("role", "post", {"role": "admin"}),
    ("", "delete", None),
])
def test_disable_role_change_and_delete_revoke_tokens_at_once(client, auth, action, method, body):
    token = auth.new_client("target-svc")
    client_id = auth.client_id("target-svc")
    assert client.get("/keys", headers=bearer(token)).status_code == 200
    url = f"/clients/{client_id}" + (f"/{action}" if action else "")
    assert getattr(client, method)(url, json=body, headers=bearer(auth.admin_token)).status_code == 204
    assert client.get("/keys", headers=bearer(token)).status_code == 401


def test_revocation_is_seen_by_every_server_process(another_app, client, auth):
    token = auth.new_client()
    other = another_app()
    server, base_url = serve_in_thread(other, threads=2)
    try:
        with HttpClient(base_url) as http:
            assert http.get("/keys", headers=bearer(token)).status_code == 200
            client.post("/auth/logout", headers=bearer(token))
            assert http.get("/keys", headers=bearer(token)).status_code == 401
    finally:
        stop_server(server)


# Token hygiene

def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_bad_tokens_are_401_never_500(client, auth, secrets_env):
    good = auth.new_client()
    header, payload, signature = good.split(".")
    claims = jwt.decode(good, options={"verify_signature": False})
    expired = jwt.encode({**claims, "exp": int(time.time()) - 10}, secrets_env["JWT_SECRET"].encode(),
                         algorithm="HS256")
    forged_secret = jwt.encode(claims, b"another-secret-entirely-0123456789", algorithm="HS256")
    tampered = ".".join([header, _b64({**claims, "role": "admin"}), signature])
    alg_none = ".".join([_b64({"alg": "none", "typ": "JWT"}), _b64(claims), ""])
    for token in ["garbage", "a.b.c", tampered, alg_none, expired, forged_secret, auth.signup_token("svc-x"), ""]:
        response = client.get("/keys", headers=bearer(token))
        assert response.status_code == 401, (token[:20], response.text)
        assert response.json()["error"] == "unauthorized"
    assert client.get("/keys", headers={"Authorization": "Basic abc"}).status_code == 401
    assert client.get("/keys").status_code == 401


def test_role_is_taken_from_the_database_not_the_token(client, auth, secrets_env):
    """Even a correctly signed token that claims admin gets nothing its client's row does not allow."""
    token = auth.new_client()
    claims = jwt.decode(token, options={"verify_signature": False})
    lying = jwt.encode({**claims, "role": "admin"}, base64.urlsafe_b64decode(secrets_env["JWT_SECRET"] + "="),
                       algorithm="HS256")
    assert client.get("/keys", headers=bearer(lying)).status_code == 200  # the signature is valid ...
    assert client.get("/clients", headers=bearer(lying)).status_code == 403  # ... the role claim is not trusted


def _sign(claims, secrets_env):
    return jwt.encode(claims, base64.urlsafe_b64decode(secrets_env["JWT_SECRET"] + "="), algorithm="HS256")


@pytest.mark.parametrize("drop", ["exp", "jti", "sub", "type", "iat", "nbf"])
def test_a_correctly_signed_token_missing_a_claim_is_401(client, auth, secrets_env, drop):
    claims = jwt.decode(auth.new_client(), options={"verify_signature": False})
    claims.pop(drop, None)
    response = client.get("/keys", headers=bearer(_sign(claims, secrets_env)))
    if drop in ("iat", "nbf", "type"):  # optional (flask-jwt-extended takes a typeless token as access)
        assert response.status_code == 200
    else:
        assert envelope(response, 401)["error"] == "unauthorized"


@pytest.mark.parametrize("claim,value", [("exp", "tomorrow"), ("exp", True), ("sub", 7), ("jti", ["x"]),
                                         ("sub", "not-a-uuid")])
def test_a_correctly_signed_token_with_a_wrong_claim_type_is_401(client, auth, secrets_env, claim, value):
    claims = jwt.decode(auth.new_client(), options={"verify_signature": False})
    claims[claim] = value
    envelope(client.get("/keys", headers=bearer(_sign(claims, secrets_env))), 401)
