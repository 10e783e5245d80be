"""`kms kek ...` and `kms keys ...`: KEK rotation and the keys' commands (those that span the
domains, the cron job `kms keys rotate-due` and `kms keys list`, are kms/cli.py's)."""
import sys

import click
from flask import current_app
from flask.cli import AppGroup

from kms import db
from kms.config import kek_variable, load_settings, parse_pkcs11_uri
from kms.console import EXIT_FAILED, EXIT_INTEGRITY, Progress, Unreachable, cli_context
from kms.keyproviders.opening import load_module
from kms.keyproviders.pkcs11 import generate_key
from kms.keys.kek_holders import LIVE_FOR_S, held_check_values, refresh
from kms.keys.service import KekNotHeldByAll, kek_usage, rewrap_keys


@click.group("kek", cls=AppGroup)
def kek():
    """Key encryption keys."""


@kek.command("status")
def kek_status():
    """KEK versions: configured here, the active one, the one new DEKs are wrapped under, how many
    DEK versions each wraps, and which live servers hold which."""
    with cli_context() as ctx:
        usage = kek_usage(ctx)
        keyring = ctx.kms.keyring
        with db.transaction(ctx.conn) as cur:
            holders = refresh(cur, keyring, held_check_values(keyring))
    for version in sorted(set(keyring.kek_versions) | set(usage)):
        active = " (active)" if version == keyring.kek_active else ""
        if version in keyring.kek_versions:
            provider = keyring.kek(version).describe()
        elif version in keyring.known_kek_versions:
            provider = f"not configured here: set {kek_variable(version)}; its look-ups answer 503 kek_unavailable"
        else:
            provider = ("not configured, and no server of this deployment ever held it: those rows were altered or "
                        "damaged; their look-ups answer 500 integrity_error")
        click.echo(f"KEK version {version}{active}: {usage.get(version, 0)} wrapped DEK versions [{provider}]")
    click.echo(f"new DEK versions are wrapped under KEK version {keyring.kek_wrap}")
    if not holders:
        click.echo("live servers: none")
    for holder in holders:
        versions = ", ".join(str(version) for version in sorted(holder.keks))
        click.echo(f"live server {holder.describe()}: KEK versions {versions}")


@kek.command("generate")
@click.option("--pkcs11", "uri", required=True, metavar="URI",
              help="Where to make it: pkcs11:token=LABEL;object=LABEL (PKCS11_MODULE and the PIN from the environment).")
def kek_generate(uri):
    """Create a non-extractable AES-256 key in a PKCS#11 token, for use as KEK_n=URI."""
    # Settings only: the KEK it makes may be configured already, and not exist until now.
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
    """Re-wrap every DEK under the active KEK (after adding KEK_n, restarting every server with it,
    and setting KEK_ACTIVE if it is not the highest). Refused while a live server lacks it."""
    progress = Progress("re-wrapping DEK versions")
    with cli_context() as ctx:
        keyring = ctx.kms.keyring
        try:
            result = rewrap_keys(ctx, progress=progress)
        except KekNotHeldByAll as refused:
            names = "; ".join(holder.describe() for holder in refused.lacking)
            raise Unreachable(f"refused: {len(refused.lacking)} live server process(es) do not hold KEK version "
                              f"{refused.version} ({kek_variable(refused.version)}): {names}. Restart them with it "
                              f"configured (a stopped one counts for {LIVE_FOR_S:.0f} s more), then run this again; "
                              "nothing was re-wrapped") from None
        active = keyring.kek_active
        known = keyring.known_kek_versions
    timing = progress.finish()
    for key_id, version in result.failed:
        click.echo(f"key {key_id} version {version}: stored DEK failed authentication; left as it is", err=True)
    damaged = 0
    for kek_version, count in sorted(result.skipped.items()):
        if kek_version in known:
            click.echo(f"{count} DEK versions under KEK version {kek_version} skipped: {kek_variable(kek_version)} is "
                       "not configured here (set it and run this again)", err=True)
        else:
            damaged += count
            click.echo(f"{count} DEK versions under KEK version {kek_version} skipped: no server of this deployment "
                       "ever held that version, so those rows were altered or damaged", err=True)
    click.echo(f"re-wrapped {result.rewrapped} DEK versions under KEK version {active} ({timing})")
    if result.failed:
        click.echo(f"{len(result.failed)} DEK versions could not be re-wrapped (see above; recorded in the audit "
                   "trail as kek.rewrap integrity_error)", err=True)
    if result.failed or damaged:
        sys.exit(EXIT_INTEGRITY)
    if result.skipped:
        sys.exit(EXIT_FAILED)


@click.group("keys", cls=AppGroup)
def keys():
    """Data encryption keys."""


COMMANDS = (kek, keys)
