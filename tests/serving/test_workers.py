"""Several server processes: `kms serve --workers N` (one socket, a supervising parent, one set of
metrics) and two servers on different ports over one database (shared state lives in PostgreSQL)."""
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg2
import pytest
import requests

from kms.serving.throwaway_postgres import _free_port
from tests.conftest import (ADMIN_NAME, ADMIN_PASSWORD, CLIENT_PASSWORD, KMS_COMMAND as KMS, ROOT, ServerProcess,
                            bare_env, bearer, metric, served_by_pid)


@pytest.fixture
def servers(make_app, base_env, tmp_path):
    make_app()  # schema and first admin in place, tables emptied
    started = []

    def start(workers=1, **overrides):
        server = ServerProcess({**base_env, "AUDIT_SEAL_INTERVAL": "100", **overrides}, tmp_path, workers)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def hit(base: str, path: str, count: int, parallel: int = 8):
    def one(_):
        # a new connection each time, so the kernel hands them to whichever worker accepts first
        return requests.get(base + path, headers={"Connection": "close"}, timeout=30).status_code

    with ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(one, range(count)))


def test_workers_share_one_port_and_metrics_add_up_over_all_of_them(servers):
    server = servers(workers=2)
    first, second = server.workers()
    assert set(hit(server.base, "/healthz", 400)) == {200}
    by_pid = served_by_pid(server.metrics_dir(), "/healthz")
    assert by_pid.get(first, 0) > 0 and by_pid.get(second, 0) > 0, by_pid  # both served
    assert sum(by_pid.values()) == 400
    assert metric(server.base, 'kms_http_requests_total{method="GET",route="/healthz",status="200"}') == 400
    # a worker that dies is replaced, and what it counted stays counted
    os.kill(first, signal.SIGKILL)
    replacement = server.wait_for_workers(2, exclude=[first])
    assert second in replacement
    assert set(hit(server.base, "/healthz", 100)) == {200}
    assert metric(server.base, 'kms_http_requests_total{method="GET",route="/healthz",status="200"}') == 500
    # live gauges of the dead one are gone: two pools of SERVER_THREADS each, once the new one is up
    deadline = time.monotonic() + 10
    while metric(server.base, "kms_db_pool_connections") != 2 * 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(server.base, "kms_db_pool_connections") == 2 * 4


def test_dead_workers_metrics_files_are_merged_and_removed_and_their_counts_kept(servers):
    """Workers killed over and over (and the sealer once), by real signals: what they counted stays
    on /metrics, and the metrics directory holds the live processes' files and one per kind for
    all the dead, however many died."""
    server = servers(workers=2)
    directory = server.metrics_dir()
    healthz = 'kms_http_requests_total{method="GET",route="/healthz",status="200"}'
    served = 0
    for death in range(6):
        assert set(hit(server.base, "/healthz", 20, parallel=4)) == {200}
        served += 20
        victim = server.workers()[death % 2]
        os.kill(victim, signal.SIGKILL if death % 3 else signal.SIGTERM)
        server.wait_for_workers(2, exclude=[victim], timeout=60)  # replaced once its files were merged
        if death == 3:
            (sealer,) = server.children("kms-sealer")
            os.kill(sealer, signal.SIGKILL)
            deadline = time.monotonic() + 15
            while not set(server.children("kms-sealer")) - {sealer}:
                assert time.monotonic() < deadline, "the sealer was not replaced"
                time.sleep(0.1)
    alive = {str(pid) for pid in server.workers() + server.children("kms-sealer")}
    files = sorted(path.name for path in directory.glob("*.db"))
    owners = {name.rsplit("_", 1)[1].removesuffix(".db") for name in files}
    assert owners <= alive | {"dead"}, files  # nothing left of a dead process under its own name
    assert len([name for name in files if name.endswith("_dead.db")]) <= 4, files
    assert len(files) <= 4 * len(alive) + 4, files
    assert metric(server.base, healthz) == served  # every dead worker's requests still counted
    assert metric(server.base, 'kms_http_request_duration_seconds_count{method="GET",route="/healthz"}') == served
    assert set(hit(server.base, "/healthz", 20, parallel=4)) == {200}
    assert metric(server.base, healthz) == served + 20
    deadline = time.monotonic() + 10  # the dead ones' pools are not counted: two of SERVER_THREADS each
    while metric(server.base, "kms_db_pool_connections") != 2 * 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(server.base, "kms_db_pool_connections") == 2 * 4


