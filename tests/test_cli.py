"""The `kms` command as `pip install` ships it: what needs no configuration, what a command opens,
one line and a documented exit code for everything outside its control, progress on a terminal."""
import os
import pty
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import psycopg2
import pytest
from click.testing import CliRunner

from kms.config import decode_key
from kms.serving.throwaway_postgres import _free_port
from tests.conftest import (ADMIN_NAME, ADMIN_PASSWORD, KMS_COMMAND as KMS, ROOT, bare_env, bearer,
                            serve_in_thread, stop_server)


def run_kms(*args, env, cwd="/", timeout=60, **kwargs):
    return subprocess.run([KMS, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, **kwargs)


def test_help_and_gen_secret_need_no_configuration_and_no_database(tmp_path):
    for command in ([KMS, "--help"], [KMS, "gen-secret"], [KMS, "serve", "--help"],
                    [str(Path(sys.executable).parent / "flask"), "--app", str(ROOT / "app.py"), "--help"],
                    [str(Path(sys.executable).parent / "flask"), "--app", str(ROOT / "app.py"), "kms", "--help"]):
        result = subprocess.run(command, env=bare_env(), cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, (command, result.stderr)
        assert "Traceback" not in result.stderr
    secret = run_kms("gen-secret", env=bare_env()).stdout
    assert secret.endswith("\n") and len(secret.strip()) == 43
    assert len(decode_key("X", secret.strip())) == 32  # a key every secret setting takes


def test_a_fresh_env_example_reports_every_missing_setting_at_once(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text((ROOT / ".env.example").read_text())
    result = run_kms("signup-token", "--name", "abcd", env=bare_env(), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert lines[0] == "configuration errors: 6 problems"
    assert sorted(line.split(":")[0].strip() for line in lines[1:]) == sorted(
        ["KEK", "JWT_SECRET", "DB_SECRET", "SIGNUP_SECRET", "KEY_REF_SECRET", "USERNAME_SECRET"])
    assert "Traceback" not in result.stderr


def test_a_command_does_not_migrate_and_migrate_says_what_it_applied(new_database, secrets_env):
    env = bare_env(**secrets_env, DATABASE_URL=new_database())
    refused = run_kms("signup-token", "--name", "abcd", env=env)
    assert refused.returncode == 2
    assert refused.stderr.strip().endswith("run `kms migrate` (or start the server) first")
    with psycopg2.connect(env["DATABASE_URL"]) as conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass('schema_migrations')")
        assert cur.fetchone()[0] is None  # untouched
    conn.close()
    applied = run_kms("migrate", env=env)
    assert applied.returncode == 0, applied.stderr
    assert re.fullmatch(r"applied 001_init, 002_\w+, .*; schema at version \d+\n", applied.stdout)
    again = run_kms("migrate", env=env)
    assert re.fullmatch(r"schema is current \(version \d+\)\n", again.stdout)
    issued = run_kms("signup-token", "--name", "abcd", env=env)
    assert issued.returncode == 0 and issued.stdout.startswith("kms_st_")


def test_a_command_opens_one_connection_not_a_server_pool(make_app, base_env, monkeypatch):
    make_app()  # a migrated database
    import kms.db
    opened = []
    real_connect = kms.db.connect
    monkeypatch.setattr(kms.db, "connect", lambda *a, **k: opened.append(1) or real_connect(*a, **k))
    from kms.cli import main
    result = CliRunner().invoke(main, ["keys", "rotate-due"], env={**base_env, "SERVER_THREADS": "16"},
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert len(opened) == 1


def test_an_unreachable_database_is_one_line_and_exit_3(secrets_env):
    env = bare_env(**secrets_env, DATABASE_URL=f"postgresql://kms:Sekrit-pw@127.0.0.1:{_free_port()}/kms")
    for command in (["keys", "rotate-due"], ["audit", "verify"], ["migrate"], ["serve"]):
        result = run_kms(*command, env={**env, "SERVER_PORT": str(_free_port())})
        assert result.returncode == 3, (command, result.stderr)
        lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("{")]
        assert len(lines) == 1 and lines[0].startswith("database unavailable: "), (command, result.stderr)
        assert lines[0].endswith("check DATABASE_URL and that PostgreSQL is running")
        assert "Sekrit-pw" not in result.stderr and "Traceback" not in result.stderr


def test_a_taken_port_is_one_line_and_exit_3_before_the_database_is_touched(base_env):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        # the database is unreachable too: the port is checked first
        env = bare_env(**{**base_env, "SERVER_PORT": str(port),
                          "DATABASE_URL": f"postgresql://kms@127.0.0.1:{_free_port()}/kms"})
        result = run_kms("serve", env=env)
    assert result.returncode == 3
    assert result.stderr == f"127.0.0.1:{port} is already in use: stop what listens there or set SERVER_PORT\n"


def test_integrity_failures_exit_4(base_env, client, auth, db):
    token = auth.new_client()
    created = client.post("/keys/actions/generate", json={"keyReference": "k1"}, headers=bearer(token))
    assert created.status_code == 200
    client.post("/keys/k1/actions/set-rotation-period", json={"rotationPeriod": 86_400_000}, headers=bearer(token))
    with db.cursor() as cur:  # a database writer makes the key due for rotation: its row MAC no longer fits
        cur.execute("UPDATE keys SET rotation_period_ms = 1")
    result = run_kms("keys", "rotate-due", env=bare_env(**base_env))
    assert result.returncode == 4, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("{")]  # the JSON log line
    assert lines == ["stored data failed an integrity check (see the log line above; the audit trail records it "
                     "as integrity.failure)"]


def test_long_commands_show_progress_on_a_terminal_and_one_line_otherwise(make_app, base_env):
    make_app()
    env = bare_env(**base_env)
    for name in ("a-svc", "b-svc", "c-svc"):
        run_kms("signup-token", "--name", name, env=env)
    assert run_kms("audit", "seal", env=env).returncode == 0
    piped = run_kms("audit", "verify", env=env)
    assert piped.returncode == 0 and piped.stderr == ""
    assert re.fullmatch(r"audit chain intact: \d+ events verified \(in [\d.]+ s, \d+/s\); head \d+:[0-9a-f]+; "
                        r"\d+ events not sealed yet\n",
                        piped.stdout), piped.stdout
    leader, follower = pty.openpty()
    try:
        on_terminal = subprocess.run([KMS, "audit", "verify"], env=env, cwd="/", stdout=subprocess.PIPE,
                                     stderr=follower, text=True, timeout=60)
        os.close(follower)
        drawn = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(leader)
    assert on_terminal.returncode == 0
    assert re.search(rb"\rverifying the audit chain: (\d+)/\1 \(\d+/s\)", drawn), drawn


def test_rotate_due_clears_sessions_expired_over_a_day_ago(make_app, base_env, db):
    import requests
    server, base_url = serve_in_thread(make_app(JWT_TTL=1000))
    try:
        for _ in range(2):
            login = requests.post(base_url + "/auth/login", json={"clientname": ADMIN_NAME, "password": ADMIN_PASSWORD})
            assert login.status_code == 200  # sessions that expire in a second
    finally:
        stop_server(server)
    time.sleep(1.2)
    with db.cursor() as cur:  # one of them expired two days ago
        cur.execute("UPDATE sessions SET expires_at = now() - interval '2 days' "
                    "WHERE jti = (SELECT jti FROM sessions ORDER BY jti LIMIT 1)")
    result = run_kms("keys", "rotate-due", env=bare_env(**base_env))
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith(", cleared 1 expired sessions\n")
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM sessions WHERE expires_at < now()")
        assert cur.fetchone()[0] == 1  # expired a second ago: kept for a day


@pytest.mark.parametrize("how", ["--role admin", "DEFAULT_ROLE=admin"])
def test_signup_tokens_for_admins(base_env, live_server, how):
    import requests
    env = bare_env(**base_env)
    args = ["signup-token", "--name", "ops-admin"]
    if how == "--role admin":
        args += ["--role", "admin"]
    else:
        env["DEFAULT_ROLE"] = "admin"
    token = run_kms(*args, env=env).stdout.strip()
    signed_up = requests.post(live_server + "/auth/signup", json={"token": token, "password": "Ops-admin-passw0rd"})
    assert signed_up.status_code == 200
    clients = requests.get(live_server + "/clients", headers={"Authorization": f"Bearer {signed_up.json()['token']}"})
    assert clients.status_code == 200  # an admin's route
