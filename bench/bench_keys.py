"""Key endpoints under load: lookup, generate and rotate at 1, 16 and 64 connections, against a
bare Flask + waitress + psycopg2 endpoint doing one SELECT; the cost of auditing lookups; and
lookup latency with 1k versus 1M stored keys.

    python bench/bench_keys.py          (needs wrk; BENCH_SECONDS, BENCH_THREADS, BENCH_DATABASE_URL)
"""
import os
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg2  # noqa: E402

from bench.common import (ROOT, bench_database, call, free_port, kms_env, new_client, require_wrk, row,  # noqa: E402
                          server_process, wrk)

SECONDS = int(os.environ.get("BENCH_SECONDS", "8"))
THREADS = int(os.environ.get("BENCH_THREADS", "16"))
CONNECTIONS = (1, 16, 64)


def add_filler_keys(database_url: str, total: int):
    """Bring the number of stored keys up to `total`, for a client of their own."""
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT id FROM clients WHERE password_hash = 'filler'")
        found = cur.fetchone()
        owner = found[0] if found else uuid.uuid4()
        if not found:
            cur.execute("INSERT INTO clients (id, name_hash, name_enc, password_hash, role) "
                        "VALUES (%s, '\\x01', '\\x00', 'filler', 'client')", (str(owner),))
        cur.execute("SELECT count(*) FROM keys")
        have = cur.fetchone()[0]
        cur.execute("""
            WITH k AS (
                INSERT INTO keys (client_id, ref_hash, ref_enc)
                SELECT %s, sha256(('filler-' || i)::bytea), '\\x00'
                FROM generate_series(%s, %s) i
                RETURNING id)
            INSERT INTO key_versions (key_id, version, state, kek_version, wrapped_dek)
            SELECT id, 1, 'in-use', 1, sha256(id::text::bytea) || sha256(id::text::bytea) FROM k""",
                    (str(owner), have + 1, total))
        cur.execute("VACUUM ANALYZE keys")
        cur.execute("VACUUM ANALYZE key_versions")
    conn.close()


def main():
    require_wrk()
    print(f"# {SECONDS}s per run, {THREADS} server threads, pool {THREADS} (min = max), wrk on 127.0.0.1", flush=True)
    with bench_database() as url:
        port = free_port()
        env = kms_env(url, port, THREADS)
        with server_process([sys.executable, "app.py"], env, port) as kms:
            token = new_client(kms, "bench-svc")
            call(kms, "POST", "/keys/actions/generate", {"keyReference": "bench-key"}, token)
            call(kms, "POST", "/keys/bench-key/actions/rotate", None, token)
            call(kms, "POST", "/keys/actions/generate", {"keyReference": "rotated-key"}, token)
            results = {}
            print("## KMS (GET /keys/bench-key/1: token check, two versions, two unwraps, audited)", flush=True)
            for connections in CONNECTIONS:
                results[("lookup", connections)] = wrk(kms, "GET", "/keys/bench-key/1", connections=connections,
                                                       seconds=SECONDS, token=token)
                print(row(f"lookup    c={connections}", results[("lookup", connections)]), flush=True)
            for connections in CONNECTIONS:
                result = wrk(kms, "POST", "/keys/actions/generate", connections=connections, seconds=SECONDS,
                             body_kind="generate", token=token, prefix=f"g{connections}")
                print(row(f"generate  c={connections}", result), flush=True)
            for connections in CONNECTIONS:
                result = wrk(kms, "POST", "/keys/rotated-key/actions/rotate", connections=connections,
                             seconds=SECONDS, token=token)
                print(row(f"rotate one key c={connections}", result), flush=True)

        bare_port = free_port()
        bare_env = {**env, "SERVER_PORT": str(bare_port)}
        with server_process([sys.executable, str(ROOT / "bench" / "bare_app.py")], bare_env, bare_port) as bare:
            print("## bare Flask + waitress + psycopg2, one SELECT", flush=True)
            for connections in CONNECTIONS:
                result = wrk(bare, "GET", "/bare/bench-key", connections=connections, seconds=SECONDS)
                ratio = results[("lookup", connections)]["rps"] / result["rps"]
                print(row(f"bare      c={connections}", result) + f"   KMS lookup / bare = {ratio:.2f}x", flush=True)

        print("## audit cost on lookups (c=16; same database, fresh server each, alternating, 2 runs each)",
              flush=True)
        runs = {False: [], True: []}
        for audited in (False, True, False, True):
            with server_process([sys.executable, "app.py"], {**env, "AUDIT_KEY_LOOKUPS": str(audited).lower()},
                                port) as kms:
                result = wrk(kms, "GET", "/keys/bench-key/1", connections=16, seconds=SECONDS, token=token)
                runs[audited].append(result["rps"])
                print(row(f"lookup audited={audited}", result), flush=True)
        cost = 1 - sum(runs[True]) / sum(runs[False])
        print(f"auditing lookups costs {cost * 100:.1f}% of throughput (mean of the runs)", flush=True)

        print("## lookup with many stored keys (c=16)", flush=True)
        for total in (1_000, 1_000_000):
            add_filler_keys(url, total)
            with server_process([sys.executable, "app.py"], env, port) as kms:
                result = wrk(kms, "GET", "/keys/bench-key/1", connections=16, seconds=SECONDS, token=token)
                print(row(f"lookup with {total:,} keys stored", result), flush=True)


if __name__ == "__main__":
    main()
