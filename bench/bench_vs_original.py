"""Key look-ups side by side with the original Go KMS, on the original's own benchmark: `GET` of
version 1 of one key, at 1, 4, 16, 64 and 256 connections.

Sides, all started by this script, all against the same PostgreSQL server (databases of their own):
- `original`: the Go KMS built from its repository, serving HTTPS itself, started by its
  `run-seed.sh` (BENCH_ORIGINAL_ROOT: the directory its build notes lay out, with seed/bin,
  tls/ and run-seed.sh);
- `tls-1w`, `tls-2w`: this KMS with 1 and 2 worker processes behind haproxy terminating TLS (as in
  docs/DEPLOYMENT.md; TRUSTED_PROXY_HOPS=1);
- `plain-2w`: this KMS with 2 workers on plain HTTP;
- `bare`: the yardstick (bench/bare_app.py), Flask + waitress + one SELECT in one process.

Each connection count runs BENCH_ROUNDS rounds; a round runs every side once for BENCH_SECONDS, in
an order that turns by one side each round. A ratio is the median of the rounds' ratios (taken
within a round, so a VM that slows down for a minute slows both sides of it); a side's row is its
median run. CPU per look-up is read from the scheduler's counts of the side's processes (server,
haproxy) and of the PostgreSQL backends of its database.

    BENCH_ORIGINAL_ROOT=/path/to/original-build python bench/bench_vs_original.py
    (BENCH_SECONDS=10, BENCH_ROUNDS=3, BENCH_CONNECTIONS=1,4,16,64,256, BENCH_SIDES=every side,
     BENCH_THREADS=16, BENCH_DATABASE_URL)
"""
import os
import re
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg2  # noqa: E402

from bench.common import (DEFAULT_DATABASE, ROOT, SERVER_PIDS, _descendants, _on_cpu_seconds, bench_database, call, free_port,  # noqa: E402
                          kms_env, new_client, require_wrk, server_process, with_cpu, wrk)

SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
THREADS = int(os.environ.get("BENCH_THREADS", "16"))
CONNECTIONS = tuple(int(c) for c in os.environ.get("BENCH_CONNECTIONS", "1,4,16,64,256").split(","))
SIDES = ("original", "tls-1w", "tls-2w", "plain-2w", "bare")
CHOSEN = tuple(os.environ.get("BENCH_SIDES", ",".join(SIDES)).split(","))
LABELS = {"original": "original (Go, HTTPS)", "tls-1w": "this, 1 worker, TLS", "tls-2w": "this, 2 workers, TLS",
          "plain-2w": "this, 2 workers, plain HTTP", "bare": "bare Flask+waitress+SELECT, 1 process"}
KEY = "bench-key"
LOOKUP = f"/keys/{KEY}/1"  # version 1 of a key with one version, on both KMSes
# Long enough for every token to outlive the run; 256 connections from one address need more than
# the default per-source connection limit.
KMS_SETTINGS = {"JWT_TTL": str(6 * 3600 * 1000), "SERVER_CONNECTION_LIMIT_PER_SOURCE": "1000", "LOG_LEVEL": "INFO"}

HAPROXY_CONFIG = """
global
    maxconn 4000
defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout http-request 10s
frontend kms_tls
    bind 127.0.0.1:{tls_port} ssl crt {pem}
    http-request set-header X-Forwarded-For %[src]
    default_backend kms
backend kms
    server kms1 127.0.0.1:{kms_port}
"""


