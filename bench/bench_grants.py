"""A key used through a grant, beside its owner using it, in the same run: the look-up
`GET /keys/{ref}/1` and a single 1 KiB decrypt, by the owner and by a grantee naming the key
`{owner}:{ref}`, on one KMS with BENCH_WORKERS worker processes (default 2), with 1,000 grants on
the key and 100,000 in the database.

The grantee's grant is made through the API. The other grants, their grantees and the keys they are
on are filler written with SQL (their rows carry no valid MAC, and no request reads them): they
make the grants table and its indexes the size a busy deployment's are.

Each round runs the four kinds in turn, for BENCH_SECONDS at BENCH_CONNECTIONS (default 16); a
ratio is the median of the rounds' ratios, a row the run with the median throughput. The cost
through the grant is given twice: by throughput (owner / grantee) and by the CPU each request took,
server and PostgreSQL (grantee / owner), which other work on the machine blurs less.

    python bench/bench_grants.py      (needs wrk; BENCH_SECONDS, BENCH_ROUNDS, BENCH_THREADS,
                                       BENCH_WORKERS, BENCH_CONNECTIONS, BENCH_DATABASE_URL)
"""
import base64
import json
import os
import statistics
import sys
import tempfile
import uuid
from pathlib import Path

import psycopg2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (bench_database, call, free_port, kms_env, new_client, require_wrk, row,  # noqa: E402
                          server_process, with_cpu, wrk)
from kms_client import ciphertext  # noqa: E402

SECONDS = int(os.environ.get("BENCH_SECONDS", "8"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
THREADS = int(os.environ.get("BENCH_THREADS", "16"))
WORKERS = int(os.environ.get("BENCH_WORKERS", "2"))
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "16"))
GRANTS_ON_KEY = 1_000
GRANTS_IN_ALL = 100_000
CONTEXT = {"tenant": "bench"}


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def filler(database_url: str):
    """GRANTS_IN_ALL - 1 grants by SQL: GRANTS_ON_KEY - 1 more on the benchmark's key, the rest on
    100 other keys of the owner, each to a client of its own."""
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT k.id, k.client_id FROM keys k WHERE k.current_version = 2 LIMIT 1")
        key_id, owner_id = cur.fetchone()
        cur.execute("""INSERT INTO clients (id, name_hash, name_enc, password_hash, role, row_mac)
                       SELECT gen_random_uuid(), sha256(('filler' || n)::bytea), '\\x00'::bytea, 'x', 'client',
                              '\\x00'::bytea
                       FROM generate_series(1, %s) n""", (GRANTS_IN_ALL,))
        cur.execute("""INSERT INTO keys (client_id, ref_hash, ref_enc)
                       SELECT %s, sha256(('filler-key' || n)::bytea), '\\x00'::bytea FROM generate_series(1, 100) n""",
                    (owner_id,))
        cur.execute("""WITH grantees AS (SELECT id, row_number() OVER (ORDER BY id) AS n FROM clients
                                         WHERE password_hash = 'x'),
                            other_keys AS (SELECT id, row_number() OVER (ORDER BY id) - 1 AS n FROM keys
                                           WHERE id <> %(key_id)s AND client_id = %(owner)s)
                       INSERT INTO grants (id, key_id, grantee_id, operations, row_mac)
                       SELECT gen_random_uuid(),
                              CASE WHEN g.n < %(on_key)s THEN %(key_id)s
                                   ELSE (SELECT id FROM other_keys WHERE other_keys.n = g.n %% 100) END,
                              g.id, ARRAY['decrypt'], '\\x00'::bytea
                       FROM grantees g WHERE g.n < %(all)s""",
                    {"key_id": key_id, "owner": owner_id, "on_key": GRANTS_ON_KEY, "all": GRANTS_IN_ALL})
        cur.execute("SELECT count(*) FILTER (WHERE key_id = %s), count(*) FROM grants", (key_id,))
        on_key, in_all = cur.fetchone()
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    with conn.cursor() as cur:
        for table in ("grants", "clients", "keys"):
            cur.execute(f"VACUUM ANALYZE {table}")
    conn.close()
    return on_key, in_all


