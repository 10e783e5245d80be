"""A failover drill on a real HA stack, on this machine, on 127.0.0.1 only:

    etcd  ->  two PostgreSQL nodes under Patroni (synchronous mode)
    haproxy: TLS for two KMS processes (health: /readyz; while none is ready, every one that
             accepts connections); one PostgreSQL endpoint that leads to Patroni's leader
             (health: Patroni's REST /primary)
    two `kms serve` processes, their DATABASE_URL pointing at haproxy's PostgreSQL endpoint

Under a bounded mixed load (look-ups, generates, rotations, signups, logins, logouts) it
0. kills the leader's PostgreSQL alone, which Patroni restarts in place (crash recovery), then
1. kills the leader node (its Patroni and its PostgreSQL, SIGKILL: a machine lost — killing only
   PostgreSQL makes Patroni restart it in place, a restart rather than a failover), waits for
   Patroni to promote the standby, brings the old node back as a standby, and
2. runs `patronictl switchover` (a planned one), where look-ups must see no error at all;
then prints seconds without a successful write, answers by status, acknowledged writes lost (must
be 0), look-up audit records lost, and `kms audit verify`'s result. A failed run says which step
failed and why, and keeps its logs (the directory is printed). It installs what it needs with
apt-get when missing (Debian packages patroni, etcd-server, haproxy) and removes everything it
started. Run it as root (Patroni runs PostgreSQL as the user postgres):

    .venv/bin/python deploy/ha/drill.py          (DRILL_SECONDS: load before each event, default 8)
"""
import json
import os
import pwd
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))

PACKAGES = {"patroni": "patroni", "etcd": "etcd-server", "haproxy": "haproxy"}
SECONDS = float(os.environ.get("DRILL_SECONDS", "8"))
ADMIN = ("drill-admin", "Drill-admin-passw0rd")
PASSWORD = "Drill-passw0rd!"
KMS = str(Path(sys.executable).parent / "kms")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def say(text: str):
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def ensure_packages():
    missing = [package for command, package in PACKAGES.items() if not shutil.which(command)]
    if missing:
        say(f"installing {', '.join(missing)} (apt-get)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env, stdout=subprocess.DEVNULL)


def postgres_bin_dir() -> str:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name))
    if not versions:
        sys.exit("no PostgreSQL server in /usr/lib/postgresql: apt-get install postgresql")
    return str(versions[-1].parent)


class Stack:
    """Every process the drill starts, stopped (and its files removed) at the end."""

    def __init__(self):
        self.work = Path(tempfile.mkdtemp(prefix="kms-ha-drill-", dir="/tmp"))
        self.postgres_user = pwd.getpwnam("postgres")
        os.chmod(self.work, 0o755)
        # PostgreSQL's data, sockets and Patroni's pgpass live here, written by the user postgres.
        os.chown(self.work, self.postgres_user.pw_uid, self.postgres_user.pw_gid)
        self.processes: dict[str, subprocess.Popen] = {}
        self.logs = []
        self.ports = {name: free_port() for name in (
            "etcd", "etcd_peer", "rest1", "rest2", "pg1", "pg2", "pg_write", "tls", "kms1", "kms2")}

    def start(self, name: str, argv: list[str], *, as_postgres: bool = False, env: dict | None = None):
        log = open(self.work / f"{name}.log", "ab")
        self.logs.append(log)
        user = self.postgres_user

        def prepare():
            os.setsid()
            if as_postgres:
                os.setgroups([])
                os.setgid(user.pw_gid)
                os.setuid(user.pw_uid)

        self.processes[name] = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                                preexec_fn=prepare, env=env or os.environ.copy(), cwd=self.work)

    def kill(self, name: str, sig=signal.SIGKILL):
        process = self.processes.get(name)
        if process and process.poll() is None:
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                pass
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def stop_all(self, keep_logs: bool = False):
        for name in reversed(list(self.processes)):
            self.kill(name, signal.SIGTERM if name.startswith("kms") else signal.SIGKILL)
        for node in ("node1", "node2"):  # PostgreSQL outlives a killed Patroni: stop it by its pid file
            pid_file = self.work / node / "postmaster.pid"
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text().split()[0]), signal.SIGQUIT)
                except (ProcessLookupError, ValueError):
                    pass
        time.sleep(1)
        for log in self.logs:
            log.close()
        if keep_logs:  # what a failed run needs explained outlives the run
            kept = Path(tempfile.mkdtemp(prefix="kms-ha-drill-logs-", dir="/tmp"))
            for log in self.work.glob("*.log"):
                shutil.copy(log, kept)
            for node in ("node1", "node2"):
                for log in (self.work / node / "log").glob("*") if (self.work / node / "log").is_dir() else []:
                    shutil.copy(log, kept / f"{node}-{log.name}")
            say(f"logs kept in {kept}")
        shutil.rmtree(self.work, ignore_errors=True)

    def render(self, template: str, target: str, **values):
        text = string.Template((HERE / template).read_text()).substitute(work_dir=self.work, **values)
        (self.work / target).write_text(text)
        return self.work / target


