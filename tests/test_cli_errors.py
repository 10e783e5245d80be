"""Every `kms` command, for everything a user can cause (no configuration, the database down, bad
input, a name taken, no terminal): one line on stderr and the exit code of the table in
docs/OPERATIONS.md, never a traceback. The commands are read from the command line itself, so a
new one is covered (and needs its arguments below)."""
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import pytest

from kms.cli import main
from kms.config import generate_secret
from kms.serving.throwaway_postgres import _free_port
from tests.conftest import ADMIN_NAME, KMS_COMMAND as KMS, ROOT, bare_env

# Arguments that get each command past its usage checks, to whatever it does next.
ARGUMENTS = {
    ("clients", "delete"): ["some-svc", "--yes"], ("clients", "disable"): ["some-svc"],
    ("clients", "enable"): ["some-svc"], ("clients", "role"): ["some-svc", "admin"],
    ("clients", "unlock"): ["some-svc"], ("clients", "grants"): ["some-svc"], ("signup-token",): ["--name", "some-svc"],
    ("grants", "revoke"): ["00000000-0000-4000-8000-000000000000"],
    ("kek", "generate"): ["--pkcs11", "pkcs11:token=kms;object=kek-2"],
    ("import-seed",): ["--from", "postgresql://kms@127.0.0.1:1/kms", "--seed-env", "SEED_ENV"],
    ("audit", "acknowledge"): ["--head", "1:" + "0" * 64],
}
NEEDS_NO_DATABASE = {("gen-secret",), ("dev",)}


def leaf_commands(group=main, prefix=()):
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from leaf_commands(command, (*prefix, name))
        else:
            yield (*prefix, name)


COMMANDS = list(leaf_commands())


def run(args, env, cwd="/", stdin=b"", command=(KMS,)):
    """As cron or CI runs it: no terminal, stdin as given."""
    return subprocess.run([*command, *args], env=env, cwd=cwd, input=stdin, capture_output=True, timeout=60,
                          start_new_session=True)


def said(result) -> list[str]:
    """What the command said on stderr, its JSON log lines aside; never a traceback."""
    text = result.stderr.decode()
    assert "Traceback" not in text, text
    return [line for line in text.splitlines() if line.strip() and not line.startswith("{")]


def test_every_command_has_arguments_here_and_help():
    for command in COMMANDS:
        required = [param for param in main.get_command(None, command[0]).params] if len(command) == 1 else []
        assert not any(p.required for p in required) or command in ARGUMENTS, command
        result = run([*command, "--help"], bare_env())
        assert result.returncode == 0 and b"Usage:" in result.stdout, command
        assert len(result.stdout.decode().split("\n\n")[1].strip()) > 10, f"{command} has no help text"


@pytest.fixture(scope="module")
def seed_env(tmp_path_factory) -> str:
    """An original Go KMS's .env, as `kms import-seed --seed-env` reads it."""
    path = tmp_path_factory.mktemp("seed") / ".env"
    path.write_text("".join(f"{name}={generate_secret()}\n"
                            for name in ("KEK", "DB_SECRET", "KEY_REF_SECRET", "USERNAME_SECRET")))
    return str(path)


def run_all(commands, env, seed_env: str, cwd="/") -> dict:
    """Each command with its arguments, a few at a time."""
    def one(command):
        args = [seed_env if arg == "SEED_ENV" else arg for arg in ARGUMENTS.get(command, [])]
        return run([*command, *args], env, cwd=cwd)

    with ThreadPoolExecutor(4) as pool:
        return dict(zip(commands, pool.map(one, commands)))


def test_no_configuration_is_exit_2_listing_what_is_missing(tmp_path, seed_env):
    commands = [c for c in COMMANDS if c not in NEEDS_NO_DATABASE]
    for command, result in run_all(commands, bare_env(), seed_env, tmp_path).items():
        lines = said(result)
        if command == ("import-seed",):  # the original's database is checked before this one's settings
            assert result.returncode == 3 and lines == [
                "the original's database (--from) is unavailable: connection to server at \"127.0.0.1\", port 1 "
                "failed: Connection refused"], lines
            continue
        assert result.returncode == 2, (command, lines)
        assert lines[0].startswith("configuration errors: "), (command, lines)


