"""What checking row MACs costs the key look-up: this checkout against a baseline revision
without them (default: the commit before row MACs arrived), side by side, alternating rounds.

Each side runs from its own checkout (the baseline in a temporary git worktree) against a database
of its own, with the same settings, and serves the same look-up (two versions, two unwraps,
audited) at 16 and 64 connections.

    python bench/bench_integrity.py     (needs wrk and git; BENCH_BASELINE=<rev>, BENCH_SECONDS,
                                         BENCH_ROUNDS, BENCH_THREADS, BENCH_DATABASE_URL)
"""
import os
import subprocess
import sys
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_keys import ROUNDS, SECONDS, THREADS, alternate, lookups, rounds  # noqa: E402
from bench.common import ROOT, bench_database, free_port, kms_env, kms_with_key, require_wrk, row  # noqa: E402

BASELINE = os.environ.get("BENCH_BASELINE", ":/Login admission: a burst after a quiet spell queues")


@contextmanager
def worktree(revision: str):
    path = Path(tempfile.mkdtemp(prefix="kms-baseline-"))
    commit = subprocess.run(["git", "rev-parse", "--short", revision], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout.strip()
    subprocess.run(["git", "worktree", "add", "--detach", str(path), commit], cwd=ROOT, check=True,
                   capture_output=True)
    try:
        yield path, commit
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, capture_output=True)


@contextmanager
def kms_at(checkout: Path, database_url: str):
    port = free_port()
    with kms_with_key(kms_env(database_url, port, THREADS), port, cwd=checkout) as server:
        yield server


def main():
    require_wrk()
    with ExitStack() as stack:
        baseline_dir, commit = stack.enter_context(worktree(BASELINE))
        print(f"# {SECONDS}s per run, {THREADS} server threads, {ROUNDS} alternating rounds; "
              f"baseline {commit} (no row MACs) against this checkout", flush=True)
        checked = stack.enter_context(kms_at(ROOT, stack.enter_context(bench_database())))
        unchecked = stack.enter_context(kms_at(baseline_dir, stack.enter_context(bench_database())))
        for connections in (16, 64):
            with_checks, without, ratio, ratios = alternate(
                lambda c: lookups(checked, c), lambda c: lookups(unchecked, c), connections)
            print(row(f"lookup with row MACs    c={connections}", with_checks), flush=True)
            print(row(f"lookup without (baseline) c={connections}", without) +
                  f"   with / without = {ratio:.2f}x ({rounds(ratios)})", flush=True)


if __name__ == "__main__":
    main()
