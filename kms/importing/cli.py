"""`kms import-seed`: move a running deployment of the original Go KMS into this one."""
import sys

import click
import psycopg2
from flask.cli import with_appcontext

from kms.console import EXIT_FAILED, EXIT_INTEGRITY, EXIT_USAGE, Progress, Unreachable, cli_context
from kms.importing import original
from kms.importing.service import ImportRefused, SecretsDoNotFit, import_seed as run_import


def _first_line(error: BaseException) -> str:
    """libpq's message names host and port, never the password."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _reference(text: str | None) -> tuple[str, str] | None:
    if text is None:
        return None
    clientname, colon, reference = text.partition(":")
    if not colon or not clientname or not reference:
        raise click.BadParameter("give CLIENTNAME:REFERENCE", param_hint="--check-reference")
    return clientname, reference


@click.command("import-seed")
@with_appcontext
@click.option("--from", "source_url", required=True, metavar="URL",
              help="The original's database, as a libpq URL (its password better in ~/.pgpass or PGPASSWORD); "
                   "only read, in one read-only snapshot.")
@click.option("--seed-env", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The original's .env: its KEK, DB_SECRET, KEY_REF_SECRET and USERNAME_SECRET are read from it.")
@click.option("--dry-run", is_flag=True,
              help="Open and check everything, report what would be imported, write nothing.")
@click.option("--check-reference", metavar="CLIENTNAME:REFERENCE",
              help="One key known to exist: proves KEY_REF_SECRET, which the stored rows cannot (they hold hashes).")
def import_seed(source_url, seed_env, dry_run, check_reference):
    """Import the original Go KMS's clients and keys (every version, DEKs re-wrapped): its clients
    keep their passwords and get the same DEKs for every reference and version. Run it again to
    import what is new; nothing is imported twice."""
    reference = _reference(check_reference)
    try:
        secrets = original.read_seed_env(seed_env)
    except original.SeedEnvProblem as problem:
        for line in problem.problems:
            click.echo(f"--seed-env: {line}", err=True)
        sys.exit(EXIT_USAGE)
    try:
        source = original.connect(source_url)
    except psycopg2.OperationalError as error:
        raise Unreachable(f"the original's database (--from) is unavailable: {_first_line(error)}") from None
    progress = Progress("importing keys")
    try:
        with cli_context() as ctx:
            report = run_import(ctx, source, secrets, dry_run=dry_run, check_reference=reference, progress=progress)
    except psycopg2.OperationalError as error:
        if not source.closed:
            raise  # ours: the command line says so
        raise Unreachable(f"the original's database (--from) went away: {_first_line(error)}; run again, nothing "
                          "is imported twice") from None
    except SecretsDoNotFit as misfit:
        click.echo(str(misfit), err=True)
        sys.exit(EXIT_USAGE)
    except ImportRefused as refused:
        raise click.ClickException(str(refused)) from None
    finally:
        source.close()
    _summarise(report, progress.finish())


def _summarise(report, timing: str):
    click.echo(f"source: {report.source_clients} clients, {report.source_keys} keys "
               f"({report.source_versions} versions)")
    done = "would import" if report.dry_run else "imported"
    click.echo(f"{done} {report.clients} clients and {report.keys} keys ({report.versions} versions) ({timing}); "
               f"imported by an earlier run: {report.clients_before} clients, {report.keys_before} keys")
    for refusal in report.refused:
        kind = "does not open" if refusal.unreadable else "refused"
        click.echo(f"{kind}: {refusal.what}: {refusal.why}", err=True)
    if report.refused:
        unreadable = sum(refusal.unreadable for refusal in report.refused)
        click.echo(f"not imported: {len(report.refused)} ({unreadable} that do not open); the rest was"
                   f"{' (would be)' if report.dry_run else ''} imported", err=True)
    if report.key_ref_secret == "replaced":
        click.echo("KEY_REF_SECRET: proven by --check-reference, and kept in place of the one given before")
    elif report.key_ref_secret == "unchecked":
        click.echo("KEY_REF_SECRET: not checked (the source holds only hashes of references); fetch one imported key "
                   "by its reference, or run again with --check-reference CLIENTNAME:REFERENCE")
    if report.dry_run:
        click.echo("dry run: nothing was written")
    if any(refusal.unreadable for refusal in report.refused):
        sys.exit(EXIT_INTEGRITY)
    if report.refused:
        sys.exit(EXIT_FAILED)


COMMANDS = (import_seed,)