def test_keep_alive_connections_are_shared_out_evenly_between_workers(servers):
    import http.client
    server = servers(workers=2)
    first, second = server.workers()
    connections = []
    try:
        def open_one(_):
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            connection.request("GET", "/healthz")
            assert connection.getresponse().read()
            return connection

        with ThreadPoolExecutor(16) as pool:  # all at once, as a load generator or a client pool opens them
            connections.extend(pool.map(open_one, range(16)))
        for _ in range(5):  # then used: each worker serves the connections it accepted
            for connection in connections:
                connection.request("GET", "/healthz")
                assert connection.getresponse().read()
        by_pid = served_by_pid(server.metrics_dir(), "/healthz")
        assert sum(by_pid.values()) == 16 * 6
        assert abs(by_pid.get(first, 0) - by_pid.get(second, 0)) <= 2 * 6, by_pid  # 8 and 8, give or take one
    finally:
        for connection in connections:
            connection.close()


def test_a_new_connection_is_taken_at_once_though_the_worker_that_may_take_it_sat_idle(servers):
    """A worker with more connections than the other does not accept (the balance above); an idle
    one sleeps in its event loop. Opened one after another, each connection left open and idle,
    new connections must still be answered at once: the worker kept from accepting looks again
    soon (kms.serving.http.Server.poll), not when its loop's timeout ends. With a fixed timeout,
    1 in 8 waited in the backlog for ~230 ms."""
    import http.client
    server = servers(workers=2)
    connections, waited = [], []
    try:
        for _ in range(40):
            started = time.monotonic()
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            connection.request("GET", "/healthz")
            assert connection.getresponse().read()
            waited.append(time.monotonic() - started)
            connections.append(connection)
            time.sleep(0.05)
    finally:
        for connection in connections:
            connection.close()
    slow = [round(seconds, 3) for seconds in waited if seconds > 0.15]
    assert not slow, f"{len(slow)} of {len(waited)} new connections waited: {slow}"


def test_the_sealer_runs_in_a_process_of_its_own_and_is_replaced_when_it_dies(servers, base_env):
    server = servers(workers=2)
    (sealer,) = server.children("kms-sealer")

    def unsealed() -> int:
        with psycopg2.connect(base_env["DATABASE_URL"]) as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM audit_events WHERE chain_pos IS NULL")
            count = cur.fetchone()[0]
        conn.close()
        return count

    def logins_sealed():
        for _ in range(5):
            assert requests.post(server.base + "/auth/login", json={"clientname": ADMIN_NAME,
                                                                   "password": ADMIN_PASSWORD}).status_code == 200
        deadline = time.monotonic() + 15
        while unsealed() and time.monotonic() < deadline:
            time.sleep(0.1)
        return unsealed() == 0

    assert logins_sealed()
    os.kill(sealer, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while not set(server.children("kms-sealer")) - {sealer}:
        assert time.monotonic() < deadline, "the sealer was not replaced"
        time.sleep(0.1)
    assert logins_sealed()  # the new one seals
    with psycopg2.connect(base_env["DATABASE_URL"]) as conn, conn.cursor() as cur:
        cur.execute("SELECT max(chain_pos), count(*) FROM audit_events")
        head, events = cur.fetchone()
    conn.close()
    assert head == events >= 11  # the first admin's creation and ten logins, every one sealed
    deadline = time.monotonic() + 5  # published by the sealer's process once it has sealed, answered by a worker
    while metric(server.base, "kms_audit_chain_head_position") != head and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(server.base, "kms_audit_chain_head_position") == head


def test_python_app_py_takes_workers_too(base_env, make_app, tmp_path):
    make_app()
    port = _free_port()
    env = bare_env()
    process = subprocess.Popen([sys.executable, "app.py", "--workers", "2"], cwd=ROOT,
                               env={**env, **base_env, "SERVER_PORT": str(port)}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        children = []
        while len(children) < 2 and time.monotonic() < deadline:
            children = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _parent_of(p) == process.pid
                        and (p / "comm").read_text().startswith("kms-worker-")]
            time.sleep(0.1)
        assert len(children) == 2
        while time.monotonic() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0


def _parent_of(proc: Path) -> int | None:
    try:
        fields = (proc / "stat").read_text().rsplit(") ", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]) if fields[0] != "Z" else None


def test_workers_dying_young_are_replaced_after_a_growing_back_off(servers):
    server = servers(workers=2)
    victim = server.workers()[0]
    delays = []
    for _ in range(3):  # a crash loop: each replacement killed as soon as it appears
        others = set(server.workers()) - {victim}
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        replacement = None
        while replacement is None:
            assert time.monotonic() - killed_at < 20, "no replacement"
            new = set(server.workers()) - others - {victim}
            replacement = next(iter(new), None)
            time.sleep(0.02)
        delays.append(time.monotonic() - killed_at)
        victim = replacement
    # the first death is replaced at once, the next ones after 2 s, then 4 s
    assert delays[0] < 1.5 and 1.8 < delays[1] < 4 and 3.8 < delays[2] < 7, delays
    assert server.process.poll() is None and requests.get(server.base + "/healthz", timeout=5).status_code == 200


