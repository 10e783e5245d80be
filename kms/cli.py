"""The `kms` command: `kms serve` and `kms dev` run the server; the admin commands work on the
database directly, without the HTTP server: host access is the authority, and every action is
audited as `cli`. Each domain brings its commands (kms/<domain>/cli.py); this module gathers
them, maps what goes wrong outside a command's control to one line and an exit code
(kms.console), and holds the commands of no one domain: migrate, gen-secret, serve, dev and the
cron job `keys rotate-due` and `keys list`, which work in several.

Nothing needs configuration or a database until a command does: `kms --help` and `kms
gen-secret` work anywhere. An admin command opens one database connection, checks that the
schema is current and the secrets fit the stored data, and changes nothing else (`kms migrate`
migrates).
"""
import json
import os
import sys

import click
import psycopg2
from flask import Flask
from flask.cli import AppGroup, FlaskGroup

from kms import db
from kms.audit import cli as audit_cli
from kms.audit.freshness import catch_up
from kms.audit.service import flush_refusals
from kms.auth import cli as auth_cli
from kms.clients import cli as clients_cli
from kms.clients.service import find_client, list_clients, purge_stale_records
from kms.config import DEFAULT, LOG_LEVELS, ConfigError, generate_secret, load_settings
from kms.console import (OPENER, IntegrityProblem, OneLineFailure, Progress, Unreachable, cli_context, open_kms,
                         print_table)
from kms.db import MigrationNeedsSecrets
from kms.errors import ApiError, IntegrityFailure, ServiceUnavailable, StoredDataCorrupt
from kms.grants import cli as grants_cli
from kms.importing import cli as importing_cli
from kms.keys import cli as keys_cli
from kms.grants.service import expire_grants
from kms.keys.service import destroy_due_keys, list_client_keys, rotate_due_keys
from kms.observability.logs import configure_logging
from kms.runtime import Kms
from kms.serving.dev import DevModeRefused, run_dev
from kms.serving.lifecycle import PortTaken
from kms.serving.throwaway_postgres import NoServerBinaries
from kms.serving.workers import run_server


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


