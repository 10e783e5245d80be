"""Signup tokens (issued by an admin or `kms signup-token`) and signup with one: once, before it
expires, with a password the policy accepts. (Tokens of the original's admin tool:
tests/test_go_clients.py.)"""
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import pytest

from tests.conftest import CLIENT_PASSWORD, AuthActions, HttpClient, bearer, post_from, serve_in_thread, stop_server


def signup(client, token, password=CLIENT_PASSWORD):
    return client.post("/auth/signup", json={"token": token, "password": password})


# Signup tokens

def test_admin_issues_a_signup_token_with_expiry(client, auth):
    response = client.post("/auth/signup/generate", json={"clientname": "billing", "ttl": 3600_000},
                           headers=bearer(auth.admin_token))
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    expires = datetime.fromisoformat(response.json()["expiresAt"].replace("Z", "+00:00"))
    assert timedelta(minutes=59) < expires - datetime.now(timezone.utc) <= timedelta(hours=1)


def test_signup_token_default_ttl_is_24_hours(client, auth):
    body = client.post("/auth/signup/generate", json={"clientname": "billing"}, headers=bearer(auth.admin_token)).json()
    expires = datetime.fromisoformat(body["expiresAt"].replace("Z", "+00:00"))
    assert timedelta(hours=23, minutes=59) < expires - datetime.now(timezone.utc) <= timedelta(hours=24)


@pytest.mark.parametrize("ttl", [0, -5, "soon", "3600", 1.5, 31 * 24 * 3600_000])
def test_bad_signup_token_ttl_is_400(client, auth, ttl):
    response = client.post("/auth/signup/generate", json={"clientname": "billing", "ttl": ttl},
                           headers=bearer(auth.admin_token))
    assert response.status_code == 400
    assert "ttl" in response.json()["fields"]


@pytest.mark.parametrize("name", ["abc", "x" * 65, "bad name", "naïve-svc", "under_score"])
def test_malformed_clientname_is_400(client, auth, name):
    response = client.post("/auth/signup/generate", json={"clientname": name}, headers=bearer(auth.admin_token))
    assert response.status_code == 400 and "clientname" in response.json()["fields"]


def test_only_admins_issue_signup_tokens(client, auth):
    assert client.post("/auth/signup/generate", json={"clientname": "billing"}).status_code == 401
    client_token = auth.new_client()
    response = client.post("/auth/signup/generate", json={"clientname": "billing"}, headers=bearer(client_token))
    assert response.status_code == 403 and response.json()["error"] == "forbidden"


def test_signup_token_for_an_existing_name_is_409(client, auth):
    auth.new_client("billing")
    response = client.post("/auth/signup/generate", json={"clientname": "billing"}, headers=bearer(auth.admin_token))
    assert response.status_code == 409


# Signup

def test_signup_returns_a_working_token(client, auth):
    response = signup(client, auth.signup_token("billing"))
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"token", "expiresAt"}  # no ttl: the original's Go SDK deadlocks on it
    assert response.headers["Cache-Control"] == "no-store"
    assert client.get("/keys", headers=bearer(body["token"])).status_code == 200


def test_signup_token_works_once(client, auth):
    token = auth.signup_token("billing")
    assert signup(client, token).status_code == 200
    second = signup(client, token)
    assert second.status_code == 401 and second.json()["error"] == "invalid_signup_token"


@pytest.mark.real_password_hashing
def test_parallel_signups_with_one_token_create_exactly_one_client(make_app):
    # Enough server threads that all ten are admitted to hashing and race to consume the token.
    app = make_app(SERVER_THREADS=40)
    server, base_url = serve_in_thread(app, threads=40)
    try:
        with HttpClient(base_url) as http:
            token = AuthActions(http).signup_token("billing")
            with ThreadPoolExecutor(10) as pool:  # from ten addresses: a source may hold only half the places
                statuses = sorted(pool.map(lambda n: post_from(base_url, f"127.0.0.{n + 2}", "/auth/signup", {"token": token, "password": CLIENT_PASSWORD}), range(10)))
    finally:
        stop_server(server)
    assert statuses == [200] + [401] * 9
    with app.extensions["kms"].pool.connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM clients WHERE role = 'client'")
        assert cur.fetchone()[0] == 1


def test_expired_signup_token_is_401(client, auth, db):
    token = auth.signup_token("billing")
    with db.cursor() as cur:
        cur.execute("UPDATE signup_tokens SET expires_at = now() - interval '1 second'")
    assert signup(client, token).status_code == 401


@pytest.mark.parametrize("forged", ["kms_st_" + "A" * 43, "garbage", "x"])
def test_forged_signup_token_is_401(client, forged):
    assert signup(client, forged).status_code == 401


def test_access_token_is_not_a_signup_token(client, auth):
    assert signup(client, auth.admin_token).status_code == 401


def test_weak_password_is_400_names_what_is_missing_and_keeps_the_token(client, auth):
    token = auth.signup_token("billing")
    response = signup(client, token, password="alllowercaseletters")
    assert response.status_code == 400
    problems = " ".join(response.json()["fields"]["password"])
    assert "uppercase" in problems and "alllowercaseletters" not in response.text
    assert signup(client, token).status_code == 200  # the refused signup did not use the token up


@pytest.mark.parametrize("password", ["Sh0rt!", "x" * 129 + "A1!", "NoDigitsNoSymbols"])
def test_password_policy(client, auth, password):
    assert signup(client, auth.signup_token("billing"), password).status_code == 400


# The CLI

def test_cli_signup_token_prints_the_token_on_its_last_line(runner, client):
    result = runner.invoke(args=["kms", "signup-token", "--name", "cli-made-svc", "--ttl", "2h"])
    assert result.exit_code == 0, result.output
    token = result.stdout.strip().splitlines()[-1]
    assert token.startswith("kms_st_")
    assert signup(client, token).status_code == 200


@pytest.mark.parametrize("ttl", ["0h", "31d", "forever", "-1h"])
def test_cli_signup_token_rejects_bad_ttl(runner, ttl, db):
    result = runner.invoke(args=["kms", "signup-token", "--name", "cli-made-svc", "--ttl", ttl])
    assert result.exit_code == 2  # click's usage error, not a crash
    assert "Error: Invalid value for --ttl: " in result.output and "Traceback" not in result.output
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM signup_tokens")
        assert cur.fetchone()[0] == 0
