"""Log lines say why: every failure line carries its cause, scrubbed of secrets (libpq's first line
names host and port; nothing like a password, a DSN's credentials or a key), at most one line per
distinct cause per interval. And what the server says about itself: the port as a number, the
client's address on access lines, what stopping did, a master password left behind."""
import json
import os
import signal
import time
from dataclasses import replace
from types import SimpleNamespace

import psycopg2
import pytest
import requests

from kms.audit.sealer import Sealer
from kms.failures import OncePer, cause
from kms.serving.throwaway_postgres import _free_port
from tests.conftest import ServerProcess, bearer


def lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_a_cause_is_the_first_line_without_credentials_or_key_like_strings(database_url):
    port = _free_port()
    with pytest.raises(psycopg2.OperationalError) as refused:
        psycopg2.connect(f"postgresql://kms:Sekrit-passw0rd@127.0.0.1:{port}/kms")
    assert cause(refused.value) == (f'OperationalError: connection to server at "127.0.0.1", port {port} failed: '
                                    "Connection refused")
    with pytest.raises(psycopg2.OperationalError) as refused:
        psycopg2.connect(f"host=127.0.0.1 port={port} user=kms password=Sekrit-passw0rd dbname=kms")
    assert "Sekrit" not in cause(refused.value) and f"port {port}" in cause(refused.value)
    conn = psycopg2.connect(database_url)
    try:
        with pytest.raises(psycopg2.Error) as server_side, conn.cursor() as cur:
            cur.execute("SELECT %s::uuid", ("kms_st_TheSignupTokenItself",))
        # the server quotes the value it could not read: that part goes
        assert cause(server_side.value) == 'InvalidTextRepresentation: SQLSTATE 22P02: invalid input syntax for type ' \
                                           'uuid: "…"'
    finally:
        conn.close()
    secret = "kms_st_" + "A" * 43
    assert cause(ValueError(f"bad token {secret}\nsecond line")) == "ValueError: bad token …"
    assert cause(RuntimeError("dsn postgresql://kms:pw@db:5432/kms pin=1234")) == \
        "RuntimeError: dsn postgresql://…@db:5432/kms pin=…"
    assert cause(KeyError()) == "KeyError"


def test_once_per_interval_and_per_distinct_cause():
    limiter = OncePer(interval_s=0.3)
    assert limiter.due("a") == 0
    assert limiter.due("a") is None and limiter.due("a") is None
    assert limiter.due("b") == 0  # another cause is not held back
    time.sleep(0.35)
    assert limiter.due("a") == 2  # the line after the interval counts those held back


def test_the_sealer_logs_why_it_fails_once_per_interval(app, captured_logs):
    kms = app.extensions["kms"]
    port = _free_port()
    broken = SimpleNamespace(settings=replace(kms.settings, database_url=f"postgresql://kms:Sekrit-pw@127.0.0.1:{port}/kms",
                                              audit_seal_interval_ms=20, audit_head_file=None),
                             metrics=kms.metrics, audit_key=kms.audit_key)
    sealer = Sealer(broken)
    sealer.start()
    time.sleep(1.5)  # some 70 attempts
    sealer.stop()
    sealer.join(5)
    failed = [line for line in lines(captured_logs.getvalue()) if line["msg"] == "audit sealing failed; will retry"]
    assert len(failed) == 1, failed
    assert failed[0]["cause"] == (f'OperationalError: connection to server at "127.0.0.1", port {port} failed: '
                                  "Connection refused")
    assert "Sekrit" not in captured_logs.getvalue()


def test_a_worker_that_fails_says_why_and_the_server_says_what_it_is_doing(make_app, base_env, tmp_path, pg_server):
    make_app()
    name = base_env["DATABASE_URL"].rsplit("/", 1)[1]
    admin = psycopg2.connect(pg_server)  # another database's connection: ours is the one closed
    admin.autocommit = True
    server = ServerProcess({**base_env, "AUDIT_SEAL_INTERVAL": "0"}, tmp_path, workers=2)
    log_path = tmp_path / f"server-{server.port}.log"
    try:
        requests.get(server.base + "/healthz", timeout=5)
        with admin.cursor() as cur:  # no new connection from now on (those open stay)
            cur.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        try:
            os.kill(server.workers()[0], signal.SIGKILL)
            deadline = time.monotonic() + 30
            while "worker failed" not in log_path.read_text():
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.2)
        finally:
            with admin.cursor() as cur:
                cur.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            admin.close()
        deadline = time.monotonic() + 30
        while requests.get(server.base + "/readyz", timeout=5).status_code != 200:  # a replacement serves again
            assert time.monotonic() < deadline
            time.sleep(0.2)
        requests.get(server.base + "/healthz", timeout=5)
    finally:
        server.stop()
    logged = lines(log_path.read_text())
    failed = next(line for line in logged if line["msg"] == "worker failed")
    assert failed["cause"].startswith("OperationalError: connection to server at") and \
        f'database "{name}" is not currently accepting connections' in failed["cause"], failed
    serving = [line for line in logged if line["msg"] == "serving"]
    assert serving and all(isinstance(line["port"], int) and line["port"] == server.port for line in serving)
    access = [line for line in logged if line["msg"] == "request"]
    assert access and all(line["client"] == "127.0.0.1" for line in access)
    stopped = [line for line in logged if line["msg"] == "stopped"]
    assert {"workersStopped", "did"} <= set(stopped[-1]) and stopped[-1]["workersStopped"] >= 1
    assert any("unansweredConnections" in line for line in stopped)
    assert server.process.returncode == 0


def test_a_master_password_left_set_after_the_admin_exists_is_warned_about(make_app, captured_logs):
    make_app()  # creates the first admin from MASTER_ADMIN_*
    assert "MASTER_ADMIN_PASSWORD is still set" not in captured_logs.getvalue()
    make_app()  # a restart with the password still in the environment
    warned = [line for line in lines(captured_logs.getvalue()) if "MASTER_ADMIN_PASSWORD is still set" in line["msg"]]
    assert len(warned) == 1 and warned[0]["level"] == "warning"