class KmsGroup(AppGroup):
    """Turns what goes wrong outside the command's control into one line and an exit code,
    instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except psycopg2.OperationalError as error:  # libpq names host and port, never the password
            raise Unreachable(f"database unavailable: {_first_line(error)}; check DATABASE_URL and that "
                              "PostgreSQL is running") from None
        except ServiceUnavailable:
            raise Unreachable("database unavailable: check DATABASE_URL and that PostgreSQL is running") from None
        except PortTaken as error:
            raise Unreachable(str(error)) from None
        except (IntegrityFailure, StoredDataCorrupt):
            raise IntegrityProblem("stored data failed an integrity check (see the log line above; the audit "
                                   "trail records it as integrity.failure)") from None
        except MigrationNeedsSecrets as error:
            raise click.ClickException(str(error)) from None
        except ApiError as refused:  # what the service refuses: a name taken, no such client, the last admin
            raise OneLineFailure(refused.message) from None


def open_runtime(check: bool) -> Kms:
    """How every command opens the KMS it works on (kms.console.open_kms): from the environment,
    with a single connection; checked against the stored data unless `check` is False."""
    kms = Kms.open(load_settings(), pool_size=1)
    if check:
        try:
            kms.check()
            with kms.pool.connection() as conn:  # the newest revision of every row changed so far
                catch_up(kms, conn)
        except BaseException:
            kms.close()
            raise
    return kms


def command_app() -> Flask:
    """The app the commands run in: no routes, nothing opened until a command needs it."""
    app = Flask("kms")
    app.extensions[OPENER] = open_runtime
    return app


def cli_app() -> Flask:
    """`flask --app app kms ...`: the command app, with the commands."""
    app = command_app()
    app.cli.add_command(kms_cli)
    return app


@click.group("kms", cls=KmsGroup)
def kms_cli():
    """KMS administration."""


@kms_cli.command("migrate")
def migrate():
    """Apply pending schema migrations (safe while servers run, and when several start at once)."""
    applied = open_kms(check=False).migrate()
    version = db.latest_schema_version()
    if applied:
        click.echo(f"applied {', '.join(applied)}; schema at version {version}")
    else:
        click.echo(f"schema is current (version {version})")


@kms_cli.command("gen-secret")
def gen_secret():
    """Print a new random 32-byte key in base64url (for KEK, JWT_SECRET, ...); needs no configuration."""
    click.echo(generate_secret())


@keys_cli.keys.command("rotate-due")
def rotate_due():
    """Cron job: rotate keys past their rotation period, destroy keys whose deletion is due, record
    the end of expired grants, and clear expired sessions and old records."""
    progress = Progress("rotating keys past their period")
    with cli_context() as ctx:
        flush_refusals(ctx)
        rotated = rotate_due_keys(ctx, progress=progress)
        destroyed = destroy_due_keys(ctx)
        expired = expire_grants(ctx)
        purged = purge_stale_records(ctx)
    click.echo(f"rotated {rotated} keys ({progress.finish()}), destroyed {destroyed} keys, "
               f"ended {expired} expired grants, cleared {purged} expired sessions")


@keys_cli.keys.command("list")
@click.argument("client", required=False)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line instead of a table.")
def keys_list(client, as_json):
    """Every key of CLIENT (a name or id; default: of every client): its reference, current version,
    state, rotation period. Metadata only, never DEK material."""
    with cli_context() as ctx:
        if client is None:
            owners = [(found["clientname"], found["id"]) for found in list_clients(ctx)]
        else:
            client_id = find_client(ctx, client)
            if client_id is None:
                raise OneLineFailure(f"no client named {client} (see `kms clients list`)")
            owners = [(client, client_id)]
        listed = [(name, key) for name, owner_id in owners for key in list_client_keys(ctx, owner_id)]
    if as_json:
        for name, key in listed:
            click.echo(json.dumps({"client": name, **key}, default=str))
        return
    print_table(["CLIENT", "REFERENCE", "VERSION", "STATE", "ROTATION PERIOD", "ROTATED", "DESTROY AT"],
                [[name, key["keyReference"] or "(imported, not yet named)", key["currentVersion"], key["state"],
                  _period(key["rotationPeriod"]), key["rotatedAt"], key["destroyAt"]] for name, key in listed])


def _period(milliseconds: int | None) -> str | None:
    if milliseconds is None:
        return None
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if milliseconds % size == 0:
            return f"{milliseconds // size}{unit}"
    return f"{milliseconds}ms"


@click.command("serve")
@click.option("--workers", type=click.IntRange(1, 64), default=None,
              help="Worker processes sharing the port (default: SERVER_WORKERS, else 1).")
def serve(workers):
    """Serve the KMS with waitress (configuration from the environment or .env)."""
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
    level = os.environ.get("LOG_LEVEL", DEFAULT.log_level).upper()
    if level not in LOG_LEVELS:
        raise ConfigError("LOG_LEVEL", f"must be {', '.join(LOG_LEVELS[:-1])} or {LOG_LEVELS[-1]}")
    log_writer = configure_logging(level)
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
        super().__init__(create_app=command_app, add_default_commands=False, add_version_option=False,
                         **kwargs)
        self.params = [param for param in self.params if param.name == "env_file"]
        self.params[0].help = ("Read settings from this file (NAME=value lines, as .env); they take precedence over "
                               ".env, and variables set in the environment over both.")


main = KmsCommand(name="kms", help="KMS: serve (`kms serve`, `kms dev`) and administer (every other command) "
                                   "the key management service. Configuration comes from the environment, "
                                   "from .env in this directory or above, or from --env-file.")
for _command in (*auth_cli.COMMANDS, *clients_cli.COMMANDS, *keys_cli.COMMANDS, *grants_cli.COMMANDS,
                 *audit_cli.COMMANDS, *importing_cli.COMMANDS):
    kms_cli.add_command(_command)
main.add_command(serve)
main.add_command(dev)
for _command in kms_cli.commands.values():
    main.add_command(_command)
