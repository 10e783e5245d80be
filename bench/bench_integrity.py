"""What checking row MACs costs the key look-up: this checkout against the same code with the
checks taken out, side by side, alternating rounds.

The baseline is this checkout's commit with bench/no_row_checks.patch applied: the look-up reads no
MAC columns and no newer-version probe, and checks no session, client or key row; everything else
(the token check, the two unwraps, the audit record and its chain) is the same code. That isolates
what #10's checks cost from everything else that changed since they arrived. BENCH_BASELINE=<rev>
compares with a revision as it was instead (":/Login admission: a burst after a quiet spell
queues" is the commit before row MACs; that comparison also counts every later feature).

Each side runs from its own checkout (the baseline in a temporary git worktree) against a database
of its own, with the same settings, and serves the same look-up (two versions, two unwraps,
audited) at 16 and 64 connections. Besides throughput, each run reads the CPU time the server's
processes and its database's PostgreSQL backends spent (the scheduler's counts, /proc/PID/schedstat):
CPU per look-up is what the checks add, and a shared VM disturbs it far less than throughput.

    python bench/bench_integrity.py     (needs wrk and git; BENCH_BASELINE=<rev>, BENCH_SECONDS,
                                         BENCH_ROUNDS, BENCH_THREADS, BENCH_DATABASE_URL)
"""
import os
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_keys import ROUNDS, SECONDS, THREADS, alternate_many, lookups, ratio_of, rounds  # noqa: E402
from bench.common import (ROOT, bench_database, free_port, kms_env, kms_with_key, require_wrk,  # noqa: E402
                          row, with_cpu)

BASELINE = os.environ.get("BENCH_BASELINE")  # None: this commit without the checks
ABLATION = ROOT / "bench" / "no_row_checks.patch"


@contextmanager
def worktree(revision: str, patch: Path | None = None):
    """A temporary checkout of `revision`, with `patch` applied: (its path, a description)."""
    path = Path(tempfile.mkdtemp(prefix="kms-baseline-"))
    commit = subprocess.run(["git", "rev-parse", "--short", revision], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout.strip()
    subprocess.run(["git", "worktree", "add", "--detach", str(path), commit], cwd=ROOT, check=True,
                   capture_output=True)
    try:
        if patch is not None:
            applied = subprocess.run(["git", "apply", str(patch)], cwd=path, capture_output=True, text=True)
            if applied.returncode != 0:
                sys.exit(f"{patch.name} no longer applies to {commit}: take the checks out of the look-up again "
                         f"and save the diff as {patch.relative_to(ROOT)}\n{applied.stderr}")
        yield path, f"{commit} with {patch.name}" if patch else commit
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, capture_output=True)


@contextmanager
def kms_at(checkout: Path, database_url: str):
    port = free_port()
    with kms_with_key(kms_env(database_url, port, THREADS), port, cwd=checkout) as server:
        yield server, database_url


def measured_lookups(side, connections: int) -> dict:
    """A look-up run, with the CPU its server and database backends spent per look-up (ms)."""
    server, database_url = side
    return with_cpu(server[0], database_url, lambda: lookups(server, connections))


def cpu_row(label: str, runs: list[dict]) -> str:
    median = {key: statistics.median(run[key] for run in runs)
              for key in ("server_ms", "postgres_ms", "sealer_postgres_ms", "cpu_ms")}
    return (f"{label:<44} CPU per look-up {median['cpu_ms']:.3f} ms (server {median['server_ms']:.3f}, "
            f"PostgreSQL {median['postgres_ms']:.3f} of which sealing {median['sealer_postgres_ms']:.3f})")


def main():
    require_wrk()
    with ExitStack() as stack:
        baseline_dir, baseline = stack.enter_context(worktree(BASELINE or "HEAD", None if BASELINE else ABLATION))
        print(f"# {SECONDS}s per run, {THREADS} server threads, {ROUNDS} alternating rounds; "
              f"baseline {baseline} against this checkout", flush=True)
        checked = stack.enter_context(kms_at(ROOT, stack.enter_context(bench_database())))
        unchecked = stack.enter_context(kms_at(baseline_dir, stack.enter_context(bench_database())))
        for connections in (16, 64):
            medians, results = alternate_many({"with": lambda c: measured_lookups(checked, c),
                                               "without": lambda c: measured_lookups(unchecked, c)}, connections)
            ratio, ratios = ratio_of(results, "with", "without")
            cpu, cpu_ratios = ratio_of(results, "with", "without", "cpu_ms")
            print(row(f"lookup with row MACs    c={connections}", medians["with"]), flush=True)
            print(row(f"lookup without (baseline) c={connections}", medians["without"]) +
                  f"   with / without = {ratio:.2f}x ({rounds(ratios)})", flush=True)
            print(cpu_row(f"  with row MACs  c={connections}", results["with"]), flush=True)
            print(cpu_row(f"  without        c={connections}", results["without"]) +
                  f"   with / without = {cpu:.3f}x ({rounds(cpu_ratios)})", flush=True)


if __name__ == "__main__":
    main()