def test_sigterm_lets_every_in_flight_request_finish_then_exits_0(servers, base_env):
    server = servers(workers=2)
    blocker = psycopg2.connect(base_env["DATABASE_URL"])
    answers = []
    try:
        with blocker.cursor() as cur:  # every audited write waits for this lock
            cur.execute("LOCK TABLE audit_events IN ACCESS EXCLUSIVE MODE")
        login = threading.Thread(target=lambda: answers.append(requests.post(
            server.base + "/auth/login", json={"clientname": ADMIN_NAME, "password": ADMIN_PASSWORD}, timeout=30)))
        login.start()
        time.sleep(1.0)  # the login is in flight, waiting on the lock
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert server.process.poll() is None  # draining, not gone
    finally:
        blocker.rollback()  # the lock goes; the login completes
        blocker.close()
    login.join(timeout=30)
    assert answers and answers[0].status_code == 200
    assert server.process.wait(timeout=30) == 0
    assert server.workers() == []


def test_a_killed_parent_takes_its_workers_with_it(servers):
    server = servers(workers=2)
    workers = server.children("kms-")  # the workers and the sealer
    assert len(workers) == 3 and len(server.children("kms-sealer")) == 1
    server.process.kill()
    server.process.wait()
    deadline = time.monotonic() + 30
    alive = workers
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in workers if Path(f"/proc/{pid}").exists()
                 and Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[0] != "Z"]
        time.sleep(0.1)
    assert alive == []
    with pytest.raises(requests.ConnectionError):
        requests.get(server.base + "/healthz", timeout=2)


def signup(base: str, admin: str, name: str) -> str:
    token = requests.post(base + "/auth/signup/generate", json={"clientname": name}, headers=bearer(admin)).json()
    answer = requests.post(base + "/auth/signup", json={"token": token["token"], "password": CLIENT_PASSWORD})
    assert answer.status_code == 200, answer.text
    return answer.json()["token"]


def test_two_servers_over_one_database_share_sessions_throttles_rotations_and_the_audit_chain(servers, base_env):
    a, b = servers(), servers()
    admin = requests.post(a.base + "/auth/login", json={"clientname": ADMIN_NAME, "password": ADMIN_PASSWORD}).json()
    admin = admin["token"]
    # a token logged out through one is refused by the other at once
    token = signup(a.base, admin, "svc-one")
    assert requests.get(b.base + "/keys", headers=bearer(token)).status_code == 200
    assert requests.post(a.base + "/auth/logout", headers=bearer(token)).status_code == 204
    assert requests.get(b.base + "/keys", headers=bearer(token)).status_code == 401
    # a client disabled through one is refused by the other
    other = signup(b.base, admin, "svc-two")
    assert requests.get(b.base + "/keys", headers=bearer(other)).status_code == 200
    clients = requests.get(a.base + "/clients", headers=bearer(admin)).json()["clients"]
    two = next(c["id"] for c in clients if c["clientname"] == "svc-two")
    assert requests.post(a.base + f"/clients/{two}/actions/disable", headers=bearer(admin)).status_code == 204
    assert requests.get(b.base + "/keys", headers=bearer(other)).status_code == 401
    # the login throttle counts failures made through both (5 per client by default)
    signup(a.base, admin, "svc-three")
    for base in (a.base, b.base, a.base, b.base, a.base):
        wrong = requests.post(base + "/auth/login", json={"clientname": "svc-three", "password": "Wrong-passw0rd!"})
        assert wrong.status_code == 401
    locked = requests.post(b.base + "/auth/login", json={"clientname": "svc-three", "password": CLIENT_PASSWORD})
    assert locked.status_code == 429
    # parallel rotations through both: contiguous versions, exactly one in use
    owner = signup(b.base, admin, "svc-four")
    assert requests.post(a.base + "/keys/actions/generate", json={"keyReference": "shared"},
                         headers=bearer(owner)).status_code == 200

    def rotate(index):
        return requests.post((a.base, b.base)[index % 2] + "/keys/shared/actions/rotate", headers=bearer(owner),
                             timeout=30).status_code

    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(rotate, range(40)))
    assert set(statuses) <= {200, 409} and statuses.count(200) >= 1
    versions = requests.get(b.base + "/keys/shared/versions", headers=bearer(owner)).json()["versions"]
    assert [v["version"] for v in versions] == list(range(1, statuses.count(200) + 2))
    assert [v["state"] for v in versions].count("in-use") == 1
    # both sealers ran all along (every 100 ms): the chain has each event once, in order, intact
    time.sleep(0.5)
    with psycopg2.connect(base_env["DATABASE_URL"]) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*), count(DISTINCT chain_pos), min(chain_pos), max(chain_pos) FROM audit_events "
                    "WHERE chain_pos IS NOT NULL")
        count, distinct, first, last = cur.fetchone()
    conn.close()
    assert count == distinct == last and first == 1
    env = bare_env()
    verified = subprocess.run([KMS, "audit", "verify"], env={**env, **base_env}, capture_output=True, text=True,
                              timeout=60)
    assert verified.returncode == 0 and verified.stdout.startswith("audit chain intact"), verified.stderr
