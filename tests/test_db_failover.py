"""Losing the database primary: a primary and a synchronous streaming standby (pg_basebackup, the
same binaries the other tests use), the KMS pointed at both with libpq's multi-host URL. Under
load the primary is stopped as `pg_ctl stop -m immediate` does and the standby promoted; the KMS
must answer again on its own, and nothing it acknowledged may be missing."""
import shutil
import string
import subprocess
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import psycopg2
import pytest
import requests

from kms.config import SECRET_VARIABLES, generate_secret
from kms.serving.throwaway_postgres import ThrowawayPostgres, _free_port
from tests.conftest import KMS_COMMAND as KMS, bare_env

ADMIN = ("failover-admin", "Failover-admin-passw0rd")
PASSWORD = "Failover-passw0rd!"
DURABLE = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on", "wal_level": "replica",
           "max_wal_senders": "5"}


def sql(dsn: str, statement: str, *params):
    conn = psycopg2.connect(dsn, connect_timeout=5)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall() if cur.description else None
    finally:
        conn.close()


@pytest.fixture
def cluster():
    primary = ThrowawayPostgres(settings=DURABLE).start()
    standby = None
    try:
        sql(primary.dsn, "CREATE DATABASE kms")
        standby = ThrowawayPostgres.standby_of(primary, "standby1").start()
        sql(primary.dsn, "ALTER SYSTEM SET synchronous_standby_names = 'standby1'")
        sql(primary.dsn, "SELECT pg_reload_conf()")
        deadline = time.monotonic() + 30
        while sql(primary.dsn, "SELECT sync_state FROM pg_stat_replication") != [("sync",)]:
            assert time.monotonic() < deadline, "the standby did not become synchronous"
            time.sleep(0.1)
        yield primary, standby
    finally:
        for server in (standby, primary):
            if server is not None:
                server.destroy()


class Load:
    """Clients generating, rotating, looking up, signing up, logging in and out, recording every
    answer and what was acknowledged."""

    def __init__(self, base: str, admin_token: str, owner_token: str):
        self.base, self.admin, self.owner = base, admin_token, owner_token
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.answers: list[tuple[float, str, int, float]] = []  # (when, operation, status, seconds)
        self.generated, self.rotations, self.lookups = [], 0, 0
        self.signed_up: list[str] = []
        self.logged_out: list[str] = []
        self.acknowledged: dict[str, list[str]] = {}  # operation -> request ids of its 2xx answers

    def _call(self, operation, method, path, token=None, json=None):
        started = time.monotonic()
        try:
            answer = requests.request(method, self.base + path, json=json, timeout=60,
                                      headers={"Authorization": f"Bearer {token}"} if token else {})
            status = answer.status_code
        except requests.RequestException:
            answer, status = None, 0
        with self.lock:
            self.answers.append((started, operation, status, time.monotonic() - started))
            if status and status < 300:
                self.acknowledged.setdefault(operation, []).append(answer.headers["X-Request-ID"])
        return answer if status and status < 300 else None

    def _generates(self):
        while not self.stop.is_set():
            ref = f"gen-{uuid.uuid4().hex[:10]}"
            if self._call("generate", "POST", "/keys/actions/generate", self.owner, {"keyReference": ref}):
                with self.lock:
                    self.generated.append(ref)

    def _rotations(self):
        while not self.stop.is_set():
            if self._call("rotate", "POST", "/keys/rotated/actions/rotate", self.owner):
                with self.lock:
                    self.rotations += 1

    def _lookups(self):
        while not self.stop.is_set():
            if self._call("lookup", "GET", "/keys/rotated", self.owner):
                with self.lock:
                    self.lookups += 1

    def _signups_and_logouts(self):
        while not self.stop.is_set():
            name = f"svc-{uuid.uuid4().hex[:8]}"
            issued = self._call("signup_token", "POST", "/auth/signup/generate", self.admin, {"clientname": name})
            if not issued:
                continue
            signed = self._call("signup", "POST", "/auth/signup", None, {"token": issued.json()["token"],
                                                                         "password": PASSWORD})
            if not signed:
                continue
            with self.lock:
                self.signed_up.append(name)
            logged_in = self._call("login", "POST", "/auth/login", None, {"clientname": name, "password": PASSWORD})
            if logged_in and self._call("logout", "POST", "/auth/logout", logged_in.json()["token"]):
                with self.lock:
                    self.logged_out.append(logged_in.json()["token"])

    def start(self):
        self.threads = [threading.Thread(target=work, daemon=True) for work in
                        (self._generates, self._generates, self._rotations, self._lookups, self._lookups,
                         self._signups_and_logouts)]
        for thread in self.threads:
            thread.start()

    def finish(self):
        self.stop.set()
        for thread in self.threads:
            thread.join(90)


