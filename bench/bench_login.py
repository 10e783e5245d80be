"""Logins under load, and what a login flood does to key look-ups.

Reports login throughput (Argon2id, bounded host-wide to one hash per core but one), then, for 1
worker process and for BENCH_WORKERS, key-lookup p99 alone and while a login flood runs against
the same server. A single 8-second p99 on a shared VM swings by 2-3x from run to run, so the
look-ups alone and under the flood alternate for BENCH_ROUNDS rounds, and what is reported is the
median run of each and the median of the rounds' p99 ratios.

    python bench/bench_login.py         (needs wrk; BENCH_SECONDS, BENCH_ROUNDS, BENCH_THREADS,
                                         BENCH_DATABASE_URL, BENCH_WORKERS (default: the cores))
"""
import json
import os
import statistics
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (CLIENT_PASSWORD, bench_database, call, free_port, kms_env, new_client,  # noqa: E402
                          require_wrk, row, server_process, wrk)

SECONDS = int(os.environ.get("BENCH_SECONDS", "8"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
THREADS = int(os.environ.get("BENCH_THREADS", "16"))
WORKERS = int(os.environ.get("BENCH_WORKERS", str(os.cpu_count() or 2)))
FLOOD_CONNECTIONS = 32


def median_run(runs: list[dict], key: str) -> dict:
    return sorted(runs, key=lambda run: run[key])[len(runs) // 2]


def lookups_under_flood(kms: str, token: str, login_body: str) -> tuple[dict, dict]:
    """Look-ups at 16 connections while FLOOD_CONNECTIONS connections log in as fast as they are
    answered (wrk ignores Retry-After, as a flood does)."""
    flood = {}
    flooder = threading.Thread(target=lambda: flood.update(wrk(
        kms, "POST", "/auth/login", connections=FLOOD_CONNECTIONS, seconds=SECONDS + 2, body_kind="login",
        token=login_body)))
    flooder.start()
    under_flood = wrk(kms, "GET", "/keys/bench-key", connections=16, seconds=SECONDS, token=token)
    flooder.join()
    return under_flood, flood


def flood_comparison(database_env: dict, workers: int) -> None:
    port = free_port()
    env = {**database_env, "SERVER_PORT": str(port), "SERVER_WORKERS": str(workers)}
    with server_process([sys.executable, "app.py"], env, port) as kms:
        name = f"bench-svc-{workers}"
        token = new_client(kms, name)
        call(kms, "POST", "/keys/actions/generate", {"keyReference": "bench-key"}, token)
        login_body = json.dumps({"clientname": name, "password": CLIENT_PASSWORD})
        if workers == 1:
            for connections in (1, 16):
                result = wrk(kms, "POST", "/auth/login", connections=connections, seconds=SECONDS,
                             body_kind="login", token=login_body)
                print(row(f"login c={connections}", result), flush=True)
        alone, under, floods = [], [], []
        for _ in range(ROUNDS):
            alone.append(wrk(kms, "GET", "/keys/bench-key", connections=16, seconds=SECONDS, token=token))
            looked_up, flood = lookups_under_flood(kms, token, login_body)
            under.append(looked_up)
            floods.append(flood)
        ratios = [u["p99_ms"] / a["p99_ms"] for a, u in zip(alone, under)]
        share = [u["rps"] / a["rps"] for a, u in zip(alone, under)]
        label = f"{workers} worker{'s' if workers > 1 else ''}"
        print(row(f"{label}: lookup c=16, alone", median_run(alone, "p99_ms")), flush=True)
        print(row(f"{label}: lookup c=16, login flood (c={FLOOD_CONNECTIONS})", median_run(under, "p99_ms")),
              flush=True)
        print(row(f"{label}:   the login flood itself", median_run(floods, "rps")), flush=True)
        print(f"{label}: lookup p99 during the flood / alone = {statistics.median(ratios):.2f}x "
              f"(rounds {' '.join(f'{r:.2f}' for r in ratios)}); throughput {statistics.median(share) * 100:.0f}% "
              "of alone", flush=True)


def main():
    require_wrk()
    print(f"# {SECONDS}s per run, {ROUNDS} alternating rounds, worker processes of {THREADS} server threads, "
          f"{os.cpu_count()} cores", flush=True)
    with bench_database() as url:
        # One set of secrets for the database's servers. A flood of valid logins: nothing is
        # throttled for failing, every admitted login pays for a hash.
        env = kms_env(url, 0, THREADS, LOGIN_MAX_FAILURES_PER_ADDRESS=1_000_000)
        for workers in sorted({1, WORKERS}):
            flood_comparison(env, workers)


if __name__ == "__main__":
    main()
