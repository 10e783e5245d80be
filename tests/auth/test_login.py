"""Login: what it answers, in how many round trips, the same for every kind of failure; failed logins
throttled per name and per address, across server processes, and a lock an admin lifts; creating
an admin from the command line. (Password hashing and login floods: test_passwords.py.)"""
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import jwt
import pytest

from tests.conftest import (ADMIN_NAME, ADMIN_PASSWORD, CLIENT_PASSWORD, WRONG_PASSWORD, HttpClient, bearer,
                            serve_in_thread, stop_server)


# Login

def test_login_returns_token_and_expiry_without_ttl(client):
    response = client.post("/auth/login", json={"clientname": ADMIN_NAME, "password": ADMIN_PASSWORD})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"token", "expiresAt"}
    expires = datetime.fromisoformat(body["expiresAt"].replace("Z", "+00:00"))
    assert timedelta(minutes=14, seconds=50) < expires - datetime.now(timezone.utc) <= timedelta(minutes=15)
    assert response.headers["Cache-Control"] == "no-store"
    claims = jwt.decode(body["token"], options={"verify_signature": False})
    assert claims["role"] == "admin" and uuid.UUID(claims["jti"]) and uuid.UUID(claims["sub"])


def test_unknown_client_wrong_password_and_disabled_client_look_alike(client, auth):
    auth.new_client("disabled-svc")
    client_id = auth.client_id("disabled-svc")
    client.post(f"/clients/{client_id}/actions/disable", headers=bearer(auth.admin_token))
    answers = [
        client.post("/auth/login", json={"clientname": "no-such-svc", "password": CLIENT_PASSWORD}),
        client.post("/auth/login", json={"clientname": ADMIN_NAME, "password": "Wrong-passw0rd!"}),
        client.post("/auth/login", json={"clientname": "disabled-svc", "password": CLIENT_PASSWORD}),
    ]
    assert {r.status_code for r in answers} == {401}
    assert len({(r.json()["error"], r.json()["message"]) for r in answers}) == 1


def test_a_login_makes_five_round_trips_to_the_database(client, monkeypatch):
    """Each round trip ends with the server thread queueing for the GIL behind every other request
    of its process, so a login sends what it can together (kms.db's deferred statements)."""
    from kms import db
    trips = {}  # connection -> what was sent on it, one entry a round trip
    original = db._TransactionCursor.execute

    def counted(cursor, query, vars=None):
        trips.setdefault(cursor.connection, []).append(query)
        return original(cursor, query, vars)

    def login(password):
        trips.clear()
        status = client.post("/auth/login", json={"clientname": ADMIN_NAME, "password": password}).status_code
        on_its_connection = [sent for sent in trips.values() if any("login_failures" in str(q) for q in sent)]
        return status, on_its_connection

    monkeypatch.setattr(db._TransactionCursor, "execute", counted)
    login(ADMIN_PASSWORD)  # the audit record's statement gets prepared on this connection, once
    for password, status in ((ADMIN_PASSWORD, 200), ("Wrong-passw0rd!", 401)):
        answered, (sent,) = login(password)
        assert answered == status and len(sent) == 5, sent


def test_failed_logins_are_throttled_per_clientname(client):
    for _ in range(5):
        assert client.post("/auth/login", json={"clientname": ADMIN_NAME, "password": "Wrong-passw0rd!"}).status_code == 401
    response = client.post("/auth/login", json={"clientname": ADMIN_NAME, "password": ADMIN_PASSWORD})
    assert response.status_code == 429
    assert 0 < int(response.headers["Retry-After"]) <= 15 * 60
    assert response.json()["error"] == "too_many_requests"


@pytest.fixture
def denied_logins_fail_at_commit(db):
    """An injected fault: the audit event of a refused password makes its transaction fail (it is
    one of the statements sent with the COMMIT)."""
    with db.cursor() as cur:
        cur.execute("""
            CREATE FUNCTION fail_denied_login() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.action = 'login' AND NEW.outcome = 'denied' THEN
                    RAISE EXCEPTION 'injected failure';
                END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER fail_denied_login BEFORE INSERT ON audit_events
                FOR EACH ROW EXECUTE FUNCTION fail_denied_login();""")
    yield
    with db.cursor() as cur:
        cur.execute("DROP TRIGGER fail_denied_login ON audit_events; DROP FUNCTION fail_denied_login()")


def test_a_failed_login_is_counted_though_its_transaction_fails_at_commit(client, app, db, monkeypatch,
                                                                          denied_logins_fail_at_commit):
    passwords = app.extensions["kms"].passwords
    checked = []
    verify_login = passwords.verify_login

    def counted(*args, **kwargs):
        checked.append(1)
        return verify_login(*args, **kwargs)

    monkeypatch.setattr(passwords, "verify_login", counted)
    statuses = [client.post("/auth/login", json={"clientname": ADMIN_NAME, "password": WRONG_PASSWORD}).status_code
                for _ in range(8)]
    assert statuses[:5] == [500] * 5 and statuses[5:] == [429] * 3, statuses
    assert len(checked) == 5  # no password checked past the limit
    with db.cursor() as cur:
        cur.execute("SELECT scope, count(*) FROM login_failures GROUP BY scope ORDER BY scope")
        assert cur.fetchall() == [("address", 5), ("client", 5)]