def http_json(url: str, timeout: float = 2.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


class DrillFailed(Exception):
    """A step did not go as it must; the message says what did not happen."""


def wait_until(check, timeout: float, what: str):
    """Wait for `what` (worded as what is awaited: "Patroni to promote the standby")."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet, whatever the way it says so
            pass
        time.sleep(0.25)
    raise DrillFailed(f"gave up after {timeout:.0f} s waiting for {what}")


def cluster(stack) -> list[dict]:
    for port in (stack.ports["rest1"], stack.ports["rest2"]):
        try:
            return http_json(f"http://127.0.0.1:{port}/cluster")["members"]
        except OSError:
            continue
    return []


def leader(stack) -> str | None:
    return next((m["name"] for m in cluster(stack) if m["role"] == "leader" and m["state"] == "running"), None)


def healthy(stack) -> bool:
    members = cluster(stack)
    return (any(m["role"] == "leader" and m["state"] == "running" for m in members)
            and any(m["role"] == "sync_standby" and m["state"] in ("running", "streaming") for m in members))


def standby_caught_up(stack) -> bool:
    """Patroni names a synchronous standby (its /sync key: only that member may be promoted when the
    leader is lost) and the leader's PostgreSQL has that standby streaming as synchronous, less
    than 1 MB behind. Both, at once: after a restart of the leader's PostgreSQL, Patroni first
    clears its /sync key and names the standby again seconds after PostgreSQL already reports it
    synchronous; a leader lost in between is never replaced ("not the healthiest node")."""
    import psycopg2
    members = cluster(stack)
    current = next((m["name"] for m in members if m["role"] == "leader" and m["state"] == "running"), None)
    named = {m["name"] for m in members if m["role"] == "sync_standby"}
    if current is None or not named:
        return False
    conn = psycopg2.connect(host="127.0.0.1", port=stack.ports[f"pg{current[-1]}"], user="postgres",
                            dbname="postgres", connect_timeout=2)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT application_name FROM pg_stat_replication WHERE state = 'streaming' "
                        "AND sync_state = 'sync' AND pg_wal_lsn_diff(pg_current_wal_lsn(), flush_lsn) < 1048576")
            streaming = {row[0] for row in cur.fetchall()}
    finally:
        conn.close()
    return bool(named & streaming) and leader(stack) == current


def steadily(check, seconds: float):
    """`check`, made to hold for `seconds` on end (Patroni acts once per loop_wait, 2 s)."""
    since = [None]

    def held() -> bool:
        try:
            holds = check()
        except Exception:  # noqa: BLE001 - does not hold, whatever the way it says so
            holds = False
        if not holds:
            since[0] = None
            return False
        since[0] = since[0] or time.monotonic()
        return time.monotonic() - since[0] >= seconds
    return held


def failure_causes(stack, since: str = "") -> dict:
    """The KMS processes' logged failure causes from `since` (an ISO time, UTC) on, counted: what a
    failed step needs explained."""
    causes = Counter()
    for name in ("kms1", "kms2"):
        for line in (stack.work / f"{name}.log").read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if (entry.get("level") in ("warning", "error") and entry.get("logger") != "kms.access"
                    and entry.get("ts", "") >= since):
                causes[f"{entry.get('msg')}: {entry.get('cause') or entry.get('error_code')}"] += 1
    return dict(causes.most_common(8))


class Load:
    """A bounded mixed load through haproxy's TLS frontend; every answer recorded with its request id."""

    def __init__(self, base: str, ca: str, admin: str, owner: str):
        import requests
        self.requests = requests
        self.base, self.ca, self.admin, self.owner = base, ca, admin, owner
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.answers = []  # (phase, started, ended, operation, status, request id: None from haproxy itself)
        self.phase = "steady"
        self.began = {}  # phase -> when it began, as the KMS logs write time

    def begin(self, phase: str):
        self.began[phase] = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        self.phase = phase

    def _call(self, operation, method, path, token=None, json_body=None):
        started = time.monotonic()
        try:
            answer = self.requests.request(method, self.base + path, json=json_body, verify=self.ca, timeout=60,
                                           headers={"Authorization": f"Bearer {token}"} if token else {})
            status, request_id = answer.status_code, answer.headers.get("X-Request-ID")
        except Exception:  # noqa: BLE001 - a refused connection, or the stack being torn down
            answer, status, request_id = None, 0, None
        with self.lock:
            self.answers.append((self.phase, started, time.monotonic(), operation, status, request_id))
        return answer if status and status < 300 else None

    def _lookups(self):
        while not self.stop.is_set():
            self._call("lookup", "GET", "/keys/drill-key", self.owner)

    def _generates(self):
        while not self.stop.is_set():
            self._call("generate", "POST", "/keys/actions/generate", self.owner,
                       {"keyReference": f"k-{uuid.uuid4().hex[:12]}"})

    def _rotations(self):
        while not self.stop.is_set():
            self._call("rotate", "POST", "/keys/drill-key/actions/rotate", self.owner)
            time.sleep(0.05)

    def _sessions(self):
        while not self.stop.is_set():
            name = f"svc-{uuid.uuid4().hex[:8]}"
            issued = self._call("signup_token", "POST", "/auth/signup/generate", self.admin, {"clientname": name})
            if not issued:
                continue
            signed = self._call("signup", "POST", "/auth/signup", None,
                                {"token": issued.json()["token"], "password": PASSWORD})
            if signed:
                logged_in = self._call("login", "POST", "/auth/login", None, {"clientname": name, "password": PASSWORD})
                if logged_in:
                    self._call("logout", "POST", "/auth/logout", logged_in.json()["token"])

    def start(self):
        self.threads = [threading.Thread(target=work, daemon=True) for work in
                        (self._lookups, self._lookups, self._lookups, self._generates, self._rotations, self._sessions)]
        for thread in self.threads:
            thread.start()

    def finish(self):
        self.stop.set()
        for thread in getattr(self, "threads", []):
            thread.join(120)


def report(stack: Stack, load: Load, phase: str, event_at: float) -> list[str]:
    """Print what the step did to the load; return what went wrong in it (nothing: it passed).
    Every step: each request answered, 2xx or 503 (never a 500, never a dropped connection).
    The planned switchover: every look-up answered 200, too."""
    rows = [a for a in load.answers if a[0] == phase]
    # The longest stretch without a successful write, from the last one before the event on.
    writes = sorted(end for _, _, end, op, status, _ in load.answers
                    if op in ("generate", "rotate") and status == 200)
    around = [end for end in writes if end >= event_at] if writes else []
    last_before = max((end for end in writes if end < event_at), default=event_at)
    stretch = [last_before] + [end for end in around if end <= max(a[2] for a in rows)]
    gap = max((later - earlier for earlier, later in zip(stretch, stretch[1:])), default=float("inf"))
    by_status = Counter(status for *_, status, _ in rows)
    lookup_errors = Counter(status for _, _, _, op, status, _ in rows if op == "lookup" and status != 200)
    write_errors = Counter(status for _, _, _, op, status, _ in rows
                           if op != "lookup" and not (status and status < 300))
    from_proxy = sum(1 for *_, status, request_id in rows if status == 503 and request_id is None)
    say(f"{phase}: {gap:.1f} s without a successful write; answers by status {dict(sorted(by_status.items()))}"
        f"{f' ({from_proxy} of the 503s from haproxy itself)' if from_proxy else ''}; "
        f"look-ups not 200: {dict(lookup_errors) or 'none'}; other requests not 2xx: {dict(write_errors) or 'none'}")
    problems = []
    odd = {status or "no answer": count for status, count in by_status.items() if not (200 <= status < 300 or status == 503)}
    if odd:
        problems.append(f"{phase}: answers other than 2xx and 503: {odd}")
    if phase == "switchover" and lookup_errors:
        by_kms = sum(1 for _, _, _, op, status, rid in rows if op == "lookup" and status != 200 and rid is not None)
        problems.append(f"{phase}: {sum(lookup_errors.values())} look-ups not answered 200 ({by_kms} answered so by "
                        f"the KMS, {sum(lookup_errors.values()) - by_kms} by haproxy or unanswered); "
                        f"the KMS logged {failure_causes(stack, load.began[phase]) or 'no failure'}")
    return problems


def main() -> int:
    if os.geteuid() != 0:
        sys.exit("run the drill as root: Patroni runs PostgreSQL as the user postgres")
    # Stopped by Ctrl-C or a signal, even started in the background (where SIGINT is ignored), it
    # stops what it started and removes its files.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    import psycopg2
    import requests
    from kms.config import SECRET_VARIABLES, generate_secret
    ensure_packages()
    stack = Stack()
    ports = stack.ports
    load = None
    passed = False
    step = "setting up the stack"
    say(f"working in {stack.work}; ports {ports}")
    try:
        stack.start("etcd", ["etcd", "--name", "drill", "--data-dir", str(stack.work / "etcd"),
                             "--listen-client-urls", f"http://127.0.0.1:{ports['etcd']}",
                             "--advertise-client-urls", f"http://127.0.0.1:{ports['etcd']}",
                             "--listen-peer-urls", f"http://127.0.0.1:{ports['etcd_peer']}",
                             "--initial-advertise-peer-urls", f"http://127.0.0.1:{ports['etcd_peer']}",
                             "--initial-cluster", f"drill=http://127.0.0.1:{ports['etcd_peer']}"])
        wait_until(lambda: http_json(f"http://127.0.0.1:{ports['etcd']}/health")["health"] == "true", 30, "etcd up")
        bin_dir = postgres_bin_dir()
        for number in (1, 2):
            name = f"node{number}"
            config = stack.render("patroni.yml", f"{name}.yml", name=name, rest_port=ports[f"rest{number}"],
                                  etcd_port=ports["etcd"], pg_port=ports[f"pg{number}"],
                                  data_dir=stack.work / name, bin_dir=bin_dir)
            os.chown(config, stack.postgres_user.pw_uid, stack.postgres_user.pw_gid)
            stack.start(f"patroni-{name}", ["patroni", str(config)], as_postgres=True)
            if number == 1:
                wait_until(lambda: leader(stack) == "node1", 90, "node1 bootstrapped as leader")
        wait_until(lambda: healthy(stack), 120, "a leader and a synchronous standby")
        say(f"Patroni: {[(m['name'], m['role'], m['state']) for m in cluster(stack)]}")

        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                        "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", str(stack.work / "kms.key"), "-out", str(stack.work / "kms.crt")],
                       check=True, capture_output=True)
        (stack.work / "kms.pem").write_bytes((stack.work / "kms.crt").read_bytes() + (stack.work / "kms.key").read_bytes())
        haproxy_cfg = stack.render("haproxy.cfg", "haproxy.cfg", tls_port=ports["tls"], kms1_port=ports["kms1"],
                                   kms2_port=ports["kms2"], pg_write_port=ports["pg_write"], pg1_port=ports["pg1"],
                                   pg2_port=ports["pg2"], rest1_port=ports["rest1"], rest2_port=ports["rest2"])
        stack.start("haproxy", ["haproxy", "-db", "-f", str(haproxy_cfg)])
        write_url = f"postgresql://postgres@127.0.0.1:{ports['pg_write']}"
        def writable_through_haproxy() -> bool:
            # haproxy counts a server up until its first checks fail: wait until they did
            conn = psycopg2.connect(write_url + "/postgres", connect_timeout=2)
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT NOT pg_is_in_recovery()")
                    return cur.fetchone()[0]
            finally:
                conn.close()

        wait_until(lambda: all(writable_through_haproxy() for _ in range(4)), 30, "haproxy leads to the leader")
        admin_conn = psycopg2.connect(write_url + "/postgres")
        admin_conn.autocommit = True
        with admin_conn.cursor() as cur:
            cur.execute("CREATE DATABASE kms")
        admin_conn.close()

        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
        env.update({name: generate_secret() for name in SECRET_VARIABLES})
        env.update(DATABASE_URL=write_url + "/kms", SERVER_THREADS="8", TRUSTED_PROXY_HOPS="1",
                   AUDIT_SEAL_INTERVAL="500", MASTER_ADMIN_USERNAME=ADMIN[0], MASTER_ADMIN_PASSWORD=ADMIN[1],
                   # every signup of the load comes from one address, faster than the default 5 a second
                   SERVER_UNVERIFIED_RATE="100")
        for number in (1, 2):
            stack.start(f"kms{number}", [KMS, "serve"], env={**env, "SERVER_PORT": str(ports[f"kms{number}"])})
            wait_until(lambda: http_json(f"http://127.0.0.1:{ports[f'kms{number}']}/readyz")["status"] == "ready",
                       60, f"kms{number} ready")
        base, ca = f"https://127.0.0.1:{ports['tls']}", str(stack.work / "kms.crt")
        wait_until(lambda: requests.get(base + "/readyz", verify=ca, timeout=2).status_code == 200, 30,
                   "haproxy's TLS frontend ready")
        admin = requests.post(base + "/auth/login", json={"clientname": ADMIN[0], "password": ADMIN[1]},
                              verify=ca).json()["token"]
        issued = requests.post(base + "/auth/signup/generate", json={"clientname": "drill-owner"}, verify=ca,
                               headers={"Authorization": f"Bearer {admin}"}).json()["token"]
        owner = requests.post(base + "/auth/signup", json={"token": issued, "password": PASSWORD},
                              verify=ca).json()["token"]
        requests.post(base + "/keys/actions/generate", json={"keyReference": "drill-key"}, verify=ca,
                      headers={"Authorization": f"Bearer {owner}"}).raise_for_status()
        say(f"stack up: etcd, Patroni node1 + node2, haproxy (TLS :{ports['tls']}, PostgreSQL :{ports['pg_write']}), "
            "two KMS processes")

        load = Load(base, ca, admin, owner)
        load.start()
        time.sleep(SECONDS)
        problems = []

        # 0. The leader's PostgreSQL crashes (SIGKILL), its Patroni lives: Patroni restarts it in
        #    place (crash recovery), keeping the leader lock: no failover.
        step = "step 0 (postgres crash: the leader's PostgreSQL killed, restarted in place by Patroni)"
        load.begin("postgres crash")
        crashed = leader(stack)
        pid = int((stack.work / crashed / "postmaster.pid").read_text().split()[0])
        crashed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        say(f"postgres crash: killed {crashed}'s PostgreSQL (SIGKILL); its Patroni restarts it")
        wait_until(lambda: healthy(stack) and leader(stack) == crashed, 120,
                   f"{crashed}'s PostgreSQL to be back as the leader, with a synchronous standby")
        time.sleep(SECONDS)
        problems += report(stack, load, "postgres crash", crashed_at)

        # 1. Failover: the leader node is lost.
        step = "step 1 (failover: the leader node killed, Patroni promotes the standby)"
        wait_until(steadily(lambda: standby_caught_up(stack), 3), 120,
                   "Patroni to name the standby synchronous again while it streams, caught up")
        lost = leader(stack)
        load.begin("failover")
        pid = int((stack.work / lost / "postmaster.pid").read_text().split()[0])
        failed_at = time.monotonic()
        stack.kill(f"patroni-{lost}")
        os.kill(pid, signal.SIGKILL)
        say(f"failover: killed {lost} (Patroni and PostgreSQL, SIGKILL)")
        wait_until(lambda: leader(stack) not in (None, lost), 60, "Patroni to promote the standby")
        say(f"failover: Patroni promoted {leader(stack)} {time.monotonic() - failed_at:.1f} s after the kill")
        time.sleep(SECONDS)
        problems += report(stack, load, "failover", failed_at)

        # The lost node comes back, as a standby (pg_rewind).
        step = "the rejoin (the lost node back as the synchronous standby)"
        load.begin("rejoin")
        for leftover in ("postmaster.pid",):
            (stack.work / lost / leftover).unlink(missing_ok=True)
        stack.start(f"patroni-{lost}", ["patroni", str(stack.work / f"{lost}.yml")], as_postgres=True)
        wait_until(lambda: healthy(stack), 180, f"{lost} to be back as the synchronous standby")
        say(f"rejoin: {[(m['name'], m['role'], m['state']) for m in cluster(stack)]}")

        # 2. Switchover, planned.
        step = "step 2 (switchover: planned, by patronictl)"
        wait_until(steadily(lambda: standby_caught_up(stack), 3), 120,
                   "Patroni to name the standby synchronous while it streams, caught up")
        load.begin("switchover")
        current = leader(stack)
        candidate = next(m["name"] for m in cluster(stack) if m["name"] != current)
        time.sleep(SECONDS / 2)
        switched_at = time.monotonic()
        result = subprocess.run(["patronictl", "-c", str(stack.work / f"{current}.yml"), "switchover",
                                 "--leader", current, "--candidate", candidate, "--force"],
                                capture_output=True, text=True, timeout=120)
        say(f"switchover: patronictl exit {result.returncode}; {current} -> {candidate}")
        if result.returncode != 0:
            raise DrillFailed(f"patronictl switchover exited {result.returncode}: "
                              f"{(result.stderr or result.stdout).strip().splitlines()[-1:]}")
        wait_until(lambda: leader(stack) == candidate, 60, f"{candidate} to lead (the switchover to finish)")
        time.sleep(SECONDS)
        load.finish()
        problems += report(stack, load, "switchover", switched_at)
        odd = Counter(status for phase, *_, status, _ in load.answers if phase in ("steady", "rejoin")
                      and not (200 <= status < 300 or status == 503))
        if odd:
            problems.append(f"before the events or during the rejoin: answers other than 2xx and 503: {dict(odd)}")

        # What was acknowledged is on the final leader.
        step = "the final checks (acknowledged writes on the final leader, the audit chain)"
        acknowledged = {}
        for _, _, _, op, status, request_id in load.answers:
            if status and status < 300 and request_id:
                acknowledged.setdefault(op, []).append(request_id)
        conn = psycopg2.connect(write_url + "/kms")
        with conn.cursor() as cur:
            cur.execute("SELECT request_id::text FROM audit_events WHERE request_id IS NOT NULL")
            recorded = {row[0] for row in cur.fetchall()}
        conn.close()
        lost_writes = {op: sum(1 for rid in ids if rid not in recorded)
                       for op, ids in acknowledged.items() if op != "lookup"}
        lookups = acknowledged.get("lookup", [])
        lost_lookups = sum(1 for rid in lookups if rid not in recorded)
        say(f"acknowledged: { {op: len(ids) for op, ids in sorted(acknowledged.items())} }")
        say(f"acknowledged writes lost: {sum(lost_writes.values())} {lost_writes}")
        say(f"look-up audit records lost: {lost_lookups} of {len(lookups)}")
        if sum(lost_writes.values()):
            problems.append(f"acknowledged writes lost: {lost_writes}")
        verified = subprocess.run([KMS, "audit", "verify"], env={**env, "SERVER_PORT": str(ports["kms1"])},
                                  capture_output=True, text=True, timeout=300)
        say(f"kms audit verify: exit {verified.returncode}: {(verified.stdout or verified.stderr).strip()}")
        if verified.returncode != 0:
            problems.append(f"kms audit verify exited {verified.returncode}")
        for problem in problems:
            say(f"FAILED: {problem}")
        passed = not problems
        say("DRILL PASSED" if passed else f"DRILL FAILED: {len(problems)} check(s) above")
        return 0 if passed else 1
    except DrillFailed as failure:
        tails(stack)
        say(f"DRILL FAILED in {step}: {failure}")
        return 1
    except KeyboardInterrupt:
        say(f"drill interrupted in {step}")
        return 130
    except BaseException:
        tails(stack)
        say(f"DRILL FAILED in {step}: the drill itself broke (traceback below)")
        raise
    finally:
        if load is not None:  # before the files it uses go
            load.finish()
        stack.stop_all(keep_logs=not passed)
        say("stopped everything the drill started and removed its files")


def tails(stack: Stack):
    for log in sorted(stack.work.glob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-5:]
        print(f"--- {log.name}\n" + "\n".join(tail), file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
