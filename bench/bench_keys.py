"""Key endpoints under load: lookup, generate and rotate at 1, 16 and 64 connections, against a
bare Flask + waitress + psycopg2 endpoint doing one SELECT; 1 worker process against N
(SERVER_WORKERS); the cost of auditing lookups; and lookup latency with 1k versus 1M stored keys.

Every comparison runs its two servers side by side and alternates their runs for BENCH_ROUNDS
rounds: on a shared VM throughput drifts by 10-20 % over minutes, so a ratio is only meaningful
between runs made back to back. A ratio reported is the median of the rounds' ratios; a row is
the run with the median throughput.

    python bench/bench_keys.py          (needs wrk; BENCH_SECONDS, BENCH_ROUNDS, BENCH_THREADS,
                                         BENCH_WORKERS (default: the cores), BENCH_DATABASE_URL)
    python bench/bench_keys.py workers  (only the 1-against-N-workers comparison)
"""
import os
import statistics
import sys
import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg2  # noqa: E402

from bench.common import (ROOT, bench_database, call, free_port, kms_env, kms_with_key, require_wrk, row,  # noqa: E402
                          server_process, with_cpu, wrk)

SECONDS = int(os.environ.get("BENCH_SECONDS", "8"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
THREADS = int(os.environ.get("BENCH_THREADS", "16"))
WORKERS = int(os.environ.get("BENCH_WORKERS", str(os.cpu_count() or 2)))
CONNECTIONS = (1, 16, 64)
LOOKUP = "/keys/bench-key/1"  # decryptWith version 1, encryptWith version 2: two unwraps


def add_filler_keys(database_url: str, total: int):
    """Bring the number of stored keys up to `total`, for a client of their own."""
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    with conn.cursor() as cur:
        owner = uuid.uuid4()
        cur.execute("INSERT INTO clients (id, name_hash, name_enc, password_hash, role) "
                    "VALUES (%s, %s, '\\x00', 'filler', 'client')", (str(owner), owner.bytes))
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
        cur.execute("SELECT count(*) FROM keys")
        stored = cur.fetchone()[0]
    conn.close()
    return stored


@contextmanager
def kms_server(env: dict, **settings):
    """A KMS in its own process, with a client of its own whose key bench-key has versions 1 and 2.
    `env` is a database's: servers sharing a database share its secrets."""
    port = free_port()
    with kms_with_key({**env, "SERVER_PORT": str(port), **settings}, port) as server:
        yield server


def median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda run: run["rps"])[len(runs) // 2]


def alternate(first, second, connections: int):
    """ROUNDS rounds of (first, second) runs; the median runs and the median ratio first/second."""
    firsts, seconds = [], []
    for _ in range(ROUNDS):
        firsts.append(first(connections))
        seconds.append(second(connections))
    ratios = [a["rps"] / b["rps"] for a, b in zip(firsts, seconds)]
    return median_run(firsts), median_run(seconds), statistics.median(ratios), ratios


def alternate_many(runs: dict, connections: int) -> tuple[dict, list]:
    """ROUNDS rounds, each running every server once in turn: the median run of each and the
    rounds' runs (for ratios taken within a round)."""
    results = {name: [] for name in runs}
    for _ in range(ROUNDS):
        for name, run in runs.items():
            results[name].append(run(connections))
    return {name: median_run(found) for name, found in results.items()}, results


def ratio_of(results: dict, numerator: str, denominator: str, key: str = "rps") -> tuple[float, list]:
    ratios = [a[key] / b[key] for a, b in zip(results[numerator], results[denominator])]
    return statistics.median(ratios), ratios


def compare_workers(env: dict, url: str):
    """1 worker, WORKERS workers and the bare one-process endpoint, side by side, alternating."""
    print(f"## workers: KMS GET {LOOKUP} with 1 and {WORKERS} worker processes ({THREADS} threads each), and the "
          "bare one-process Flask endpoint", flush=True)
    bare_port = free_port()
    bare_env = {**os.environ, "DATABASE_URL": url, "SERVER_PORT": str(bare_port), "SERVER_THREADS": str(THREADS)}
    with kms_server(env, SERVER_WORKERS="1") as one, kms_server(env, SERVER_WORKERS=str(WORKERS)) as many, \
            server_process([sys.executable, str(ROOT / "bench" / "bare_app.py")], bare_env, bare_port) as bare:
        for connections in (16, 64):
            medians, results = alternate_many({
                "one": lambda c: with_cpu(one[0], url, lambda: lookups(one, c)),
                "many": lambda c: with_cpu(many[0], url, lambda: lookups(many, c)),
                "bare": lambda c: with_cpu(bare, url, lambda: wrk(bare, "GET", "/bare/bench-key", connections=c,
                                                                  seconds=SECONDS))},
                connections)
            scale, scale_rounds = ratio_of(results, "many", "one")
            over_bare, bare_rounds = ratio_of(results, "many", "bare")
            p99, p99_rounds = ratio_of(results, "many", "one", "p99_ms")
            print(row(f"lookup 1 worker   c={connections}", medians["one"]), flush=True)
            print(row(f"lookup {WORKERS} workers  c={connections}", medians["many"]), flush=True)
            print(row(f"bare, 1 process   c={connections}", medians["bare"]), flush=True)
            print(f"c={connections}: {WORKERS} workers / 1 worker = {scale:.2f}x throughput ({rounds(scale_rounds)}), "
                  f"p99 {p99:.2f}x ({rounds(p99_rounds)}); {WORKERS} workers / bare = {over_bare:.2f}x "
                  f"({rounds(bare_rounds)})", flush=True)
            # Where the time goes: what each request cost the server and PostgreSQL, and how much of
            # the machine was busy (a GIL-bound process leaves cores idle; a full machine does not).
            for name, label in (("one", "1 worker"), ("many", f"{WORKERS} workers"), ("bare", "bare")):
                runs = results[name]
                print(f"c={connections}: CPU per request, {label}: server {_median(runs, 'server_ms') * 1000:.0f} us + "
                      f"PostgreSQL {_median(runs, 'postgres_ms') * 1000:.0f} us; cores busy "
                      f"{_median(runs, 'busy_cores'):.2f} of {os.cpu_count()}", flush=True)


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def rounds(ratios) -> str:
    return "rounds " + " ".join(f"{ratio:.2f}" for ratio in ratios)


def lookups(server, connections: int) -> dict:
    url, token = server
    return wrk(url, "GET", LOOKUP, connections=connections, seconds=SECONDS, token=token)


def main():
    require_wrk()
    print(f"# {SECONDS}s per run, {THREADS} server threads, pool {THREADS} (min = max), wrk on 127.0.0.1, "
          f"{ROUNDS} alternating rounds per comparison", flush=True)
    with bench_database() as url:
        env = kms_env(url, 0, THREADS)
        compare_workers(env, url)
        if sys.argv[1:] == ["workers"]:
            return
        bare_port = free_port()
        bare_env = {**os.environ, "DATABASE_URL": url, "SERVER_PORT": str(bare_port), "SERVER_THREADS": str(THREADS)}
        with kms_server(env) as kms, \
                server_process([sys.executable, str(ROOT / "bench" / "bare_app.py")], bare_env, bare_port) as bare:
            print(f"## KMS GET {LOOKUP} (token check, two versions, two unwraps, audited) against the bare "
                  "Flask + waitress + psycopg2 endpoint doing one SELECT", flush=True)
            for connections in CONNECTIONS:
                lookup, bare_run, ratio, ratios = alternate(
                    lambda c: lookups(kms, c),
                    lambda c: wrk(bare, "GET", "/bare/bench-key", connections=c, seconds=SECONDS), connections)
                print(row(f"lookup    c={connections}", lookup), flush=True)
                print(row(f"bare      c={connections}", bare_run) + f"   KMS lookup / bare = {ratio:.2f}x "
                      f"({rounds(ratios)})", flush=True)

            kms_url, token = kms
            call(kms_url, "POST", "/keys/actions/generate", {"keyReference": "rotated-key"}, token)
            for connections in CONNECTIONS:
                result = wrk(kms_url, "POST", "/keys/actions/generate", connections=connections, seconds=SECONDS,
                             body_kind="generate", token=token, prefix=f"g{connections}")
                print(row(f"generate  c={connections}", result), flush=True)
            for connections in CONNECTIONS:
                result = wrk(kms_url, "POST", "/keys/rotated-key/actions/rotate", connections=connections,
                             seconds=SECONDS, token=token)
                print(row(f"rotate one key c={connections}", result), flush=True)

        print("## audit cost on lookups (c=16; audited and unaudited servers side by side, one database)",
              flush=True)
        with kms_server(env) as audited, kms_server(env, AUDIT_KEY_LOOKUPS="false") as unaudited:
            with_audit, without_audit, ratio, ratios = alternate(
                lambda c: lookups(audited, c), lambda c: lookups(unaudited, c), 16)
            print(row("lookup audited", with_audit), flush=True)
            print(row("lookup unaudited", without_audit), flush=True)
            print(f"auditing lookups costs {(1 - ratio) * 100:.1f}% of throughput ({rounds(ratios)})", flush=True)

    print("## lookup with 1,000 and 1,000,000 stored keys (c=16; two databases side by side)", flush=True)
    with ExitStack() as stack:
        small_url, large_url = stack.enter_context(bench_database()), stack.enter_context(bench_database())
        small = stack.enter_context(kms_server(kms_env(small_url, 0, THREADS)))
        large = stack.enter_context(kms_server(kms_env(large_url, 0, THREADS)))
        stored = {small_url: add_filler_keys(small_url, 1_000), large_url: add_filler_keys(large_url, 1_000_000)}
        with_small, with_large, ratio, ratios = alternate(lambda c: lookups(small, c), lambda c: lookups(large, c), 16)
        print(row(f"lookup with {stored[small_url]:,} keys stored", with_small), flush=True)
        print(row(f"lookup with {stored[large_url]:,} keys stored", with_large) +
              f"   1k / 1M = {ratio:.2f}x ({rounds(ratios)})", flush=True)


if __name__ == "__main__":
    main()
