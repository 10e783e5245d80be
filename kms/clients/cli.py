"""`kms clients ...`: managing clients from the KMS host."""
import click
from flask.cli import AppGroup

from kms.auth.service import unlock_client
from kms.console import cli_context


@click.group("clients", cls=AppGroup)
def clients():
    """Clients (service accounts)."""


@clients.command("unlock")
@click.argument("clientname")
def unlock(clientname):
    """Lift a client's login lock after failed logins (its failures are forgotten)."""
    with cli_context() as ctx:
        found = unlock_client(ctx, clientname=clientname)
    if not found:
        raise click.ClickException(f"no client named {clientname}")
    click.echo(f"unlocked {clientname}")


COMMANDS = (clients,)
