"""The command line: `kms <command>` (or `flask --app app kms <command>`).

`kms serve` and `kms dev` run the server; the admin commands work on the database directly,
without the HTTP server: host access is the authority, and every action is audited as `cli`.
Nothing needs configuration or a database until a command does: `kms --help` and `kms
gen-secret` work anywhere. An admin command opens one database connection, checks that the
schema is current and the secrets fit the stored data, and changes nothing else (`kms migrate`
migrates).

Exit codes (README, "Command line"): 0 done; 1 the command's own failure (a broken audit chain,
no such client); 2 usage or configuration; 3 something needed is unreachable or taken (the
database, the listening port); 4 stored data failed an integrity check.
"""
import json
import re
import sys
import time
from contextlib import contextmanager

import click
from flask import Flask, current_app
from flask.cli import AppGroup, FlaskGroup

from kms.rules import password_problem
from kms.config import generate_secret
from kms.context import Context

EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTEGRITY = 1, 2, 3, 4

DURATION_UNITS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


class OneLineError(click.ClickException):
    """What went wrong and what to do, on one line of stderr, without click's `Error:` prefix."""

    def show(self, file=None):
        click.echo(self.format_message(), err=True, file=file)


class Unreachable(OneLineError):
    exit_code = EXIT_UNREACHABLE


class IntegrityProblem(OneLineError):
    exit_code = EXIT_INTEGRITY


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


class KmsGroup(AppGroup):
    """Turns what goes wrong outside the command's control into one line and an exit code,
    instead of a traceback."""

    def invoke(self, ctx):
        import psycopg2
        from kms.errors import IntegrityFailure, ServiceUnavailable
        from kms.serving.lifecycle import PortTaken
        from kms.db import MigrationNeedsSecrets
        try:
            return super().invoke(ctx)
        except psycopg2.OperationalError as error:  # libpq names host and port, never the password
            raise Unreachable(f"database unavailable: {_first_line(error)}; check DATABASE_URL and that "
                              "PostgreSQL is running") from None
        except ServiceUnavailable:
            raise Unreachable("database unavailable: check DATABASE_URL and that PostgreSQL is running") from None
        except PortTaken as error:
            raise Unreachable(str(error)) from None
        except IntegrityFailure:
            raise IntegrityProblem("stored data failed an integrity check (see the log line above; the audit "
                                   "trail records it as integrity.failure)") from None
        except MigrationNeedsSecrets as error:
            raise click.ClickException(str(error)) from None


def parse_duration_ms(text: str) -> int:
    """`24h`, `30m`, `7d`, `90s`, `1500ms`, or a bare number of milliseconds."""
    match = re.fullmatch(r"\s*(\d+)\s*(ms|s|m|h|d)?\s*", text)
    if not match:
        raise click.BadParameter("use a number with a unit: 90s, 30m, 24h, 7d (bare numbers are milliseconds)")
    return int(match.group(1)) * DURATION_UNITS[match.group(2) or "ms"]


def runtime():
    """The KMS the command works on: the app's own when it has one (dev mode, tests), else one
    opened now from the environment with a single connection, checked, and closed with the command."""
    app = current_app
    kms = app.extensions.get("kms")
    if kms is None:
        from kms.config import load_settings
        from kms.runtime import Kms
        kms = Kms.open(load_settings(), pool_size=1)
        click.get_current_context().call_on_close(kms.close)
        kms.check()
        app.extensions["kms"] = kms
    return kms


@contextmanager
def cli_context():
    kms = runtime()
    with kms.pool.connection() as conn:
        yield Context(kms=kms, conn=conn, source_ip="local", origin="cli")


class Progress:
    """done/total and a rate on a terminal, redrawn at most every half second; nothing until the
    summary line otherwise (cron mail, logs)."""

    def __init__(self, what: str, stream=None):
        self.what = what
        self.stream = stream or sys.stderr
        self.total: int | None = None
        self.done = 0
        self.started = time.monotonic()
        self._drawn = 0.0
        self.live = self.stream.isatty()

    def update(self, done: int):
        self.done = done
        now = time.monotonic()
        if self.live and (now - self._drawn >= 0.5 or done == self.total):
            self._drawn = now
            total = f"/{self.total}" if self.total is not None else ""
            self.stream.write(f"\r{self.what}: {done}{total} ({self.rate():.0f}/s)  ")
            self.stream.flush()

    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.started, 1e-6)

    def finish(self) -> str:
        """The summary's timing part; ends the live line."""
        if self.live and self._drawn:
            self.stream.write("\n")
        return f"in {time.monotonic() - self.started:.1f} s, {self.rate():.0f}/s"


