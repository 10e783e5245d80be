"""The parts of bench/ that can go stale without any benchmark being run."""
import os
import shutil
import subprocess

import pytest

from tests.conftest import ROOT


def test_the_row_check_ablation_applies_to_this_code():
    """bench/bench_integrity.py measures the row checks against this code with them taken out
    (bench/no_row_checks.patch); a change to the look-up must refresh the patch, or the benchmark
    would compare against something else."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        if os.environ.get("CI") == "true":
            pytest.fail("CI runs from a git clone with git installed")
        pytest.skip("needs a git checkout and git (apt-get install git)")
    checked = subprocess.run(["git", "apply", "--check", "bench/no_row_checks.patch"], cwd=ROOT,
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    patch = (ROOT / "bench" / "no_row_checks.patch").read_text()
    removed = [line[1:].strip() for line in patch.splitlines() if line.startswith("-") and not line.startswith("---")]
    assert any(line.startswith("_check_look_up(") for line in removed)  # the session, client and key rows
    assert any("nxt" in line for line in removed)  # the newer-version probe
