"""KEK changes in any order, with real server processes (kms/keys/kek_holders.py): a running server
that lacks a KEK makes `kms kek rewrap` refuse, naming it; a server that meets a DEK under a KEK it
lacks answers 503 kek_unavailable with Retry-After; a row naming a KEK version nobody configured
stops nothing but its own look-ups."""
import json
import subprocess
import time

import psycopg2
import requests

from kms.config import generate_secret
from tests.conftest import ADMIN_NAME, ADMIN_PASSWORD, CLIENT_PASSWORD, KMS_COMMAND, bare_env, bearer, metric
from tests.serving.test_workers import servers  # noqa: F401 - the fixture


def kms(env: dict, *args) -> subprocess.CompletedProcess:
    return subprocess.run([KMS_COMMAND, *args], env=bare_env(**env), capture_output=True, text=True, timeout=120)


def new_client(base: str, name: str) -> str:
    admin = requests.post(base + "/auth/login", json={"clientname": ADMIN_NAME, "password": ADMIN_PASSWORD},
                          timeout=30).json()["token"]
    signup = requests.post(base + "/auth/signup/generate", json={"clientname": name}, headers=bearer(admin),
                           timeout=30).json()["token"]
    return requests.post(base + "/auth/signup", json={"token": signup, "password": CLIENT_PASSWORD},
                         timeout=30).json()["token"]


def generate(base: str, token: str, reference: str):
    answer = requests.post(base + "/keys/actions/generate", json={"keyReference": reference}, headers=bearer(token),
                           timeout=30)
    assert answer.status_code == 200, answer.text


def log_lines(server) -> list[dict]:
    text = (server.tmp_path / f"server-{server.port}.log").read_text()
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def kek_versions(database_url: str) -> list[int]:
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT kek_version FROM key_versions ORDER BY key_id, version")
        return [row[0] for row in cur.fetchall()]


def test_rewrap_is_refused_naming_the_running_server_that_lacks_the_new_kek(servers, base_env):  # noqa: F811
    server = servers(workers=2)
    token = new_client(server.base, "order-svc")
    generate(server.base, token, "k")
    with_kek_2 = {**base_env, "KEK_2": generate_secret()}  # in the command's environment only

    refused = kms(with_kek_2, "kek", "rewrap")
    assert refused.returncode == 3, refused.stderr
    assert f"pid {server.process.pid} (worker " in refused.stderr  # each worker, named under its server
    assert "do not hold KEK version 2 (KEK_2)" in refused.stderr and "Traceback" not in refused.stderr
    assert kek_versions(base_env["DATABASE_URL"]) == [1]
    status = kms(with_kek_2, "kek", "status")
    assert status.returncode == 0 and f"pid {server.process.pid}" in status.stdout
    assert "new DEK versions are wrapped under KEK version 1" in status.stdout
    answer = requests.get(server.base + "/keys/k", headers=bearer(token), timeout=30)
    assert answer.status_code == 200  # nothing moved: the running server still serves it

    server.stop()  # it removes its rows as it stops: the rewrap may go ahead at once
    done = kms(with_kek_2, "kek", "rewrap")
    assert done.returncode == 0, done.stderr
    assert kek_versions(base_env["DATABASE_URL"]) == [2]


def test_a_server_lacking_a_kek_answers_503_and_the_other_wraps_under_the_kek_both_hold(
        servers, base_env):  # noqa: F811
    kek_2 = generate_secret()
    newer = servers(KEK_2=kek_2)
    token = new_client(newer.base, "order-svc")
    generate(newer.base, token, "under-2")
    assert kek_versions(base_env["DATABASE_URL"]) == [2]  # alone, it wraps under its active KEK_2

    older = servers()  # KEK 1 only: a host not yet given KEK_2
    answer = requests.get(older.base + "/keys/under-2", headers=bearer(token), timeout=30)
    assert answer.status_code == 503 and answer.json()["error"] == "kek_unavailable", answer.text
    assert int(answer.headers["Retry-After"]) >= 1
    assert metric(older.base, 'kms_kek_unavailable_total{kek_version="2"}') == 1
    deadline = time.monotonic() + 10  # (log lines are written in batches)
    while not any(line.get("kekVersion") == 2 and "does not hold" in line["msg"] for line in log_lines(older)):
        assert time.monotonic() < deadline, "no log line named the KEK version"
        time.sleep(0.2)
    with psycopg2.connect(base_env["DATABASE_URL"]) as conn, conn.cursor() as cur:
        cur.execute("SELECT outcome FROM audit_events WHERE action = 'key.lookup' ORDER BY seq")
        assert [row[0] for row in cur.fetchall()] == ["kek_unavailable"]
    assert requests.get(newer.base + "/keys/under-2", headers=bearer(token), timeout=30).status_code == 200

    deadline = time.monotonic() + 15  # the newer server learns of the older one within an interval
    while metric(newer.base, "kms_kek_wrap_version") != 1:
        assert time.monotonic() < deadline, "the newer server kept wrapping under KEK_2"
        time.sleep(0.5)
    generate(newer.base, token, "under-1")
    assert kek_versions(base_env["DATABASE_URL"]) == [2, 1]
    assert requests.get(older.base + "/keys/under-1", headers=bearer(token), timeout=30).status_code == 200

    older.stop()
    deadline = time.monotonic() + 15
    while metric(newer.base, "kms_kek_wrap_version") != 2:
        assert time.monotonic() < deadline, "the newer server did not go back to KEK_2"
        time.sleep(0.5)


def test_a_row_naming_an_unconfigured_kek_version_does_not_stop_the_server(servers, base_env):  # noqa: F811
    first = servers()
    token = new_client(first.base, "order-svc")
    generate(first.base, token, "damaged")
    generate(first.base, token, "fine")
    first.stop()
    with psycopg2.connect(base_env["DATABASE_URL"]) as conn, conn.cursor() as cur:
        cur.execute("UPDATE key_versions SET kek_version = 99 WHERE key_id = (SELECT min(id) FROM keys)")

    server = servers()  # starts
    assert requests.get(server.base + "/keys/fine", headers=bearer(token), timeout=30).status_code == 200
    damaged = requests.get(server.base + "/keys/damaged", headers=bearer(token), timeout=30)
    assert damaged.status_code == 500 and damaged.json()["error"] == "integrity_error"
    assert metric(server.base, 'kms_integrity_failures_total{table="key_versions"}') == 1
    assert metric(server.base, 'kms_kek_not_configured_dek_versions{kek_version="99"}') == 1
    status = kms(base_env, "kek", "status")
    assert status.returncode == 0, status.stderr
    assert "KEK version 99: 1 wrapped DEK versions [not configured, and no server" in status.stdout
    rewrap = kms(base_env, "kek", "rewrap")
    assert rewrap.returncode == 4, rewrap.stderr
    assert "1 DEK versions under KEK version 99 skipped" in rewrap.stderr and "Traceback" not in rewrap.stderr