def test_the_database_down_is_one_line_and_exit_3(secrets_env, seed_env):
    env = bare_env(**secrets_env, DATABASE_URL=f"postgresql://kms:Sekrit-pw@127.0.0.1:{_free_port()}/kms",
                   SERVER_PORT=str(_free_port()), PKCS11_MODULE="/nonexistent.so", PKCS11_PIN="1234")
    for command, result in run_all([c for c in COMMANDS if c not in NEEDS_NO_DATABASE], env, seed_env).items():
        lines = said(result)
        assert len(lines) == 1, (command, lines)
        assert b"Sekrit-pw" not in result.stderr
        if command == ("kek", "generate"):  # needs no database: the token's module is what is missing
            assert result.returncode == 2 and "PKCS11_MODULE: cannot be loaded" in lines[0], lines
            continue
        assert result.returncode == 3, (command, lines)
        if command != ("import-seed",):  # the original's database is unreachable too, and checked first
            assert lines[0].startswith("database unavailable: ") and "port" in lines[0], lines


BAD_INPUT = [
    (["signup-token", "--name", ADMIN_NAME], 1, "A client with that name already exists."),
    (["signup-token", "--name", "svc"], 2, "Must be 4-64 characters"),
    (["signup-token", "--name", "some-svc", "--ttl", "10"], 2, "'10' is not a duration: give a number with a unit"),
    (["signup-token", "--name", "some-svc", "--ttl", "31d"], 2, "at most 30d"),
    (["signup-token", "--name", "some-svc", "--role", "root"], 2, "'root' is not one of"),
    (["create-admin", "--name", ADMIN_NAME], 1, f"a client named {ADMIN_NAME} already exists"),
    (["create-admin", "--name", "other-admin"], 2, "no password: pipe it on stdin"),  # nothing on stdin, no terminal
    (["create-admin", "--name", "weak-admin"], 1, "password: Must be"),
    (["clients", "disable", "no-such-svc"], 1, "no client named no-such-svc"),
    (["clients", "enable", "00000000-0000-0000-0000-000000000000"], 1, "no client named 00000000-"),
    (["clients", "role", ADMIN_NAME, "root"], 2, "'root' is not one of"),
    (["clients", "role", ADMIN_NAME, "client"], 1, "This is the last active admin"),
    (["clients", "delete", ADMIN_NAME], 2, "no terminal to confirm on: add --yes"),
    (["clients", "unlock", "no-such-svc"], 1, "no client named no-such-svc"),
    (["keys", "list", "no-such-svc"], 1, "no client named no-such-svc"),
    (["audit", "verify", "--head", "garbage"], 2, "POSITION:MAC"),
    (["audit", "export", "--after", "x"], 2, "'x' is not a valid integer"),
    (["serve", "--workers", "0"], 2, "0 is not in the range"),
    (["kek", "generate", "--pkcs11", "nonsense"], 2, "--pkcs11"),
    (["import-seed", "--from", "postgresql://kms:Sekrit-pw@127.0.0.1:1/kms", "--seed-env", "/nonexistent"], 2,
     "does not exist"),
    (["frobnicate"], 2, "No such command 'frobnicate'"),
]


@pytest.mark.parametrize("args,code,message", BAD_INPUT, ids=lambda value: " ".join(value) if isinstance(value, list) else "")
def test_bad_input_is_one_line_with_its_exit_code(app, base_env, args, code, message):
    stdin = {"weak-admin": b"weak\n", ADMIN_NAME: b"Strong-enough-passw0rd\n"}.get(args[-1], b"") \
        if args[0] == "create-admin" else b""
    result = run(args, bare_env(**base_env), stdin=stdin)
    lines = said(result)
    assert result.returncode == code, (args, lines)
    assert any(message in line for line in lines), (args, lines)
    assert b"Sekrit-pw" not in result.stderr


@pytest.mark.parametrize("entry", ["python app.py", "flask --app app kms"])
def test_the_checkout_entry_points_say_the_same(app, base_env, entry):
    command = [sys.executable, str(ROOT / "app.py")] if entry == "python app.py" else \
        [str(Path(sys.executable).parent / "flask"), "--app", str(ROOT / "app.py"), "kms"]
    result = run(["signup-token", "--name", ADMIN_NAME], bare_env(**base_env), command=command)
    assert result.returncode == 1 and said(result) == ["A client with that name already exists."]


@pytest.mark.parametrize("setting,message", [
    ("SERVER_PORT=abc", "SERVER_PORT: 'abc' is not a port"), ("SERVER_PORT=99999", "SERVER_PORT: '99999' is not a port"),
    ("LOG_LEVEL=nonsense", "LOG_LEVEL: must be DEBUG, INFO, WARNING or ERROR")])
def test_dev_mode_with_a_bad_setting_is_exit_2_before_starting_anything(tmp_path, setting, message):
    name, value = setting.split("=", 1)
    result = run(["dev"], bare_env(**{name: value}), cwd=tmp_path)
    lines = said(result)
    assert result.returncode == 2 and any(message in line for line in lines), lines
    assert not (tmp_path / ".env.dev").exists() and result.stdout == b""