def cli_app() -> Flask:
    """The app of the command line: the commands, no routes, nothing opened until a command
    needs it (runtime())."""
    app = Flask("kms")
    app.cli.add_command(kms_cli)
    return app


@click.group("kms", cls=KmsGroup)
def kms_cli():
    """KMS administration."""


@kms_cli.command("signup-token")
@click.option("--name", "clientname", required=True, help="Client name the token is bound to.")
@click.option("--ttl", default="24h", show_default=True, help="Lifetime: 30m, 24h, 7d (at most 30d).")
@click.option("--role", type=click.Choice(["client", "admin"]), default=None, help="Role (default: DEFAULT_ROLE).")
def signup_token(clientname, ttl, role):
    """Issue a one-time signup token; prints it alone on the last line."""
    from kms.auth.service import issue_signup_token
    from schemas.common import CLIENTNAME, DAY_MS
    if not re.fullmatch(CLIENTNAME.regex, clientname):
        raise click.BadParameter(CLIENTNAME.error, param_hint="--name")
    try:
        ttl_ms = parse_duration_ms(ttl)
    except click.BadParameter as problem:
        raise click.BadParameter(problem.message, param_hint="--ttl") from None
    if not 0 < ttl_ms <= 30 * DAY_MS:
        raise click.BadParameter("must be more than 0 and at most 30d", param_hint="--ttl")
    with cli_context() as ctx:
        token, expires_at = issue_signup_token(ctx, clientname, ttl_ms, role)
    click.echo(f"Signup token for {clientname}, valid until {expires_at.isoformat(timespec='seconds')}:", err=True)
    click.echo(token)


@kms_cli.command("create-admin")
@click.option("--name", "clientname", default="admin", show_default=True)
def create_admin(clientname):
    """Create an admin client. The password is prompted for, or read from stdin when piped."""
    from kms.auth.service import create_client
    if sys.stdin.isatty():
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    else:
        password = sys.stdin.readline().rstrip("\n")
    problem = password_problem(password)
    if problem:
        raise click.ClickException(f"password: {problem}")
    with cli_context() as ctx:
        client_id = create_client(ctx, clientname, password, "admin")
    if client_id is None:
        raise click.ClickException(f"a client named {clientname} already exists")
    click.echo(f"Created admin {clientname} ({client_id}).")


@kms_cli.group("clients")
def clients():
    """Clients (service accounts)."""


@clients.command("unlock")
@click.argument("clientname")
def unlock(clientname):
    """Lift a client's login lock after failed logins (its failures are forgotten)."""
    from kms.auth.service import unlock_client
    with cli_context() as ctx:
        found = unlock_client(ctx, clientname=clientname)
    if not found:
        raise click.ClickException(f"no client named {clientname}")
    click.echo(f"unlocked {clientname}")


@kms_cli.command("migrate")
def migrate():
    """Apply pending schema migrations (safe while servers run, and when several start at once)."""
    from kms import db
    from kms.config import load_settings
    from kms.runtime import Kms
    kms = current_app.extensions.get("kms")
    if kms is None:
        kms = Kms.open(load_settings(), pool_size=1)
        click.get_current_context().call_on_close(kms.close)
    applied = kms.migrate()
    version = db.latest_schema_version()
    if applied:
        click.echo(f"applied {', '.join(applied)}; schema at version {version}")
    else:
        click.echo(f"schema is current (version {version})")


@kms_cli.command("gen-secret")
def gen_secret():
    """Print a new random 32-byte key in base64url (for KEK, JWT_SECRET, ...); needs no configuration."""
    click.echo(generate_secret())


@kms_cli.group("kek")
def kek():
    """Key encryption keys."""


