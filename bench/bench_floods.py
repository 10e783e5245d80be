"""Key access during floods: what a client that holds a valid token keeps of its look-ups while
others flood the KMS, each flood beside the same look-ups alone, alternating rounds, 2 workers.

Token holder: wrk, 16 connections, GET /keys/bench-key from 127.0.0.1. Floods come from other
loopback addresses (127.0.0.2 ...), from a Python asyncio generator sharing the cores (its CPU is
printed), every connection re-sending the moment its answer comes:

  signup      POST /auth/signup with bad tokens            300 connections, 50 sources
  bad-jwt     GET /keys/bench-key with a forged token      300 connections, 50 sources
  readyz      GET /readyz                                  300 connections, 50 sources
  healthz     GET /healthz                                 300 connections, 50 sources
  metrics     GET /metrics                                 100 connections, 50 sources
  idle        2,100 connections that never send a byte, from 5 sources; the look-ups then open a
              new connection each (a Python client, 16 threads)
  password    wrong-password logins                        300 connections, 50 sources; beside it a
              client that logs in before every look-up (as the original's Go SDK does)
  sdk         no flood: 8 threads x login-then-look-up (the Go SDK's pattern) with a rotation in
              between, and a second client's logins meanwhile

One line per flood: look-up throughput kept (during / alone) and p99 ratio, the flood's own rate.

    python bench/bench_floods.py     (needs wrk; BENCH_SECONDS, BENCH_ROUNDS, BENCH_THREADS,
                                      BENCH_DATABASE_URL, BENCH_FLOODS=signup,bad-jwt,...)
"""
import http.client
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (ADMIN, CLIENT_PASSWORD, bench_database, call, free_port, kms_env, new_client,  # noqa: E402
                          require_wrk, server_process, wrk)
from bench.floods import flood, idle_sockets, in_background, request_bytes  # noqa: E402

SECONDS = int(os.environ.get("BENCH_SECONDS", "8"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
THREADS = int(os.environ.get("BENCH_THREADS", "16"))
FLOODS = os.environ.get("BENCH_FLOODS", "signup,bad-jwt,readyz,healthz,metrics,idle,password,sdk").split(",")
FORGED_JWT = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIwMDAwMDAwMC0wMDAwLTAwMDAtMDAwMC0wMDAwMDAwMDAwMDAiLCJleHAiOjQx"
              "MDI0NDQ4MDB9.forged-signature-forged-signature-forged-sig")


def lookups(kms: str, token: str) -> dict:
    return wrk(kms, "GET", "/keys/bench-key", connections=16, seconds=SECONDS, token=token)


def fresh_connection_lookups(kms: str, token: str, seconds: float, threads: int = 16) -> dict:
    """Look-ups that each open a new connection (as a client arriving during an idle-socket flood)."""
    host, port = kms.rsplit("/", 1)[1].split(":")
    latencies, failures = [], []
    until = time.monotonic() + seconds

    def run():
        while time.monotonic() < until:
            started = time.monotonic()
            connection = http.client.HTTPConnection(host, int(port), timeout=15)
            try:
                connection.request("GET", "/keys/bench-key", headers={"Authorization": f"Bearer {token}"})
                response = connection.getresponse()
                response.read()
                (latencies if response.status == 200 else failures).append(time.monotonic() - started)
            except OSError:
                failures.append(time.monotonic() - started)
            finally:
                connection.close()

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000 if latencies else float("inf")
    return {"rps": len(latencies) / seconds, "p99_ms": p99, "failures": len(failures)}


def login_per_call(kms: str, clientname: str, seconds: float, threads: int = 8, rotate: bool = False) -> dict:
    """The original's Go SDK: log in, then look up, every call (it never keeps a token)."""
    host, port = kms.rsplit("/", 1)[1].split(":")
    body = json.dumps({"clientname": clientname, "password": CLIENT_PASSWORD})
    outcomes, until = [], time.monotonic() + seconds

    def run(number: int):
        connection = http.client.HTTPConnection(host, int(port), timeout=15)
        calls = 0
        while time.monotonic() < until:
            calls += 1
            try:
                connection.request("POST", "/auth/login", body=body, headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                answer = response.read()
                if response.status != 200:
                    outcomes.append(f"login {response.status}")
                    connection.close()
                    connection = http.client.HTTPConnection(host, int(port), timeout=15)
                    continue
                token = json.loads(answer)["token"]
                if rotate and number == 0 and calls % 50 == 0:
                    connection.request("POST", "/keys/sdk-key/actions/rotate", headers={"Authorization": f"Bearer {token}"})
                    connection.getresponse().read()
                connection.request("GET", "/keys/sdk-key", headers={"Authorization": f"Bearer {token}"})
                response = connection.getresponse()
                response.read()
                outcomes.append("ok" if response.status == 200 else f"get {response.status}")
            except OSError as error:
                outcomes.append(type(error).__name__)
                connection.close()
                connection = http.client.HTTPConnection(host, int(port), timeout=15)
        connection.close()

    workers = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    ok = outcomes.count("ok")
    failed = {kind: outcomes.count(kind) for kind in set(outcomes) if kind != "ok"}
    return {"ok": ok, "calls": len(outcomes), "success": ok / max(1, len(outcomes)), "failed": failed}


def timed_logins(kms: str, clientname: str, seconds: float) -> list[float]:
    latencies, until = [], time.monotonic() + seconds
    while time.monotonic() < until:
        started = time.monotonic()
        try:
            call(kms, "POST", "/auth/login", {"clientname": clientname, "password": CLIENT_PASSWORD})
            latencies.append(time.monotonic() - started)
        except OSError:
            latencies.append(float("inf"))
        time.sleep(0.2)
    return latencies


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(len(ordered) * 0.99) - 1)] * 1000 if ordered else float("nan")