class Side:
    """A server under test: its URL (what wrk loads), token, database and the processes whose CPU
    counts (`pid`: the server and its children; `proxy_pid`: haproxy in front of it, if any)."""

    def __init__(self, name, url, token, database_url, pid, proxy_pid=None):
        self.name, self.url, self.token, self.database_url = name, url, token, database_url
        self.pid, self.proxy_pid = pid, proxy_pid
        self.path = LOOKUP

    def run(self, connections: int) -> dict:
        proxy_before, ended_before = self._proxy_seconds(), ended_backends_seconds()
        result = with_cpu(self.url, self.database_url,
                          lambda: wrk(self.url, "GET", self.path, connections=connections, seconds=SECONDS,
                                      token=self.token))
        result["proxy_ms"] = (self._proxy_seconds() - proxy_before) * 1000 / max(result["requests"], 1)
        # The original's pool keeps two idle connections and closes the others as requests end, so
        # its backends come and go within a run; what the ended ones cost is the postmaster's
        # reaped children's time (of the whole server: other databases' ended backends too).
        result["ended_ms"] = (ended_backends_seconds() - ended_before) * 1000 / max(result["requests"], 1)
        return result

    def warm_up(self, connections: int):
        wrk(self.url, "GET", self.path, connections=connections, seconds=1, token=self.token)

    def _proxy_seconds(self) -> float:
        return _on_cpu_seconds(self.proxy_pid) if self.proxy_pid else 0.0


def ended_backends_seconds() -> float:
    """CPU time of the PostgreSQL server's ended backends so far (its postmaster's reaped
    children), or 0 when the postmaster is not on this machine."""
    global POSTMASTER
    if POSTMASTER is None:
        try:
            with psycopg2.connect(os.environ.get("BENCH_DATABASE_URL", DEFAULT_DATABASE)) as conn, conn.cursor() as cur:
                cur.execute("SELECT setting FROM pg_settings WHERE name = 'data_directory'")
                POSTMASTER = int((Path(cur.fetchone()[0]) / "postmaster.pid").read_text().split()[0])
            conn.close()
        except (OSError, ValueError, psycopg2.Error):
            POSTMASTER = 0
    if not POSTMASTER:
        return 0.0
    try:
        fields = Path(f"/proc/{POSTMASTER}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")  # cutime + cstime


POSTMASTER = None


def original_root() -> Path:
    root = os.environ.get("BENCH_ORIGINAL_ROOT")
    if not root or not (Path(root) / "seed" / "bin" / "kms-loopback").exists():
        sys.exit("BENCH_ORIGINAL_ROOT must name the original's build directory (seed/bin/kms-loopback, tls/, "
                 "run-seed.sh, seed-bench-setup.sh), laid out as its build notes say")
    return Path(root)


@contextmanager
def original_database(server_url: str):
    """A database name for the original (its run-seed.sh creates it), dropped afterwards."""
    database = f"kms_bench_orig_{uuid.uuid4().hex[:8]}"
    try:
        yield database
    finally:
        admin = psycopg2.connect(server_url)
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        admin.close()


@contextmanager
def original_side(server_url: str, database: str, state: dict):
    """The original KMS on its database, with a client and its key made by its
    seed-bench-setup.sh the first time (kept in `state`)."""
    root = original_root()
    port = free_port()
    env = {**os.environ, "SEED_ROOT": str(root), "LOG_LEVEL": "info", "JWT_TTL": str(6 * 3600 * 1000)}
    log = tempfile.NamedTemporaryFile(prefix="kms-bench-original-", suffix=".log", delete=False)
    process = subprocess.Popen([str(root / "run-seed.sh"), str(port), database], env=env, stdout=log, stderr=log)
    url = f"https://127.0.0.1:{port}"
    database_url = re.sub(r"/[^/?]*(\?|$)", f"/{database}\\1", server_url, count=1)
    try:
        context = ssl.create_default_context(cafile=str(root / "tls" / "ca.pem"))
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/", timeout=1, context=context)
                break
            except urllib.error.HTTPError:
                break  # it answers
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the original did not start: " + Path(log.name).read_text()[-800:])
                time.sleep(0.2)
        if "token" not in state:
            setup = subprocess.run([str(root / "seed-bench-setup.sh"), str(port), "bench-client", KEY], env=env,
                                   capture_output=True, text=True, check=True).stdout
            state["token"] = re.search(r"^SEED_TOKEN=(\S+)$", setup, re.M).group(1)
        SERVER_PIDS[url] = process.pid  # run-seed.sh execs the server
        yield Side("original", url, state["token"], database_url, process.pid)
    finally:
        process.terminate()
        process.wait(timeout=30)
        os.unlink(log.name)
        shutil.rmtree(root / f"seed-run-{port}", ignore_errors=True)


