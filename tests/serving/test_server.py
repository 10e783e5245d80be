"""The KMS as a server process: `python app.py` (`kms serve`). Dev mode: tests/serving/test_dev_mode.py."""
import os
import signal
import subprocess
import sys
import time

import requests

from kms.serving.throwaway_postgres import _free_port as free_port
from tests.conftest import ADMIN_NAME, ADMIN_PASSWORD, ROOT


def clean_env(**overrides):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KEK", "DB_", "JWT_", "MASTER_ADMIN", "SERVER_", "DATABASE_URL"))}
    env.update(overrides)
    return env


def unsealed_login_events(db) -> int:
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM audit_events WHERE action = 'login' AND chain_pos IS NULL")
        return cur.fetchone()[0]


def wait_for_health(base_url, process, timeout=90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}")
        try:
            if requests.get(base_url + "/healthz", timeout=1).status_code == 200:
                return
        except requests.RequestException:  # refused, or accepted by a socket bound before serving
            pass
        time.sleep(0.2)
    raise AssertionError("server did not come up")


def test_server_serves_seals_the_audit_trail_and_stops_cleanly_on_sigterm(base_env, make_app, db):
    make_app()  # the schema and the first admin exist; the server must start on them again
    port = free_port()
    process = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT,
                               env=clean_env(**{**base_env, "SERVER_PORT": str(port), "AUDIT_SEAL_INTERVAL": "200"}),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base_url = f"http://127.0.0.1:{port}"
        wait_for_health(base_url, process)
        login = requests.post(base_url + "/auth/login", json={"clientname": ADMIN_NAME, "password": ADMIN_PASSWORD})
        assert login.status_code == 200
        deadline = time.monotonic() + 10  # the background sealer chains the login's event
        while time.monotonic() < deadline and unsealed_login_events(db):
            time.sleep(0.1)
        assert unsealed_login_events(db) == 0
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()  # reap it and close its pipes
    assert process.returncode == 0
    assert '"msg": "stopped"' in stderr
    assert ADMIN_PASSWORD not in stderr and login.json()["token"] not in stderr
