"""Shared benchmark plumbing: a database, servers in their own processes, and wrk.

Load comes from wrk (Debian package `wrk`), a separate C process, so the load generator does not
share Python's interpreter with the server it measures. Each run is bounded in time and targets
127.0.0.1 only.
"""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import psycopg2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kms.config import SECRET_VARIABLES, generate_secret  # noqa: E402

DEFAULT_DATABASE = "postgresql://postgres@127.0.0.1:5432/postgres"
CLIENT_PASSWORD = "Bench-passw0rd!"
ADMIN = ("bench-admin", "Bench-admin-passw0rd")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def bench_database():
    """A fresh database on BENCH_DATABASE_URL's server (default: the local PostgreSQL, with its
    durable settings), or on a throwaway server when that is unreachable."""
    server_url = os.environ.get("BENCH_DATABASE_URL", DEFAULT_DATABASE)
    throwaway = None
    try:
        psycopg2.connect(server_url, connect_timeout=2).close()
    except psycopg2.OperationalError:
        from kms.serving.throwaway_postgres import ThrowawayPostgres
        throwaway = ThrowawayPostgres().start()
        server_url = throwaway.dsn
        print("# using a throwaway PostgreSQL (fsync off)", flush=True)
    name = f"kms_bench_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(server_url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    url = re.sub(r"/[^/?]*(\?|$)", f"/{name}\\1", server_url, count=1) if server_url.count("/") > 2 else server_url
    try:
        yield url
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
        if throwaway:
            throwaway.destroy()


def kms_env(database_url: str, port: int, threads: int, **overrides) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEK", "DB_", "JWT_", "MASTER_ADMIN"))}
    env.update({name: generate_secret() for name in SECRET_VARIABLES})
    env.update(DATABASE_URL=database_url, SERVER_PORT=str(port), SERVER_THREADS=str(threads),
               MASTER_ADMIN_USERNAME=ADMIN[0], MASTER_ADMIN_PASSWORD=ADMIN[1], LOG_LEVEL="INFO")
    env.update({k: str(v) for k, v in overrides.items()})
    return env


SERVER_PIDS: dict[str, int] = {}  # base URL -> the server's process id (see cpu_seconds)


def _descendants(pid: int) -> list[int]:
    found, pending = [], [pid]
    while pending:
        parent = pending.pop()
        found.append(parent)
        for task in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                pending.extend(int(child) for child in task.read_text().split())
            except OSError:
                pass
    return found


def _on_cpu_seconds(pid: int) -> float:
    """Every thread's time on a CPU, in nanoseconds as the scheduler keeps it (finer than the 10 ms
    ticks of /proc/PID/stat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            total += int(task.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total / 1e9


def cpu_seconds(base_url: str, database_url: str) -> dict:
    """CPU time used so far by a server's processes (the one started for base_url and its
    children) and by the PostgreSQL backends connected to its database: read before and after a
    run, the difference over the requests served is CPU per request, which a busy VM disturbs far
    less than throughput. (A backend that ends in between takes its time with it: servers here keep
    their pools open.)"""
    name = database_url.rsplit("/", 1)[1].split("?", 1)[0]
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT pid, application_name = 'kms-audit-sealer' FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
        backends = cur.fetchall()
    conn.close()
    return {"server": sum(map(_on_cpu_seconds, _descendants(SERVER_PIDS[base_url]))),
            "postgres": sum(_on_cpu_seconds(pid) for pid, _ in backends),
            "sealer_postgres": sum(_on_cpu_seconds(pid) for pid, sealer in backends if sealer)}


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU time of the whole machine so far, in clock ticks (/proc/stat)."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = fields[3] + fields[4]  # idle, iowait
    return sum(fields) - idle, sum(fields)


def with_cpu(base_url: str, database_url: str, run) -> dict:
    """run() (a wrk result), with the CPU it cost per request, in ms: the server's processes
    (`server_ms`), PostgreSQL's backends for the database (`postgres_ms`, of which the sealer's
    `sealer_postgres_ms`), their sum (`cpu_ms`); and how many of the machine's cores were busy
    meanwhile, wrk and everything else included (`busy_cores`)."""
    before, (busy, total) = cpu_seconds(base_url, database_url), machine_cpu()
    result = run()
    after, (busy_after, total_after) = cpu_seconds(base_url, database_url), machine_cpu()
    for part in ("server", "postgres", "sealer_postgres"):
        result[f"{part}_ms"] = (after[part] - before[part]) * 1000 / max(result["requests"], 1)
    result["cpu_ms"] = result["server_ms"] + result["postgres_ms"]
    result["busy_cores"] = (busy_after - busy) / max(total_after - total, 1) * (os.cpu_count() or 1)
    return result


@contextmanager
def server_process(argv: list[str], env: dict, port: int, cwd: Path = ROOT):
    """Run a server in its own process (logs to a file: they cost what they cost in production)."""
    log = tempfile.NamedTemporaryFile(prefix="kms-bench-", suffix=".log", delete=False)
    process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=log)
    SERVER_PIDS[f"http://127.0.0.1:{port}"] = process.pid
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start; see {log.name}")
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)
        os.unlink(log.name)


@contextmanager
def kms_with_key(env: dict, port: int, cwd: Path = ROOT):
    """A KMS in its own process, with a client of its own whose key bench-key has versions 1 and
    2: (base URL, the client's token)."""
    with server_process([sys.executable, "app.py"], env, port, cwd=cwd) as url:
        token = new_client(url, f"bench-{uuid.uuid4().hex[:8]}")
        call(url, "POST", "/keys/actions/generate", {"keyReference": "bench-key"}, token)
        call(url, "POST", "/keys/bench-key/actions/rotate", None, token)
        yield url, token


def call(base_url: str, method: str, path: str, body=None, token: str | None = None):
    request = urllib.request.Request(base_url + path, method=method,
                                     data=json.dumps(body).encode() if body is not None else None)
    if body is not None:
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=30) as response:
        text = response.read()
        return json.loads(text) if text else None