FLOOD_REQUESTS = {
    "signup": (request_bytes("POST", "/auth/signup", json.dumps({"token": "kms_st_" + "x" * 43,
                                                                "password": CLIENT_PASSWORD}).encode()), 300),
    "bad-jwt": (request_bytes("GET", "/keys/bench-key", headers={"Authorization": f"Bearer {FORGED_JWT}"}), 300),
    "readyz": (request_bytes("GET", "/readyz"), 300),
    "healthz": (request_bytes("GET", "/healthz"), 300),
    "metrics": (request_bytes("GET", "/metrics"), 100),
    "password": (request_bytes("POST", "/auth/login", json.dumps({"clientname": "bench-victim",
                                                                 "password": "Wrong-passw0rd!"}).encode()), 300),
}


def summary(name: str, alone: list, during: list, floods: list, extra: str = "") -> str:
    kept = statistics.median(d["rps"] / a["rps"] for a, d in zip(alone, during))
    ratio = statistics.median(d["p99_ms"] / a["p99_ms"] for a, d in zip(alone, during))
    rate = statistics.median(f["rate"] for f in floods) if floods and "rate" in floods[0] else 0
    cpu = statistics.median(f["cpu_s"] / f["seconds"] for f in floods) if floods and "cpu_s" in floods[0] else 0
    statuses = floods[-1].get("statuses", {}) if floods else {}
    return (f"{name:<9} look-ups kept {kept * 100:5.1f} %  p99 {ratio:5.2f}x  "
            f"(alone {statistics.median(a['rps'] for a in alone):7.1f} req/s p99 "
            f"{statistics.median(a['p99_ms'] for a in alone):6.1f} ms)  flood {rate:7.1f} answers/s "
            f"{dict(sorted(statuses.items(), key=str))}  generator {cpu * 100:.0f} % of a core{extra}")


def run_flood(name: str, kms: str, token: str) -> str:
    alone, during, floods, extras = [], [], [], []
    for _ in range(ROUNDS):
        if name == "idle":
            alone.append(fresh_connection_lookups(kms, token, SECONDS))
            sockets = idle_sockets(kms, 2100, sources=5)
            time.sleep(1)
            during.append(fresh_connection_lookups(kms, token, SECONDS))
            for sock in sockets:
                sock.close()
            extras.append(f" failures alone/during {alone[-1]['failures']}/{during[-1]['failures']}")
            time.sleep(2)
            continue
        alone.append(lookups(kms, token))
        request, connections = FLOOD_REQUESTS[name]
        join = in_background(flood, kms, request, connections=connections, sources=50, seconds=SECONDS + 2)
        time.sleep(1)
        if name == "password":
            sdk = in_background(login_per_call, kms, "bench-sdk", SECONDS)
        during.append(lookups(kms, token))
        if name == "password":
            result = sdk()
            extras.append(f"; login-per-call client {result['success'] * 100:.1f} % of {result['calls']} calls ok "
                          f"{result['failed']}")
        floods.append(join())
        time.sleep(2)  # the flood's held connections go
    return summary(name, alone, during, floods, extras[-1] if extras else "")


def run_sdk(kms: str) -> str:
    """No flood: the Go SDK's pattern, 8 threads, with a rotation now and then; a second client's
    logins meanwhile."""
    others = in_background(timed_logins, kms, "bench-other", SECONDS)
    result = login_per_call(kms, "bench-sdk", SECONDS, rotate=True)
    latencies = others()
    return (f"sdk       login-per-call 8 threads: {result['ok']} of {result['calls']} calls ok, failed {result['failed']}; "
            f"another client's logins meanwhile p99 {p99(latencies):.0f} ms ({len(latencies)} logins)")


def main():
    require_wrk()
    print(f"# {SECONDS}s per run, {ROUNDS} alternating rounds, 2 workers of {THREADS} server threads, "
          f"{os.cpu_count()} cores; LOG_LEVEL=info", flush=True)
    with bench_database() as url:
        port = free_port()
        env = kms_env(url, port, THREADS, SERVER_WORKERS=2)
        with server_process([sys.executable, "app.py"], env, port) as kms:
            token = new_client(kms, "bench-holder")
            call(kms, "POST", "/keys/actions/generate", {"keyReference": "bench-key"}, token)
            call(kms, "POST", "/keys/bench-key/actions/rotate", None, token)
            for name in ("bench-sdk", "bench-other", "bench-victim"):
                client_token = new_client(kms, name)
                if name == "bench-sdk":
                    call(kms, "POST", "/keys/actions/generate", {"keyReference": "sdk-key"}, client_token)
            for name in FLOODS:
                line = run_sdk(kms) if name == "sdk" else run_flood(name, kms, token)
                print(line, flush=True)
    print(f"# admin {ADMIN[0]}; floods from 127.0.0.2 and up, look-ups from 127.0.0.1", flush=True)


if __name__ == "__main__":
    main()
