"""The two ways to run the KMS as a process: `python app.py` and `python app.py dev`."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from kms.serving.throwaway_postgres import _free_port as free_port
from tests.conftest import ADMIN_NAME, ADMIN_PASSWORD

ROOT = Path(__file__).resolve().parent.parent


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


def test_dev_mode_gives_a_working_server_whose_printed_token_works():
    port = free_port()
    process = subprocess.Popen([sys.executable, "app.py", "dev"], cwd=ROOT,
                               env=clean_env(SERVER_PORT=str(port), SERVER_THREADS="4"),
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        base_url = f"http://127.0.0.1:{port}"
        wait_for_health(base_url, process)
        printed = ""
        while "Try it" not in printed:
            printed += process.stdout.readline()
        printed += "".join(process.stdout.readline() for _ in range(6))
        signup_token = re.search(r"Signup token:\s+(\S+)", printed).group(1)
        admin_password = re.search(r"Admin:\s+admin / (\S+)", printed).group(1)
        # the printed curl lines, as requests
        token = requests.post(base_url + "/auth/signup",
                              json={"token": signup_token, "password": "Demo-passw0rd!"}).json()["token"]
        generated = requests.post(base_url + "/keys/actions/generate", json={"keyReference": "billing-db"},
                                  headers={"Authorization": f"Bearer {token}"})
        assert generated.status_code == 200 and generated.json()["version"] == 1
        assert "-d '{\"keyReference\": \"billing-db\"}'" in printed
        assert requests.post(base_url + "/auth/login",
                             json={"clientname": "admin", "password": admin_password}).status_code == 200
        process.send_signal(signal.SIGINT)  # Ctrl-C
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
    assert process.returncode == 0


def test_dev_mode_refuses_a_non_loopback_host():
    result = subprocess.run([sys.executable, "app.py", "dev"], cwd=ROOT, env=clean_env(SERVER_HOST="0.0.0.0"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "refuses to listen on 0.0.0.0" in result.stderr