@kek.command("status")
def kek_status():
    """Configured KEK versions, the active one, and how many DEK versions each wraps."""
    from kms.keys.service import kek_usage
    with cli_context() as ctx:
        usage = kek_usage(ctx)
        keyring = ctx.kms.keyring
    for version in sorted(set(keyring.kek_versions) | set(usage)):
        active = " (active)" if version == keyring.kek_active else ""
        provider = keyring.kek(version).describe() if version in keyring.kek_versions else "not configured"
        click.echo(f"KEK version {version}{active}: {usage.get(version, 0)} wrapped DEK versions [{provider}]")


@kek.command("generate")
@click.option("--pkcs11", "uri", required=True, metavar="URI",
              help="Where to make it: pkcs11:token=LABEL;object=LABEL (PKCS11_MODULE and the PIN from the environment).")
def kek_generate(uri):
    """Create a non-extractable AES-256 key in a PKCS#11 token, for use as KEK_n=URI."""
    from kms.keyproviders import load_module
    from kms.keyproviders.pkcs11 import generate_key, parse_pkcs11_uri
    from kms.config import load_settings
    kms = current_app.extensions.get("kms")
    settings = kms.settings if kms else load_settings()
    try:
        parsed = parse_pkcs11_uri(uri)
    except ValueError as problem:
        raise click.BadParameter(str(problem), param_hint="--pkcs11") from None
    if not settings.pkcs11_module or not settings.pkcs11_pin:
        raise click.ClickException("set PKCS11_MODULE and PKCS11_PIN (or PKCS11_PIN_FILE) first")
    module = load_module(settings)
    try:
        generate_key(module, parsed)
    except ValueError as problem:
        raise click.ClickException(str(problem)) from None
    except module._pkcs11.PKCS11Error as error:
        raise click.ClickException(f"the token refused ({type(error).__name__})") from None
    click.echo(f"created a non-extractable AES-256 key at {parsed}; configure it as KEK_n={parsed}")


@kek.command("rewrap")
def kek_rewrap():
    """Re-wrap every DEK under the active KEK (after adding KEK_n and setting KEK_ACTIVE)."""
    from kms.keys.service import rewrap_keys
    progress = Progress("re-wrapping DEK versions")
    with cli_context() as ctx:
        result = rewrap_keys(ctx, progress=progress)
        active = ctx.kms.keyring.kek_active
    timing = progress.finish()
    for key_id, version in result.failed:
        click.echo(f"key {key_id} version {version}: stored DEK failed authentication; left as it is", err=True)
    click.echo(f"re-wrapped {result.rewrapped} DEK versions under KEK version {active} ({timing})")
    if result.failed:
        click.echo(f"{len(result.failed)} DEK versions could not be re-wrapped (see above; recorded in the audit "
                   "trail as kek.rewrap integrity_error)", err=True)
        sys.exit(EXIT_INTEGRITY)


@kms_cli.group("keys")
def keys():
    """Data encryption keys."""


@keys.command("rotate-due")
def rotate_due():
    """Cron job: rotate keys past their rotation period, destroy keys whose deletion is due, and
    clear expired sessions and old records."""
    from kms.clients.service import purge_stale_records
    from kms.keys.service import destroy_due_keys, rotate_due_keys
    from kms.audit.service import flush_refusals
    progress = Progress("rotating keys past their period")
    with cli_context() as ctx:
        flush_refusals(ctx)
        rotated = rotate_due_keys(ctx, progress=progress)
        destroyed = destroy_due_keys(ctx)
        purged = purge_stale_records(ctx)
    click.echo(f"rotated {rotated} keys ({progress.finish()}), destroyed {destroyed} keys, "
               f"cleared {purged} expired sessions")


@kms_cli.group("audit")
def audit():
    """The audit trail."""


@audit.command("seal")
def audit_seal():
    """Seal pending events into the hash chain."""
    from kms.audit.service import ChainTampered, flush_refusals, read_head_file, seal_pending, write_head_file
    with cli_context() as ctx:
        flush_refusals(ctx)
        head_file = ctx.kms.settings.audit_head_file
        try:
            count, head = seal_pending(ctx.conn, ctx.kms.audit_key, wait=True, known=read_head_file(head_file))
        except ChainTampered as tampered:
            click.echo(f"audit chain tampered with at seq {tampered.seq}: {tampered.problem}; nothing sealed", err=True)
            sys.exit(EXIT_INTEGRITY)
        if head is not None and head_file:
            write_head_file(head_file, head)
    click.echo(f"sealed {count} events; head {head or 'none (empty chain)'}")