@contextmanager
def haproxy(kms_port: int, pem: Path):
    """haproxy terminating TLS on a port of its own, forwarding plain HTTP to kms_port."""
    tls_port = free_port()
    with tempfile.NamedTemporaryFile("w", prefix="kms-bench-haproxy-", suffix=".cfg", delete=False) as config:
        config.write(HAPROXY_CONFIG.format(tls_port=tls_port, pem=pem, kms_port=kms_port))
    process = subprocess.Popen(["haproxy", "-f", config.name, "-db"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        context = ssl._create_unverified_context()
        while True:
            try:
                urllib.request.urlopen(f"https://127.0.0.1:{tls_port}/healthz", timeout=1, context=context)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("haproxy did not start")
                time.sleep(0.1)
        yield tls_port, process.pid
    finally:
        process.terminate()
        process.wait(timeout=30)
        os.unlink(config.name)


@contextmanager
def kms_side(name: str, env: dict, database_url: str, workers: int, pem: Path | None, state: dict):
    port = free_port()
    settings = {**env, **KMS_SETTINGS, "SERVER_PORT": str(port), "SERVER_WORKERS": str(workers)}
    if pem:
        settings["TRUSTED_PROXY_HOPS"] = "1"
    with server_process([sys.executable, "app.py"], settings, port) as url:
        if "token" not in state:
            state["token"] = new_client(url, f"bench-{name}-{uuid.uuid4().hex[:6]}")
            call(url, "POST", "/keys/actions/generate", {"keyReference": KEY}, state["token"])
        token = state["token"]
        pid = SERVER_PIDS[url]
        if pem is None:
            yield Side(name, url, token, database_url, pid)
            return
        with haproxy(port, pem) as (tls_port, proxy_pid):
            tls_url = f"https://127.0.0.1:{tls_port}"
            SERVER_PIDS[tls_url] = pid
            yield Side(name, tls_url, token, database_url, pid, proxy_pid)


@contextmanager
def bare_side(database_url: str):
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url, "SERVER_PORT": str(port), "SERVER_THREADS": str(THREADS)}
    with server_process([sys.executable, str(ROOT / "bench" / "bare_app.py")], env, port) as url:
        side = Side("bare", url, "", database_url, SERVER_PIDS[url])
        side.path = f"/bare/{KEY}"
        yield side


def tls_pem(directory: Path) -> Path:
    """The original's server certificate and key in one file, for haproxy (same TLS on both)."""
    root = original_root()
    pem = directory / "kms.pem"
    pem.write_bytes((root / "tls" / "server.crt").read_bytes() + (root / "tls" / "server.key").read_bytes())
    pem.chmod(0o600)
    return pem


def median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda run: run["rps"])[len(runs) // 2]


def ratio(results: dict, numerator: str, denominator: str, key: str = "rps") -> tuple[float, list]:
    ratios = [a[key] / b[key] for a, b in zip(results[numerator], results[denominator])]
    return statistics.median(ratios), ratios


def server_cpu_text(runs: list[dict], churns: bool) -> str:
    med = lambda key: statistics.median(run[key] for run in runs) * 1000  # noqa: E731
    proxy = f" + haproxy {med('proxy_ms'):.0f}" if med("proxy_ms") else ""
    ended = f" + ended PG backends {med('ended_ms'):.0f}" if churns else ""
    return f"server {med('server_ms'):.0f}{proxy} + PG {med('postgres_ms'):.0f}{ended} us"


def report(connections: int, results: dict):
    base = "original" if "original" in results else None
    print(f"\n### c={connections}  ({ROUNDS} rounds of {SECONDS} s; ratio = median of the rounds' ratios)", flush=True)
    print(f"{'side':<38} {'req/s':>8} {'ratio':>20} {'p99 ms':>8} {'p99 ratio':>10}   CPU per look-up", flush=True)
    for name in results:
        run = median_run(results[name])
        if base and name != base:
            r, rounds = ratio(results, name, base)
            p, _ = ratio(results, name, base, "p99_ms")
            ratio_text, p99_text = f"{r:.2f}x ({' '.join(f'{x:.2f}' for x in rounds)})", f"{p:.2f}x"
        else:
            ratio_text, p99_text = "", ""
        errors = f"  non-2xx {run['non_2xx']}" if run["non_2xx"] else ""
        errors += f"  socket errors: {run['socket_errors']}" if run["socket_errors"] else ""
        print(f"{LABELS[name]:<38} {run['rps']:>8.0f} {ratio_text:>20} {run['p99_ms']:>8.1f} {p99_text:>10}   "
              f"{server_cpu_text(results[name], name == 'original')}{errors}", flush=True)
    for numerator, denominator in (("plain-2w", "bare"), ("tls-1w", "bare"), ("tls-2w", "tls-1w")):
        if numerator in results and denominator in results:
            r, rounds = ratio(results, numerator, denominator)
            print(f"{numerator} / {denominator} = {r:.2f}x ({' '.join(f'{x:.2f}' for x in rounds)})", flush=True)


def main():
    require_wrk()
    if not shutil.which("haproxy") and any(side.startswith("tls") for side in CHOSEN):
        sys.exit("haproxy is needed: apt-get install haproxy")
    print(f"# GET {LOOKUP}; {SECONDS} s per run, {ROUNDS} rounds, connections {CONNECTIONS}, {THREADS} server "
          f"threads; wrk on 127.0.0.1; sides: {', '.join(CHOSEN)}", flush=True)
    with ExitStack() as stack:
        server_url = os.environ.get("BENCH_DATABASE_URL", DEFAULT_DATABASE)
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kms-bench-")))
        sides, first_kms_url = {}, None
        # Each side's servers run only for its own runs (started, warmed up for a second, measured,
        # stopped): the stock PostgreSQL's 100 connections do not hold every side's pools at once.
        # Every KMS side has a database of its own, so the PostgreSQL CPU counted for it is its own
        # (its sealer's included); the bare endpoint reads the first one's key.
        for name in sorted(CHOSEN, key=lambda name: name == "bare"):
            state = {}
            if name == "original":
                # The original runs throughout: it cannot start again on its database (it looks for
                # its admin by a role it stores encrypted, finds none, and fails to insert it twice);
                # idle, it keeps two connections.
                database = stack.enter_context(original_database(server_url))
                original = stack.enter_context(original_side(server_url, database, state))
                sides[name] = lambda original=original: nullcontext(original)
            elif name == "bare":
                if not first_kms_url:
                    sys.exit("the bare endpoint reads a KMS side's key: choose one in BENCH_SIDES too")
                url = first_kms_url
                sides[name] = lambda url=url: bare_side(url)
            else:
                url = stack.enter_context(bench_database())
                first_kms_url = first_kms_url or url
                tls, workers = name.split("-")
                sides[name] = (lambda name=name, env=kms_env(url, 0, THREADS), url=url, workers=int(workers.rstrip("w")),
                               pem=tls_pem(directory) if tls == "tls" else None, state=state:
                               kms_side(name, env, url, workers, pem, state))
            with sides[name]():  # set up: a client and its key
                pass
        sides = {name: sides[name] for name in CHOSEN}
        for connections in CONNECTIONS:
            results = {name: [] for name in sides}
            order = list(sides)
            for round_no in range(ROUNDS):
                turned = order[round_no % len(order):] + order[:round_no % len(order)]
                for name in turned:
                    with sides[name]() as side:
                        side.warm_up(connections)
                        results[name].append(side.run(connections))
            report(connections, results)


if __name__ == "__main__":
    main()
