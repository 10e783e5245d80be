"""Host-local administration: `flask --app app kms <command>`. Works on the database directly,
without the HTTP server; host access is the authority, and every action is audited as `cli`."""
import json
import re
import sys
from contextlib import contextmanager

import click
from flask import current_app
from flask.cli import AppGroup

from kms import db
from kms.rules import password_problem
from kms.config import generate_secret
from kms.context import Context

EXIT_INTEGRITY = 4  # stored data failed an integrity check (README, "Command line")

DURATION_UNITS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_duration_ms(text: str) -> int:
    """`24h`, `30m`, `7d`, `90s`, `1500ms`, or a bare number of milliseconds."""
    match = re.fullmatch(r"\s*(\d+)\s*(ms|s|m|h|d)?\s*", text)
    if not match:
        raise click.BadParameter("use a number with a unit: 90s, 30m, 24h, 7d (bare numbers are milliseconds)")
    return int(match.group(1)) * DURATION_UNITS[match.group(2) or "ms"]


@contextmanager
def cli_context():
    kms = current_app.extensions["kms"]
    with kms.pool.connection() as conn:
        yield Context(kms=kms, conn=conn, source_ip="local", origin="cli")


@click.group("kms", cls=AppGroup)
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
    ttl_ms = parse_duration_ms(ttl)
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
    """Apply pending schema migrations."""
    applied = db.migrate(current_app.extensions["kms"].settings.database_url)
    for name in applied:
        click.echo(f"applied {name}")
    click.echo(f"schema is current (version {db.latest_schema_version()})")


@kms_cli.command("gen-secret")
def gen_secret():
    """Print a new random 32-byte key in base64url (for KEK, JWT_SECRET, ...)."""
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
    settings = current_app.extensions["kms"].settings
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
    with cli_context() as ctx:
        result = rewrap_keys(ctx)
    active = current_app.extensions["kms"].keyring.kek_active
    for key_id, version in result.failed:
        click.echo(f"key {key_id} version {version}: stored DEK failed authentication; left as it is", err=True)
    click.echo(f"re-wrapped {result.rewrapped} DEK versions under KEK version {active}")
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
    with cli_context() as ctx:
        flush_refusals(ctx)
        rotated = rotate_due_keys(ctx)
        destroyed = destroy_due_keys(ctx)
        purge_stale_records(ctx)
    click.echo(f"rotated {rotated} keys, destroyed {destroyed} keys")


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
        result = verify_chain(ctx.conn, ctx.kms.audit_key, head)
        record_alone(ctx, "audit.verify", "success" if result.ok else "broken",
                     target=None if result.ok else str(result.seq))
    if not result.ok:
        click.echo(f"audit chain BROKEN at seq {result.seq}: {result.problem} ({result.checked} rows verified before it)",
                   err=True)
        sys.exit(1)
    click.echo(f"audit chain intact: {result.checked} events verified; head {result.head or 'none'}")


@audit.command("export")
@click.option("--after", default=0, show_default=True, help="Export events after this sequence number.")
def audit_export(after):
    """Write events as JSON lines to stdout."""
    from kms.audit.service import export_events
    with cli_context() as ctx:
        for event in export_events(ctx.conn, after):
            click.echo(json.dumps(event, default=str))
