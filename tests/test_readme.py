"""README runs top to bottom: its walkthrough, its Python and its shell sections are executed in
order, as printed, against `kms dev` (ids and tokens taken from earlier answers), by bash with
`set -e`: a line that fails, or an HTTP answer of 400 or more, fails the test."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.serving.test_dev_mode import DevServer, wait_for_no_leftovers

SECTIONS = ("## A walkthrough with curl (and jq)", "## From Python", "## From a shell: `kms-client`")
PASSWORD_PLACEHOLDER = "<the admin password kms dev printed>"


def readme_blocks() -> list[tuple[str, str]]:
    """(language, code) of every block of the sections, in order."""
    text = (ROOT / "README.md").read_text()
    blocks = []
    for title in SECTIONS:
        assert title in text, title
        section = text.split(title, 1)[1].split("\n## ", 1)[0]
        blocks += re.findall(r"```(bash|python)\n(.*?)```", section, re.DOTALL)
    return blocks


def script(blocks, port: int, admin_password: str) -> str:
    """One bash script of the blocks: a python block is what the previous line's `python3` reads;
    curl fails on an HTTP error, as a reader would notice one."""
    lines = ["set -euo pipefail", "trap 'echo \"README line failed: $BASH_COMMAND\" >&2' ERR",
             'curl() { command curl --fail-with-body --show-error "$@"; echo; }']
    for language, code in blocks:
        if language == "python":
            assert lines[-1].split("#")[0].strip() == "python3", "a python block follows a line starting python3"
            lines[-1] = "python3 - <<'PYTHON'\n" + code + "PYTHON"
        else:
            lines += code.rstrip("\n").split("\n")
    text = "\n".join(lines) + "\n"
    assert text.count(PASSWORD_PLACEHOLDER) == 1 and text.count("127.0.0.1:8080") >= 3
    return text.replace(PASSWORD_PLACEHOLDER, admin_password).replace("127.0.0.1:8080", f"127.0.0.1:{port}")


def test_readme_runs_top_to_bottom_against_dev_mode(tmp_path):
    for program, package in (("curl", "curl"), ("jq", "jq")):
        if not shutil.which(program):
            if os.environ.get("CI") == "true":
                pytest.fail(f"{program} is missing: .ci/run installs the package {package}")
            pytest.skip(f"{program} is missing: install the package {package}")
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))  # README's `. .venv/bin/activate`, in the reader's checkout
    dev = DevServer(tmp_path)
    try:
        text = script(readme_blocks(), dev.port, dev.admin_password)
        env = {name: value for name, value in os.environ.items() if not name.startswith("KMS_")}
        result = subprocess.run(["bash", "-c", text], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=600)
    finally:
        dev.stop()
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    out = result.stdout
    assert "X-Key-Deprecated: true" in out
    assert '"state":"deprecated"' in out.replace(" ", "") and "b'card 4111'" in out
    assert "secret" in out  # kms-client decrypt printed the plaintext back
    assert out.replace(" ", "").count('"plaintext":"Y2FyZCA0MTEx"') == 2  # decrypted by its owner, then through a grant
    assert "Traceback" not in result.stderr
    assert wait_for_no_leftovers(tmp_path, dev.database_dir) == []
