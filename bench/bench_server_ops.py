"""Server-side key operations under load, beside a key look-up in the same run: encrypt and
decrypt of 1 KiB, single and in batches of 100 items, against `GET /keys/{ref}/1` (the look-up
the other benchmarks measure), on one KMS with BENCH_WORKERS worker processes (default 2).

Each round runs every kind once, in turn, for BENCH_SECONDS at BENCH_CONNECTIONS (default 16);
a ratio reported is the median of the rounds' ratios, a row the run with the median throughput.
Batches are counted in items per second (requests per second times the batch's size).

    python bench/bench_server_ops.py      (needs wrk; BENCH_SECONDS, BENCH_ROUNDS, BENCH_THREADS,
                                           BENCH_WORKERS, BENCH_CONNECTIONS, BENCH_DATABASE_URL)
"""
import base64
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (bench_database, call, free_port, kms_env, kms_with_key, require_wrk, row,  # noqa: E402
                          with_cpu, wrk)
from kms_client import ciphertext  # noqa: E402

SECONDS = int(os.environ.get("BENCH_SECONDS", "8"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
THREADS = int(os.environ.get("BENCH_THREADS", "16"))
WORKERS = int(os.environ.get("BENCH_WORKERS", "2"))
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "16"))
BATCH = 100
PLAINTEXT_BYTES = 1024
CONTEXT = {"tenant": "bench", "table": "orders"}
LOOKUP = "/keys/bench-key/1"


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def bodies(url: str, token: str) -> dict:
    """The request bodies, each checked once to succeed in full (a batch answers 200 even when an
    item fails). The ciphertexts to decrypt are of version 1, as the look-up asks for version 1:
    made here with version 1's DEK, as the SDK encrypts locally (the same format)."""
    plaintext = os.urandom(PLAINTEXT_BYTES)
    single = {"plaintext": b64(plaintext), "context": CONTEXT}
    dek = base64.urlsafe_b64decode(call(url, "GET", LOOKUP, None, token)["decryptWith"]["dek"] + "=")
    ciphertexts = [b64(ciphertext.seal(dek, 1, plaintext, CONTEXT)) for _ in range(BATCH)]
    found = {
        "encrypt": ("/keys/bench-key/actions/encrypt", single),
        "decrypt": ("/keys/bench-key/actions/decrypt", {"ciphertext": ciphertexts[0], "context": CONTEXT}),
        "encrypt x100": ("/keys/bench-key/actions/encrypt", {"items": [single] * BATCH}),
        "decrypt x100": ("/keys/bench-key/actions/decrypt", {"items": [{"ciphertext": c, "context": CONTEXT}
                                                                       for c in ciphertexts]}),
    }
    for path, body in found.values():
        answer = call(url, "POST", path, body, token)
        assert all("error" not in result for result in answer.get("results", [answer])), answer
    return found


def main():
    require_wrk()
    print(f"# {SECONDS}s per run, {WORKERS} worker processes x {THREADS} threads, c={CONNECTIONS}, wrk on 127.0.0.1, "
          f"{ROUNDS} alternating rounds; plaintexts of {PLAINTEXT_BYTES} bytes, batches of {BATCH}", flush=True)
    with bench_database() as database_url:
        port = free_port()
        env = kms_env(database_url, port, THREADS, SERVER_WORKERS=WORKERS)
        with kms_with_key(env, port) as (url, token), tempfile.TemporaryDirectory() as folder:
            requests = bodies(url, token)  # bench-key has versions 1 and 2
            files = {}
            for name, (path, body) in requests.items():
                files[name] = Path(folder) / f"{name.replace(' ', '-')}.json"
                files[name].write_text(json.dumps(body))

            def lookup():
                return with_cpu(url, database_url, lambda: wrk(url, "GET", LOOKUP, connections=CONNECTIONS,
                                                               seconds=SECONDS, token=token))

            def operation(name):
                path = requests[name][0]
                return lambda: with_cpu(url, database_url, lambda: wrk(
                    url, "POST", path, connections=CONNECTIONS, seconds=SECONDS, body_kind="file", token=token,
                    prefix=str(files[name])))

            runs = {"lookup": lookup, **{name: operation(name) for name in requests}}
            only = os.environ.get("BENCH_ONLY")
            if only:
                runs = {name: run for name, run in runs.items() if name in only.split(",")}
            results = {name: [] for name in runs}
            for _ in range(ROUNDS):
                for name, run in runs.items():
                    results[name].append(run())
            for name, found in results.items():
                median = sorted(found, key=lambda result: result["rps"])[len(found) // 2]
                label = f"{name:<13} c={CONNECTIONS}"
                line = row(label, median)
                if name.endswith("x100"):
                    line += f"   = {median['rps'] * BATCH:,.0f} items/s"
                server = statistics.median(result["server_ms"] for result in found)
                postgres = statistics.median(result["postgres_ms"] for result in found)
                busy = statistics.median(result["busy_cores"] for result in found)
                print(f"{line}   CPU/request: server {server * 1000:.0f} us + PostgreSQL {postgres * 1000:.0f} us; "
                      f"cores busy {busy:.2f}", flush=True)
            for name in requests:
                ratios = [a["rps"] / b["rps"] for a, b in zip(results[name], results["lookup"])]
                items = [a["rps"] * (BATCH if name.endswith("x100") else 1) for a in results[name]]
                print(f"{name} / lookup = {statistics.median(ratios):.2f}x requests "
                      f"(rounds {' '.join(f'{r:.2f}' for r in ratios)}); items/s median "
                      f"{statistics.median(items):,.0f}", flush=True)


if __name__ == "__main__":
    main()
