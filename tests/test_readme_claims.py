"""Claims README and docs/ make that no other test performs: each is done here, against a real database."""
import json
import re
import subprocess
import time
import uuid

import psycopg2
import pytest

from tests.conftest import (ADMIN_NAME, ADMIN_PASSWORD, CLIENT_PASSWORD, KMS_COMMAND as KMS, ROOT,
                            AuthActions, HttpClient, bare_env, bearer, create_database, drop_database,
                            serve_in_thread, stop_server, with_database)


def count_events(db, action: str) -> int:
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM audit_events WHERE action = %s", (action,))
        return cur.fetchone()[0]


@pytest.mark.parametrize("setting,recorded", [("true", 3), ("false", 0)])
def test_audit_key_lookups_setting(make_app, auth_for, db, setting, recorded):
    app = make_app(AUDIT_KEY_LOOKUPS=setting)

    def look_up(http, token):
        http.post("/keys/actions/generate", json={"keyReference": "k1"}, headers=bearer(token))
        for path in ("/keys/k1", "/keys/k1/1", "/keys/missing"):
            http.get(path, headers=bearer(token))

    auth_for(app, look_up)
    assert count_events(db, "key.lookup") == recorded
    assert count_events(db, "key.generate") == 1  # changes are recorded whatever the setting


def test_nothing_hangs_a_request_waiting_on_a_lock_gets_503_after_lock_timeout(client, auth, db):
    token = auth.new_client()
    assert client.post("/keys/actions/generate", json={"keyReference": "k1"}, headers=bearer(token)).status_code == 200
    with db.cursor() as cur:  # another transaction holds the key row and does not let go
        cur.execute("BEGIN")
        cur.execute("SELECT id FROM keys FOR UPDATE")
        started = time.monotonic()
        answer = client.post("/keys/k1/actions/rotate", headers=bearer(token))
        waited = time.monotonic() - started
        cur.execute("ROLLBACK")
    assert answer.status_code == 503 and answer.headers["Retry-After"]
    assert 4.5 < waited < 8, waited  # lock_timeout is 5 s
    assert client.post("/keys/k1/actions/rotate", headers=bearer(token)).status_code == 200


def test_every_server_connection_has_statement_and_lock_timeouts(app):
    with app.extensions["kms"].pool.connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT current_setting('statement_timeout') AS statement, current_setting('lock_timeout') AS lock, "
                    "current_setting('idle_in_transaction_session_timeout') AS idle")
        assert cur.fetchone() == ("15s", "5s", "1min")


def test_appends_never_wait_for_the_sealer(client, auth, db):
    token = auth.new_client()
    with db.cursor() as cur:  # a sealer mid-seal holds its lock
        cur.execute("BEGIN")
        cur.execute("SELECT pg_advisory_xact_lock(7100002)")
        cur.execute("SELECT seq FROM audit_events ORDER BY seq FOR UPDATE")  # and the rows it is chaining
        started = time.monotonic()
        generated = client.post("/keys/actions/generate", json={"keyReference": "k1"}, headers=bearer(token))
        logged_in = client.post("/auth/login", json={"clientname": ADMIN_NAME, "password": ADMIN_PASSWORD})
        elapsed = time.monotonic() - started
        cur.execute("ROLLBACK")
    assert generated.status_code == 200 and logged_in.status_code == 200
    assert elapsed < 2.0, elapsed