def main():
    require_wrk()
    print(f"# {SECONDS}s per run, {WORKERS} worker processes x {THREADS} threads, c={CONNECTIONS}, wrk on 127.0.0.1, "
          f"{ROUNDS} alternating rounds", flush=True)
    with bench_database() as database_url:
        port = free_port()
        env = kms_env(database_url, port, THREADS, SERVER_WORKERS=WORKERS)
        with server_process([sys.executable, "app.py"], env, port) as url, tempfile.TemporaryDirectory() as folder:
            owner_name, grantee_name = f"bench-{uuid.uuid4().hex[:8]}", f"bench-{uuid.uuid4().hex[:8]}"
            owner, grantee = new_client(url, owner_name), new_client(url, grantee_name)
            call(url, "POST", "/keys/actions/generate", {"keyReference": "bench-key"}, owner)
            call(url, "POST", "/keys/bench-key/actions/rotate", None, owner)
            call(url, "POST", "/keys/bench-key/grants", {"grantee": grantee_name, "operations": ["fetch", "decrypt"]},
                 owner)
            on_key, in_all = filler(database_url)
            print(f"# grants on the key: {on_key:,}; in the database: {in_all:,}", flush=True)
            dek = base64.urlsafe_b64decode(call(url, "GET", "/keys/bench-key/1", None, owner)["decryptWith"]["dek"] + "=")
            body = {"ciphertext": b64(ciphertext.seal(dek, 1, os.urandom(1024), CONTEXT)), "context": CONTEXT}
            body_file = Path(folder) / "decrypt.json"
            body_file.write_text(json.dumps(body))
            shared = f"{owner_name}:bench-key"
            for path, token in ((f"/keys/{shared}/1", grantee), (f"/keys/{shared}/actions/decrypt", grantee)):
                answer = call(url, "GET" if path.endswith("/1") else "POST", path,
                              None if path.endswith("/1") else body, token)
                assert "error" not in answer, answer

            def lookup(ref, token):
                return lambda: with_cpu(url, database_url, lambda: wrk(url, "GET", f"/keys/{ref}/1",
                                                                       connections=CONNECTIONS, seconds=SECONDS,
                                                                       token=token))

            def decrypt(ref, token):
                return lambda: with_cpu(url, database_url, lambda: wrk(
                    url, "POST", f"/keys/{ref}/actions/decrypt", connections=CONNECTIONS, seconds=SECONDS,
                    body_kind="file", token=token, prefix=str(body_file)))

            runs = {"lookup, owner": lookup("bench-key", owner), "lookup, grantee": lookup(shared, grantee),
                    "decrypt, owner": decrypt("bench-key", owner), "decrypt, grantee": decrypt(shared, grantee)}
            results = {name: [] for name in runs}
            for _ in range(ROUNDS):
                for name, run in runs.items():
                    results[name].append(run())
            for name, found in results.items():
                median = sorted(found, key=lambda result: result["rps"])[len(found) // 2]
                server = statistics.median(result["server_ms"] for result in found)
                postgres = statistics.median(result["postgres_ms"] for result in found)
                print(f"{row(f'{name:<16} c={CONNECTIONS}', median)}   CPU/request: server {server * 1000:.0f} us + "
                      f"PostgreSQL {postgres * 1000:.0f} us", flush=True)
            for kind in ("lookup", "decrypt"):
                owner_runs, grantee_runs = results[f"{kind}, owner"], results[f"{kind}, grantee"]
                ratios = [o["rps"] / g["rps"] for o, g in zip(owner_runs, grantee_runs)]
                cpu = [(g["server_ms"] + g["postgres_ms"]) / (o["server_ms"] + o["postgres_ms"])
                       for o, g in zip(owner_runs, grantee_runs)]
                medians = (statistics.median(g["server_ms"] + g["postgres_ms"] for g in grantee_runs)
                           / statistics.median(o["server_ms"] + o["postgres_ms"] for o in owner_runs))
                print(f"{kind}: cost through the grant = {statistics.median(ratios):.3f}x the owner's by throughput "
                      f"(owner / grantee; rounds {' '.join(f'{r:.2f}' for r in ratios)}); by CPU per request, server "
                      f"and PostgreSQL, {medians:.3f}x (the medians' ratio), {statistics.median(cpu):.3f}x (the rounds' "
                      f"median: {' '.join(f'{r:.2f}' for r in cpu)})", flush=True)


if __name__ == "__main__":
    main()
