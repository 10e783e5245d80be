"""Property-based fuzzing of every route from /openapi.json (schemathesis, every check it has):
whatever it sends, no 500, every answer matches the documented status codes, headers, content
type and schemas, valid input is accepted and invalid input refused (tests/schemathesis.toml says
which answers count as accepting valid input, and why).

Each route is fuzzed with the token of the role it is for: key routes and the public ones as a
client, client management, the audit trail and signup tokens as an admin; and the admin-only
routes once more with the client's token, where every answer must still be a documented one.

The default run is the same every time: a fixed seed and few examples (KMS_FUZZ_SEED and
KMS_FUZZ_EXAMPLES change them), and no coverage phase for signups (DEFAULT_RUN_ONLY). `pytest -m
deep` runs the deep variant instead: a fresh random seed each run, printed on failure so the run
can be replayed (KMS_FUZZ_SEED=...), more examples, every phase, and every route as an admin too."""
import os
import random
import subprocess
import sys
from pathlib import Path

import jwt
import pytest

from tests.conftest import bearer

ST = Path(sys.executable).parent / "st"
TESTS = Path(__file__).parent
CONFIG = TESTS / "schemathesis.toml"
HOOKS = TESTS / "schemathesis_hooks.py"
DEFAULT_SEED = "20251207"
EXAMPLES = {"default": "20", "deep": "100"}
# Appended to schemathesis.toml in the default run: the coverage phase's boundary values for a
# signup's password pattern take schemathesis some 12 s to make, the same every run; the deep run
# makes them (and the password policy has tests of its own, tests/auth).
DEFAULT_RUN_ONLY = """
[[operations]]
include-path = "/auth/signup"
phases.coverage.enabled = false
"""
ADMIN_ONLY = ["--include-path-regex", "^/(clients|audit)(/|$)", "--include-path", "/auth/signup/generate"]
NOT_ADMIN_ONLY = ["--exclude-path-regex", "^/(clients|audit)(/|$)", "--exclude-path", "/auth/signup/generate"]
# Every check but one: a client's valid request to an admin-only route is refused (403) by design.
ALL_BUT_ACCEPTANCE = ["--checks", "all", "--exclude-checks", "positive_data_acceptance"]
# Failed logins are not throttled here: a schema-valid login is answered 200 or 401, never 429.
UNTHROTTLED = {"LOGIN_MAX_FAILURES_PER_ADDRESS": 10**9, "LOGIN_MAX_FAILURES_PER_CLIENT": 10**9}

depths = pytest.mark.parametrize("depth", ["default", pytest.param("deep", marks=pytest.mark.deep)])
needs_st = pytest.mark.skipif(not ST.exists(), reason="schemathesis is not installed")


@pytest.fixture
def fuzz(depth, tmp_path):
    """Run schemathesis against `base_url` with `token`; fails the test on any failure it finds."""
    config = CONFIG
    if depth == "default":
        config = tmp_path / "schemathesis.toml"
        config.write_text(CONFIG.read_text() + DEFAULT_RUN_ONLY)

    def run(base_url: str, token: str, *args: str, checks=("--checks", "all")):
        return run_schemathesis(depth, config, base_url, token, *args, checks=checks)
    return run


def run_schemathesis(depth: str, config: Path, base_url: str, token: str, *args: str, checks):
    # One worker: with several, hypothesis sometimes trips over a CPython ast.parse thread-safety
    # bug ("AST constructor recursion depth mismatch") and schemathesis reports a runtime error.
    seed = os.environ.get("KMS_FUZZ_SEED") or (DEFAULT_SEED if depth == "default" else str(random.randrange(2**32)))
    examples = os.environ.get("KMS_FUZZ_EXAMPLES", EXAMPLES[depth])
    caller = jwt.decode(token, options={"verify_signature": False})["sub"]
    result = subprocess.run(
        [str(ST), "--config-file", str(config), "run", f"{base_url}/openapi.json",
         "-H", f"Authorization: Bearer {token}", *checks, "--max-examples", examples, "--workers", "1",
         "--no-color", "--seed", seed, *args],
        env={**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS), "KMS_FUZZ_CALLER_ID": caller},
        capture_output=True, text=True, timeout=900)
    failures = result.stdout.find("= FAILURES =")  # what failed, with its curl, rather than the summary alone
    shown = result.stdout[failures:failures + 6000] if failures >= 0 else result.stdout[-4000:]
    assert result.returncode == 0, f"KMS_FUZZ_SEED={seed}\n" + shown
    return result


@needs_st
@depths
@pytest.mark.own_app(**UNTHROTTLED)
def test_fuzzing_as_a_client_finds_no_failure(live_server, auth, client, fuzz):
    token = auth.new_client("fuzz-svc")
    client.post("/keys/actions/generate", json={"keyReference": "fuzz-key"}, headers=bearer(token))
    fuzz(live_server, token, "--exclude-path", "/auth/logout", *NOT_ADMIN_ONLY)
    fuzz(live_server, token, *ADMIN_ONLY, checks=ALL_BUT_ACCEPTANCE)


@needs_st
@depths
@pytest.mark.own_app(**UNTHROTTLED)
def test_fuzzing_as_an_admin_finds_no_failure(live_server, auth, fuzz, depth):
    fuzz(live_server, auth.admin_token, "--exclude-path", "/auth/logout",
         *(ADMIN_ONLY if depth == "default" else ()))


@needs_st
@depths
@pytest.mark.own_app
def test_fuzzing_logout_finds_no_failure(live_server, auth, fuzz):
    # Alone, with a token of its own: the first logout ends it, and every later call must still be
    # a documented answer (401), never a 500.
    token = auth.new_client("fuzz-logout-svc")
    result = fuzz(live_server, token, "--include-path", "/auth/logout",
                  checks=("--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                                      "response_headers_conformance,response_schema_conformance"))
    assert "Operations:       1 selected" in result.stdout and "Tested: 1" in result.stdout
