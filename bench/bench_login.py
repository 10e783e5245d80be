"""Logins under load, and what a login flood does to key look-ups.

Reports login throughput (Argon2id, bounded to one hash per core), key-lookup p99 alone, and
key-lookup p99 while a login flood runs against the same server.

    python bench/bench_login.py         (needs wrk; BENCH_SECONDS, BENCH_THREADS, BENCH_DATABASE_URL,
                                         BENCH_WORKERS: worker processes, default 1)
"""
import json
import os
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (CLIENT_PASSWORD, bench_database, call, free_port, kms_env, new_client,  # noqa: E402
                          require_wrk, row, server_process, wrk)

SECONDS = int(os.environ.get("BENCH_SECONDS", "8"))
THREADS = int(os.environ.get("BENCH_THREADS", "16"))
WORKERS = int(os.environ.get("BENCH_WORKERS", "1"))


def main():
    require_wrk()
    print(f"# {SECONDS}s per run, {WORKERS} worker process(es) of {THREADS} server threads, {os.cpu_count()} cores",
          flush=True)
    with bench_database() as url:
        port = free_port()
        # A flood of valid logins: nothing is throttled, every request pays for one Argon2id hash.
        env = kms_env(url, port, THREADS, LOGIN_MAX_FAILURES_PER_ADDRESS=1_000_000, SERVER_WORKERS=WORKERS)
        with server_process([sys.executable, "app.py"], env, port) as kms:
            token = new_client(kms, "bench-svc")
            call(kms, "POST", "/keys/actions/generate", {"keyReference": "bench-key"}, token)
            login_body = json.dumps({"clientname": "bench-svc", "password": CLIENT_PASSWORD})

            for connections in (1, 16):
                result = wrk(kms, "POST", "/auth/login", connections=connections, seconds=SECONDS,
                             body_kind="login", token=login_body)
                print(row(f"login c={connections}", result), flush=True)

            alone = wrk(kms, "GET", "/keys/bench-key", connections=16, seconds=SECONDS, token=token)
            print(row("lookup c=16, alone", alone), flush=True)

            flood = {}
            flooder = threading.Thread(target=lambda: flood.update(wrk(
                kms, "POST", "/auth/login", connections=32, seconds=SECONDS + 2, body_kind="login",
                token=login_body)))
            flooder.start()
            under_flood = wrk(kms, "GET", "/keys/bench-key", connections=16, seconds=SECONDS, token=token)
            flooder.join()
            print(row("lookup c=16, during a login flood (c=32)", under_flood), flush=True)
            print(row("  the login flood itself", flood), flush=True)
            print(f"lookup p99 {alone['p99_ms']:.1f} ms alone, {under_flood['p99_ms']:.1f} ms during the flood; "
                  f"throughput {under_flood['rps'] / alone['rps'] * 100:.0f}% of alone", flush=True)


if __name__ == "__main__":
    main()
