"""The factory and a server's start (kms.create_app, kms.runtime): importing does nothing; a start
migrates, checks the secrets against the stored data and creates the first admin, once; a restart
keeps the data."""
import subprocess
import sys

from tests.conftest import (ADMIN_NAME, ADMIN_PASSWORD, ROOT, AuthActions, HttpClient, bare_env, bearer, close_app,
                            serve_in_thread, stop_server)


def test_importing_the_app_does_nothing(tmp_path):
    # No configuration, no database, an .env that would fail: importing must not read, connect,
    # start a thread or build an app.
    (tmp_path / ".env").write_text("KEK=not-a-key\n")
    program = ("import threading; import app, kms, kms.cli; "
               "assert threading.active_count() == 1, threading.enumerate(); "
               "from flask import Flask; "
               "assert not any(isinstance(v, Flask) for v in vars(app).values()); "
               "print('quiet')")
    env = bare_env()
    result = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "quiet\n" and result.stderr == ""


def test_restarting_against_the_same_database_keeps_the_data_and_the_admin(make_app, db):
    first = make_app()
    server, base_url = serve_in_thread(first)
    try:
        with HttpClient(base_url) as http:
            token = AuthActions(http).new_client("keeper-svc")
            dek = http.post("/keys/actions/generate", json={"keyReference": "kept"}, headers=bearer(token)).json()["dek"]
    finally:
        stop_server(server)
    close_app(first)  # its connections gone, as when its process ends
    second = make_app()  # a restart: migrations, secret checks and the first admin are in place already
    server, base_url = serve_in_thread(second)
    try:
        with HttpClient(base_url) as http:
            assert http.get("/keys/kept", headers=bearer(token)).json()["encryptWith"]["dek"] == dek
            assert AuthActions(http).login(ADMIN_NAME, ADMIN_PASSWORD)
    finally:
        stop_server(server)
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM clients WHERE role = 'admin'")
        assert cur.fetchone()[0] == 1
        cur.execute("SELECT count(*) FROM schema_migrations")
        assert cur.fetchone()[0] == len(list((ROOT / "sql" / "migrations").glob("*.sql")))


def test_a_database_without_an_admin_warns_how_to_make_one(make_app, captured_logs):
    make_app(MASTER_ADMIN_USERNAME="", MASTER_ADMIN_PASSWORD="")
    warnings = [line for line in captured_logs.getvalue().splitlines() if '"level": "warning"' in line]
    assert any("no active admin exists" in line and "kms create-admin" in line for line in warnings), warnings


def test_master_admin_is_created_once_and_restarts_keep_working(make_app, db):
    make_app()
    make_app()
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM clients WHERE role = 'admin'")
        assert cur.fetchone()[0] == 1