@pytest.mark.parametrize("durable_lookups", [False, True])
def test_the_kms_rides_through_a_failover_losing_nothing_it_acknowledged(cluster, tmp_path, durable_lookups):
    primary, standby = cluster
    url = (f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{standby.port}/kms"
           "?target_session_attrs=read-write")
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = bare_env()
    env.update({name: generate_secret() for name in SECRET_VARIABLES})
    env.update(DATABASE_URL=url, SERVER_PORT=str(port), SERVER_THREADS="8", AUDIT_SEAL_INTERVAL="200",
               MASTER_ADMIN_USERNAME=ADMIN[0], MASTER_ADMIN_PASSWORD=ADMIN[1],
               AUDIT_KEY_LOOKUPS_DURABLE=str(durable_lookups).lower(), AUDIT_HEAD_FILE=str(tmp_path / "audit-head"))
    log = open(tmp_path / "kms.log", "w")
    server = subprocess.Popen([KMS, "serve"], env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(base + "/readyz", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "kms.log").read_text()
            time.sleep(0.1)
        admin = requests.post(base + "/auth/login", json={"clientname": ADMIN[0], "password": ADMIN[1]}).json()["token"]
        issued = requests.post(base + "/auth/signup/generate", json={"clientname": "owner-svc"},
                               headers={"Authorization": f"Bearer {admin}"}).json()["token"]
        owner = requests.post(base + "/auth/signup", json={"token": issued, "password": PASSWORD}).json()["token"]
        assert requests.post(base + "/keys/actions/generate", json={"keyReference": "rotated"},
                             headers={"Authorization": f"Bearer {owner}"}).status_code == 200

        load = Load(base, admin, owner)
        load.start()
        time.sleep(3)
        crashed_at = time.monotonic()
        primary.crash()  # -m immediate
        time.sleep(1)
        assert requests.get(base + "/readyz", timeout=30).status_code == 503  # only a standby answers
        promoted_at = time.monotonic()  # pg_promote() called
        standby.promote()
        deadline = promoted_at + 30
        while time.monotonic() < deadline:  # until a write succeeds after the promotion
            time.sleep(0.1)
            with load.lock:
                if any(when > promoted_at and op in ("generate", "rotate") and status == 200
                       for when, op, status, _ in load.answers):
                    break
        time.sleep(2)
        load.finish()
        # Through the KMS, on the new primary: every acknowledged generate is there, every
        # acknowledged signup can log in, every acknowledged logout stays logged out.
        owner_headers = {"Authorization": f"Bearer {owner}"}
        missing = [ref for ref in load.generated
                   if requests.get(f"{base}/keys/{ref}", headers=owner_headers, timeout=30).status_code != 200]
        assert missing == []
        for name in load.signed_up[-20:]:
            assert requests.post(base + "/auth/login", json={"clientname": name, "password": PASSWORD},
                                 timeout=30).status_code == 200
        revived = [token for token in load.logged_out
                   if requests.get(base + "/keys", headers={"Authorization": f"Bearer {token}"},
                                   timeout=30).status_code != 401]
        assert revived == []
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()

    writes_after = [when + took for when, op, status, took in load.answers
                    if op in ("generate", "rotate") and status == 200 and when + took > promoted_at]
    gap = min(writes_after) - promoted_at
    last_before = max(when + took for when, op, status, took in load.answers
                      if op in ("generate", "rotate") and status == 200 and when + took < crashed_at)
    statuses = Counter(status for _, _, status, _ in load.answers)
    slowest = max(took for _, _, _, took in load.answers)
    print(f"\nfailover: first write {gap:.2f} s after the promotion ({min(writes_after) - last_before:.2f} s "
          f"without a successful write); answers by status {dict(statuses)}; slowest {slowest:.1f} s; "
          f"acknowledged: {len(load.generated)} generates, {load.rotations} rotations, {len(load.signed_up)} "
          f"signups, {len(load.logged_out)} logouts")
    assert gap < 10
    assert set(statuses) <= {200, 204, 503}, statuses  # never a 500, never a dropped connection
    assert slowest < 25  # never a hang: bounded by the connect and statement time-outs

    new = standby.dsn.rsplit("/", 1)[0] + "/kms"
    keys = sql(new, "SELECT count(*) FROM keys")[0][0]
    assert keys >= len(load.generated) + 1
    versions = sql(new, "SELECT v.version, v.state FROM key_versions v JOIN keys k ON k.id = v.key_id "
                        "WHERE k.current_version > 1 ORDER BY v.version")
    assert [v for v, _ in versions] == list(range(1, len(versions) + 1))  # contiguous
    assert [state for _, state in versions].count("in-use") == 1
    assert len(versions) >= load.rotations + 1
    # Every acknowledged change has its audit record (found by the answer's request id); look-ups,
    # committed with synchronous_commit = off, may lose theirs: counted, not forbidden.
    recorded = {row[0] for row in sql(new, "SELECT request_id::text FROM audit_events WHERE request_id IS NOT NULL")}
    for operation in ("generate", "rotate", "signup", "logout", "signup_token", "login"):
        lost = [rid for rid in load.acknowledged.get(operation, []) if rid not in recorded]
        assert lost == [], (operation, len(lost))
    lookups = load.acknowledged.get("lookup", [])
    lost_lookups = [rid for rid in lookups if rid not in recorded]
    print(f"look-up audit records (AUDIT_KEY_LOOKUPS_DURABLE={str(durable_lookups).lower()}): "
          f"{len(lookups) - len(lost_lookups)} of {len(lookups)} acknowledged look-ups recorded, "
          f"{len(lost_lookups)} lost with the primary")
    if durable_lookups:
        assert lost_lookups == []
    env["DATABASE_URL"] = url
    verified = subprocess.run([KMS, "audit", "verify"], env=env, capture_output=True, text=True, timeout=120)
    assert verified.returncode == 0, verified.stderr


def test_a_session_on_a_standby_is_refused_not_used_for_writes(cluster):
    from kms import db
    primary, standby = cluster
    on_standby = standby.dsn.rsplit("/", 1)[0] + "/kms"  # as a stale DNS answer would point
    with pytest.raises(db.ReadOnlyDatabase):
        db.connect(on_standby)
    pool = db.ConnectionPool(on_standby, size=1)
    with pytest.raises(psycopg2.OperationalError):  # the API answers these with 503 and Retry-After
        pool.acquire()
    assert pool.in_use == 0  # its slot is back, for the next try
    # Both hosts listed without target_session_attrs=read-write: libpq takes the first that answers,
    # the standby, which is refused; with it, libpq passes the standby over for the primary.
    both = f"postgresql://postgres@127.0.0.1:{standby.port},127.0.0.1:{primary.port}/kms"
    with pytest.raises(db.ReadOnlyDatabase):
        db.connect(both)
    conn = db.connect(both + "?target_session_attrs=read-write")
    assert conn.info.port == primary.port
    conn.close()


@pytest.mark.skipif(not (shutil.which("haproxy") and shutil.which("openssl")), reason="needs haproxy and openssl")
def test_look_ups_through_the_ha_proxy_ride_out_a_window_without_a_primary(cluster, tmp_path):
    """deploy/ha/haproxy.cfg (the drill's proxy) in front of a KMS whose database has no primary for
    4 s, as in a planned switchover: the old primary stopped as Patroni's demotion stops it, the
    standby promoted 4 s later. Meanwhile the KMS's /readyz says 503 and haproxy takes it out of
    rotation; no other KMS being ready, haproxy must still hand it the look-ups (which wait for the
    new primary) rather than answer 503 itself. Every look-up is answered 200, by the KMS."""
    primary, standby = cluster
    port, tls_port = _free_port(), _free_port()
    url = (f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{standby.port}/kms"
           "?target_session_attrs=read-write")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(tmp_path / "kms.key"),
                    "-out", str(tmp_path / "kms.crt")], check=True, capture_output=True)
    (tmp_path / "kms.pem").write_bytes((tmp_path / "kms.crt").read_bytes() + (tmp_path / "kms.key").read_bytes())
    template = (Path(__file__).resolve().parent.parent / "deploy" / "ha" / "haproxy.cfg").read_text()
    # One KMS stands for both; the PostgreSQL endpoint (Patroni's checks) is unused here.
    (tmp_path / "haproxy.cfg").write_text(string.Template(template).substitute(
        work_dir=tmp_path, tls_port=tls_port, kms1_port=port, kms2_port=port, pg_write_port=_free_port(),
        pg1_port=primary.port, pg2_port=standby.port, rest1_port=_free_port(), rest2_port=_free_port()))
    env = bare_env()
    env.update({name: generate_secret() for name in SECRET_VARIABLES})
    env.update(DATABASE_URL=url, SERVER_PORT=str(port), SERVER_THREADS="8", TRUSTED_PROXY_HOPS="1",
               MASTER_ADMIN_USERNAME=ADMIN[0], MASTER_ADMIN_PASSWORD=ADMIN[1])
    base, ca = f"https://127.0.0.1:{tls_port}", str(tmp_path / "kms.crt")
    log = open(tmp_path / "kms.log", "w")
    server = subprocess.Popen([KMS, "serve"], env=env, stdout=log, stderr=log)
    proxy_log = open(tmp_path / "haproxy.log", "w")
    proxy = subprocess.Popen(["haproxy", "-db", "-f", str(tmp_path / "haproxy.cfg")], stdout=proxy_log,
                             stderr=proxy_log)
    stop, answers, lookups, arriving = threading.Event(), [], [], None
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(base + "/readyz", verify=ca, timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert server.poll() is None and proxy.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        admin = requests.post(base + "/auth/login", json={"clientname": ADMIN[0], "password": ADMIN[1]},
                              verify=ca).json()["token"]
        issued = requests.post(base + "/auth/signup/generate", json={"clientname": "owner-svc"}, verify=ca,
                               headers={"Authorization": f"Bearer {admin}"}).json()["token"]
        owner = requests.post(base + "/auth/signup", json={"token": issued, "password": PASSWORD},
                              verify=ca).json()["token"]
        headers = {"Authorization": f"Bearer {owner}"}
        assert requests.post(base + "/keys/actions/generate", json={"keyReference": "k"}, headers=headers,
                             verify=ca).status_code == 200

        def look_up():
            started = time.monotonic()
            try:
                answer = requests.get(base + "/keys/k", headers=headers, verify=ca, timeout=30)
                status, by_kms = answer.status_code, "X-Request-ID" in answer.headers
            except requests.RequestException:
                status, by_kms = 0, False
            answers.append((started, status, by_kms))

        def look_ups_arriving():  # a new look-up every 0.1 s, whatever happens to the earlier ones
            while not stop.is_set():
                lookups.append(threading.Thread(target=look_up))
                lookups[-1].start()
                time.sleep(0.1)

        arriving = threading.Thread(target=look_ups_arriving)
        arriving.start()
        time.sleep(1)
        stopped_at = time.monotonic()
        primary.stop()  # a fast shutdown, as Patroni demotes the old primary: no primary for 4 s
        time.sleep(4)
        standby.promote()
        time.sleep(1)
    finally:
        stop.set()
        if arriving is not None:
            arriving.join()
        for thread in lookups:
            thread.join(60)
        proxy.terminate()
        proxy.wait(timeout=30)
        server.terminate()
        server.wait(timeout=60)
        log.close()
        proxy_log.close()
    # haproxy took the KMS out of rotation meanwhile (its /readyz said 503) ...
    assert "backend 'kms' has no server available" in (tmp_path / "haproxy.log").read_text()
    # ... while look-ups kept arriving (it takes 2 failed checks, 0.5 s apart), and each was answered
    # 200 by the KMS once the new primary was there.
    assert len([answer for answer in answers if stopped_at + 2.5 < answer[0] < stopped_at + 4]) >= 5
    statuses = Counter((status, by_kms) for _, status, by_kms in answers)
    assert statuses == {(200, True): len(answers)}, statuses