def test_audit_export_after_a_sequence_number(client, auth, runner):
    auth.new_client()
    assert runner.invoke(args=["kms", "audit", "seal"]).exit_code == 0
    everything = [json.loads(line) for line in runner.invoke(args=["kms", "audit", "export"]).stdout.splitlines()]
    middle = everything[len(everything) // 2]["seq"]
    after = [json.loads(line) for line in
             runner.invoke(args=["kms", "audit", "export", "--after", str(middle)]).stdout.splitlines()]
    assert after == [event for event in everything if event["seq"] > middle] and after


def test_the_login_throttle_lifts_after_the_failure_window(make_app):
    server, base_url = serve_in_thread(make_app(LOGIN_FAILURE_WINDOW=1000))
    try:
        with HttpClient(base_url) as http:
            AuthActions(http).new_client("patient-svc")
            for _ in range(5):
                assert http.post("/auth/login", json={"clientname": "patient-svc",
                                                      "password": "Wrong-passw0rd!"}).status_code == 401
            right = {"clientname": "patient-svc", "password": CLIENT_PASSWORD}
            assert http.post("/auth/login", json=right).status_code == 429
            time.sleep(1.2)
            assert http.post("/auth/login", json=right).status_code == 200
    finally:
        stop_server(server)


def readme_grants() -> str:
    """The grants recipe of docs/SECURITY.md (README's security model moved there)."""
    text = (ROOT / "docs" / "SECURITY.md").read_text()
    section = text.split("**Append-only in the database too.**", 1)[1]
    return section.split("```sql", 1)[1].split("```", 1)[0]


def test_readme_grants_and_the_trigger_keep_the_audit_trail_append_only(pg_server, secrets_env):
    suffix = uuid.uuid4().hex[:8]
    owner, application, name = f"kms_owner_{suffix}", f"kms_app_{suffix}", f"kms_grants_{suffix}"
    admin = psycopg2.connect(pg_server)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE ROLE "{owner}" LOGIN')
        cur.execute(f'CREATE ROLE "{application}" LOGIN')
    create_database(pg_server, name)
    with admin.cursor() as cur:
        cur.execute(f'ALTER DATABASE "{name}" OWNER TO "{owner}"')
    url = with_database(pg_server, name)
    as_owner = re.sub(r"//[^@/]*@", f"//{owner}@", url)
    as_app = re.sub(r"//[^@/]*@", f"//{application}@", url)
    env = bare_env()
    env.update(secrets_env, MASTER_ADMIN_USERNAME=ADMIN_NAME, MASTER_ADMIN_PASSWORD=ADMIN_PASSWORD)
    try:
        migrated = subprocess.run([KMS, "migrate"], env={**env, "DATABASE_URL": as_owner}, capture_output=True,
                                  text=True, timeout=120)
        assert migrated.returncode == 0, migrated.stderr
        recipe = readme_grants().replace("kms_owner", owner).replace("kms_app", application)
        with psycopg2.connect(as_owner) as conn, conn.cursor() as cur:
            cur.execute(recipe)  # docs/SECURITY.md's recipe, as written
        conn.close()
        # The KMS runs as the application role: it works, and seals ...
        from kms.app import create_app
        app = create_app({**env, "DATABASE_URL": as_app, "SERVER_THREADS": "2", "AUDIT_SEAL_INTERVAL": "0"})
        server, base_url = serve_in_thread(app)
        try:
            with HttpClient(base_url) as http:
                token = AuthActions(http).new_client("granted-svc")
                assert http.post("/keys/actions/generate", json={"keyReference": "k1"},
                                 headers=bearer(token)).status_code == 200
        finally:
            stop_server(server)
            app.extensions["kms"].close()
        sealed = subprocess.run([KMS, "audit", "seal"], env={**env, "DATABASE_URL": as_app}, capture_output=True,
                                text=True, timeout=60)
        assert sealed.returncode == 0 and sealed.stdout.startswith("sealed "), sealed.stderr
        # ... but cannot rewrite what it wrote: the grants stop it, and where the grants let it
        # seal (the chain columns), the trigger refuses un-sealing
        denied, refused = psycopg2.errors.InsufficientPrivilege, psycopg2.errors.RaiseException
        for statement, error in (("DELETE FROM audit_events", denied), ("TRUNCATE audit_events", denied),
                                 ("UPDATE audit_events SET outcome = 'denied'", denied),
                                 ("UPDATE audit_events SET chain_pos = NULL, chain_hash = NULL", refused)):
            with psycopg2.connect(as_app) as conn, conn.cursor() as cur:
                with pytest.raises(error):
                    cur.execute(statement)
            conn.close()
        # and the owner, who may, is stopped by the trigger
        for statement in ("DELETE FROM audit_events", "UPDATE audit_events SET outcome = 'denied'",
                          "UPDATE audit_events SET chain_pos = NULL, chain_hash = NULL", "TRUNCATE audit_events"):
            with psycopg2.connect(as_owner) as conn, conn.cursor() as cur:
                with pytest.raises(psycopg2.errors.RaiseException):
                    cur.execute(statement)
            conn.close()
        verified = subprocess.run([KMS, "audit", "verify"], env={**env, "DATABASE_URL": as_app},
                                  capture_output=True, text=True, timeout=60)
        assert verified.returncode == 0, verified.stderr
    finally:
        drop_database(pg_server, name)
        with admin.cursor() as cur:
            for role in (application, owner):
                cur.execute(f'DROP ROLE IF EXISTS "{role}"')
        admin.close()
