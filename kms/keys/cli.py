"""`kms kek ...` and `kms keys ...`: KEK rotation and the keys' commands (those that span the
domains, the cron job `kms keys rotate-due` and `kms keys list`, are kms/cli.py's)."""
import sys

import click
from flask import current_app
from flask.cli import AppGroup

from kms.config import load_settings, parse_pkcs11_uri
from kms.console import EXIT_INTEGRITY, Progress, cli_context
from kms.keyproviders.opening import load_module
from kms.keyproviders.pkcs11 import generate_key
from kms.keys.service import kek_usage, rewrap_keys


@click.group("kek", cls=AppGroup)
def kek():
    """Key encryption keys."""


@kek.command("status")
def kek_status():
    """Configured KEK versions, the active one, and how many DEK versions each wraps."""
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
    """Re-wrap every DEK under the active KEK (after adding KEK_n and setting KEK_ACTIVE)."""
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


@click.group("keys", cls=AppGroup)
def keys():
    """Data encryption keys."""


COMMANDS = (kek, keys)