def test_failed_logins_are_throttled_per_source_address(make_app, base_env):
    app = make_app(LOGIN_MAX_FAILURES_PER_ADDRESS=3)
    server, base_url = serve_in_thread(app, threads=2)
    try:
        with HttpClient(base_url) as http:
            for i in range(3):
                assert http.post("/auth/login", json={"clientname": f"ghost-{i}-svc",
                                                      "password": "Wrong-passw0rd!"}).status_code == 401
            response = http.post("/auth/login", json={"clientname": ADMIN_NAME, "password": ADMIN_PASSWORD})
            assert response.status_code == 429 and int(response.headers["Retry-After"]) > 0
    finally:
        stop_server(server)


def test_throttle_holds_across_server_processes(another_app, client):
    """Failures are counted in PostgreSQL, so a second app (another process) sees them."""
    for _ in range(5):
        client.post("/auth/login", json={"clientname": ADMIN_NAME, "password": "Wrong-passw0rd!"})
    other = another_app()
    server, base_url = serve_in_thread(other, threads=2)
    try:
        with HttpClient(base_url) as http:
            response = http.post("/auth/login", json={"clientname": ADMIN_NAME, "password": ADMIN_PASSWORD})
            assert response.status_code == 429
    finally:
        stop_server(server)


def test_successful_login_resets_the_clientname_failures(client):
    for _ in range(4):
        client.post("/auth/login", json={"clientname": ADMIN_NAME, "password": "Wrong-passw0rd!"})
    assert client.post("/auth/login", json={"clientname": ADMIN_NAME, "password": ADMIN_PASSWORD}).status_code == 200
    for _ in range(4):
        assert client.post("/auth/login", json={"clientname": ADMIN_NAME,
                                                "password": "Wrong-passw0rd!"}).status_code == 401


@pytest.mark.real_password_hashing
def test_parallel_guesses_never_check_more_passwords_than_the_limit_across_processes(make_app, db):
    apps = [make_app(SERVER_THREADS=40), make_app(SERVER_THREADS=40)]
    servers = [serve_in_thread(app, threads=20) for app in apps]
    try:
        def guess(i):
            base_url = servers[i % 2][1]
            with HttpClient(base_url) as http:
                return http.post("/auth/login", json={"clientname": ADMIN_NAME, "password": WRONG_PASSWORD}).status_code

        with ThreadPoolExecutor(24) as pool:
            statuses = list(pool.map(guess, range(24)))
    finally:
        for server, _ in servers:
            stop_server(server)
    assert statuses.count(401) == 5, statuses  # exactly the limit were checked
    assert set(statuses) == {401, 429}
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM audit_events WHERE action = 'login' AND outcome = 'denied'")
        assert cur.fetchone()[0] == 5


def test_an_admin_lifts_a_login_lock_through_the_api_and_it_is_audited(client, auth, db):
    token = auth.new_client("locked-svc")
    client_id = auth.client_id("locked-svc")
    admin = bearer(auth.admin_token)
    for _ in range(5):
        client.post("/auth/login", json={"clientname": "locked-svc", "password": WRONG_PASSWORD})
    assert client.post("/auth/login", json={"clientname": "locked-svc", "password": CLIENT_PASSWORD}
                       ).status_code == 429
    assert client.post(f"/clients/{client_id}/actions/unlock", headers=bearer(token)).status_code == 403
    assert client.post(f"/clients/{client_id}/actions/unlock", headers=admin).status_code == 204
    assert client.post("/auth/login", json={"clientname": "locked-svc", "password": CLIENT_PASSWORD}
                       ).status_code == 200
    assert client.post(f"/clients/{uuid.uuid4()}/actions/unlock", headers=admin).status_code == 404
    with db.cursor() as cur:
        cur.execute("SELECT target FROM audit_events WHERE action = 'client.unlock'")
        assert cur.fetchall() == [(client_id,)]


def test_the_cli_lifts_a_login_lock(client, runner, db):
    for _ in range(5):
        client.post("/auth/login", json={"clientname": ADMIN_NAME, "password": WRONG_PASSWORD})
    assert client.post("/auth/login", json={"clientname": ADMIN_NAME, "password": ADMIN_PASSWORD}).status_code == 429
    result = runner.invoke(args=["kms", "clients", "unlock", ADMIN_NAME])
    assert result.exit_code == 0 and f"unlocked {ADMIN_NAME}" in result.output
    assert client.post("/auth/login", json={"clientname": ADMIN_NAME, "password": ADMIN_PASSWORD}).status_code == 200
    assert runner.invoke(args=["kms", "clients", "unlock", "no-such-svc"]).exit_code == 1
    with db.cursor() as cur:
        cur.execute("SELECT actor FROM audit_events WHERE action = 'client.unlock'")
        assert cur.fetchall() == [("cli",)]


# The CLI


def test_cli_create_admin_reads_the_password_from_stdin(runner, client):
    result = runner.invoke(args=["kms", "create-admin", "--name", "second-admin"], input="Second-admin-passw0rd\n")
    assert result.exit_code == 0, result.output
    response = client.post("/auth/login", json={"clientname": "second-admin", "password": "Second-admin-passw0rd"})
    assert response.status_code == 200
    assert client.get("/clients", headers=bearer(response.json()["token"])).status_code == 200


def test_cli_create_admin_refuses_a_weak_password(runner, db):
    result = runner.invoke(args=["kms", "create-admin", "--name", "second-admin"], input="weak\n")
    assert result.exit_code == 1  # refused, not crashed (an exception would be a traceback)
    assert result.output.startswith("Error: password: ") and "weak" not in result.output
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM clients WHERE role = 'admin'")
        assert cur.fetchone()[0] == 1  # only the first admin