def _parse_head(_ctx, _param, value):
    from kms.audit.service import ChainHead
    if value is None:
        return None
    try:
        return ChainHead.parse(value)
    except ValueError:
        raise click.BadParameter("POSITION:MAC, as the server logs it (`audit chain head`) or /metrics shows it")


@audit.command("verify")
@click.option("--head", callback=_parse_head, metavar="POSITION:MAC",
              help="A chain head recorded outside the database; the chain must still contain it "
                   "(default: the one in AUDIT_HEAD_FILE, if set).")
def audit_verify(head):
    """Seal what is pending, walk the chain, exit 1 naming the first bad row."""
    from kms.audit.service import flush_refusals, read_head_file, record_alone, verify_chain
    with cli_context() as ctx:
        head = head or read_head_file(ctx.kms.settings.audit_head_file)
        flush_refusals(ctx)
        progress = Progress("verifying the audit chain")
        result = verify_chain(ctx.conn, ctx.kms.audit_key, head, progress=progress)
        record_alone(ctx, "audit.verify", "success" if result.ok else "broken",
                     target=None if result.ok else str(result.seq))
    if not result.ok:
        progress.finish()
        click.echo(f"audit chain BROKEN at seq {result.seq}: {result.problem} ({result.checked} rows verified before it)",
                   err=True)
        sys.exit(1)
    click.echo(f"audit chain intact: {result.checked} events verified ({progress.finish()}); "
               f"head {result.head or 'none'}")


@audit.command("export")
@click.option("--after", default=0, show_default=True, help="Export events after this sequence number.")
def audit_export(after):
    """Write events as JSON lines to stdout."""
    from kms.audit.service import export_events
    with cli_context() as ctx:
        for event in export_events(ctx.conn, after):
            click.echo(json.dumps(event, default=str))


@click.command("serve")
@click.option("--workers", type=click.IntRange(1, 64), default=None,
              help="Worker processes sharing the port (default: SERVER_WORKERS, else 1).")
def serve(workers):
    """Serve the KMS with waitress (configuration from the environment or .env)."""
    from kms.config import load_settings
    from kms.observability import configure_logging
    from kms.serving.workers import run_server
    settings = load_settings()
    log_writer = configure_logging(settings.log_level)
    try:
        code = run_server(settings, workers)
    finally:
        log_writer.close()  # what is buffered gets written
    sys.exit(code)


@click.command("dev")
def dev():
    """A throwaway KMS: embedded PostgreSQL, generated secrets, an admin and a signup token."""
    import os
    from kms.observability import configure_logging
    from kms.serving.dev import DevModeRefused, run_dev
    from kms.serving.throwaway_postgres import NoServerBinaries
    log_writer = configure_logging(os.environ.get("LOG_LEVEL", "INFO").upper())
    try:
        code = run_dev()
    except DevModeRefused as refused:
        raise click.UsageError(str(refused)) from None
    except NoServerBinaries as missing:
        raise click.ClickException(str(missing)) from None
    finally:
        log_writer.close()
    sys.exit(code)


class KmsCommand(FlaskGroup, KmsGroup):
    """`kms`: a FlaskGroup for its `--env-file` and .env loading, without Flask's own commands
    and options."""

    def __init__(self, **kwargs):
        super().__init__(create_app=lambda: Flask("kms"), add_default_commands=False, add_version_option=False,
                         **kwargs)
        self.params = [param for param in self.params if param.name == "env_file"]


main = KmsCommand(name="kms", help="KMS: serve (`kms serve`, `kms dev`) and administer (every other command) "
                                   "the key management service. Configuration comes from the environment, "
                                   "from .env in this directory or above, or from --env-file.")
main.add_command(serve)
main.add_command(dev)
for _command in kms_cli.commands.values():
    main.add_command(_command)