def new_client(base_url: str, clientname: str) -> str:
    admin = call(base_url, "POST", "/auth/login", {"clientname": ADMIN[0], "password": ADMIN[1]})["token"]
    signup = call(base_url, "POST", "/auth/signup/generate", {"clientname": clientname}, admin)["token"]
    return call(base_url, "POST", "/auth/signup", {"token": signup, "password": CLIENT_PASSWORD})["token"]


def require_wrk():
    if not shutil.which("wrk"):
        sys.exit("wrk is needed: apt-get install wrk")


LUA_SCRIPT = r"""
local counter = 0
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
function init(args)
  method, path, body_kind, token, prefix = args[1], args[2], args[3], args[4], args[5]
  if body_kind == "file" then  -- the same JSON body every time, read once from the file named by prefix
    local file = io.open(prefix, "rb")
    file_body = file:read("*a")
    file:close()
  end
end
function request()
  counter = counter + 1
  local headers = {["Authorization"] = "Bearer " .. token}
  local body = nil
  if body_kind == "generate" then
    headers["Content-Type"] = "application/json"
    body = '{"keyReference":"' .. prefix .. '-' .. tid .. '-' .. counter .. '"}'
  elseif body_kind == "file" then
    headers["Content-Type"] = "application/json"
    body = file_body
  elseif body_kind == "login" then
    headers = {["Content-Type"] = "application/json"}
    body = token
  end
  return wrk.format(method, path, headers, body)
end
"""


def _seconds(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(value) * {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60}[unit]


def wrk(base_url: str, method: str, path: str, *, connections: int, seconds: int = 8, body_kind: str = "none",
        token: str = "", prefix: str = "r") -> dict:
    """Run wrk; returns requests/s, p50/p99 in ms and how many answers were not 2xx."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(LUA_SCRIPT)
    try:
        threads = min(connections, 2)
        output = subprocess.run(
            ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "10s",
             "-s", script.name, base_url, "--", method, path, body_kind, token, prefix],
            capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    finally:
        os.unlink(script.name)
    latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", output, re.M))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(r"Socket errors: (.*)", output)
    requests = int(re.search(r"(\d+) requests in", output).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    non_2xx = int(errors.group(1)) if errors else 0
    return {
        "rps": rps,
        "ok_rps": rps * (requests - non_2xx) / requests if requests else 0.0,
        "p50_ms": _seconds(latency["50"]) * 1000,
        "p99_ms": _seconds(latency["99"]) * 1000,
        "non_2xx": non_2xx,
        "requests": requests,
        "socket_errors": socket_errors.group(1) if socket_errors else "",
    }


def row(label: str, result: dict) -> str:
    extra = f"  non-2xx {result['non_2xx']} (2xx: {result['ok_rps']:.1f}/s)" if result["non_2xx"] else ""
    extra += f"  socket errors: {result['socket_errors']}" if result["socket_errors"] else ""
    return (f"{label:<44} {result['rps']:>9.1f} req/s   p50 {result['p50_ms']:>7.2f} ms"
            f"   p99 {result['p99_ms']:>7.2f} ms{extra}")
