"""`kms clients ...`: managing clients from the KMS host, through the same services as the admin
routes (/clients), audited with the actor `cli`. A client is named by its name or by its id as
`kms clients list` shows it."""
import json
import sys

import click
from flask.cli import AppGroup

from kms.auth.service import unlock_client
from kms.clients.service import delete_client, find_client, list_clients, set_enabled, set_role
from kms.console import OneLineFailure, cli_context, print_table
from kms.grants.service import list_client_grants


@click.group("clients", cls=AppGroup)
def clients():
    """Clients (service accounts): list, disable, enable, delete, unlock, change role, their grants."""


def _client_id(ctx, client: str):
    client_id = find_client(ctx, client)
    if client_id is None:
        raise OneLineFailure(f"no client named {client} (see `kms clients list`)")
    return client_id


@clients.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line instead of a table.")
def list_command(as_json):
    """Every client that is not deleted: id, name, role, status, when created, last login."""
    with cli_context() as ctx:
        found = list_clients(ctx)
    if as_json:
        for client in found:
            click.echo(json.dumps(client, default=str))
        return
    print_table(["ID", "NAME", "ROLE", "STATUS", "CREATED", "LAST LOGIN"],
                [[client["id"], client["clientname"], client["role"], client["status"], client["createdAt"],
                  client["lastLoginAt"]] for client in found])


@clients.command("disable")
@click.argument("client")
def disable(client):
    """Disable a client: its tokens stop working at once, and it cannot log in."""
    with cli_context() as ctx:
        set_enabled(ctx, _client_id(ctx, client), False)
    click.echo(f"disabled {client}; its tokens no longer work")


@clients.command("enable")
@click.argument("client")
def enable(client):
    """Enable a disabled client (it logs in again with its password)."""
    with cli_context() as ctx:
        set_enabled(ctx, _client_id(ctx, client), True)
    click.echo(f"enabled {client}")


@clients.command("delete")
@click.argument("client")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def delete(client, yes):
    """Delete a client: its tokens stop working, its name is freed, and its keys are scheduled for
    deletion (destroyed after KEY_DELETION_WAIT)."""
    with cli_context() as ctx:
        client_id = _client_id(ctx, client)
        if not yes and not sys.stdin.isatty():
            raise click.UsageError("no terminal to confirm on: add --yes")
        if not yes and not click.confirm(f"Delete client {client} ({client_id}) and schedule its keys for deletion?",
                                         default=False, err=True):
            raise OneLineFailure("not deleted")
        delete_client(ctx, client_id)
    click.echo(f"deleted {client} ({client_id}); its keys are scheduled for deletion")


@clients.command("unlock")
@click.argument("client")
def unlock(client):
    """Lift a client's login lock after failed logins (its failures are forgotten)."""
    with cli_context() as ctx:
        found = unlock_client(ctx, client_id=_client_id(ctx, client))
    if not found:
        raise OneLineFailure(f"no client named {client} (see `kms clients list`)")
    click.echo(f"unlocked {client}")


@clients.command("role")
@click.argument("client")
@click.argument("role", type=click.Choice(["client", "admin"]))
def role(client, role):
    """Change a client's role; its tokens stop working at once (it logs in again)."""
    with cli_context() as ctx:
        set_role(ctx, _client_id(ctx, client), role)
    click.echo(f"{client} is now {role}")


@clients.command("grants")
@click.argument("client")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line instead of a table.")
def grants(client, as_json):
    """The live grants made by CLIENT (a name or id) on its keys, or to it."""
    with cli_context() as ctx:
        found = list_client_grants(ctx, _client_id(ctx, client))
    if as_json:
        for grant in found:
            click.echo(json.dumps(grant, default=str))
        return
    print_table(["ID", "KEY", "GRANTEE", "OPERATIONS", "EXPIRES", "CONTEXT SUBSET"],
                [[grant["id"], f"{grant['owner']}:{grant['keyReference']}", grant["grantee"],
                  ",".join(grant["operations"]), grant["expiresAt"] or "never",
                  json.dumps(grant["contextSubset"]) if grant["contextSubset"] else ""] for grant in found])


COMMANDS = (clients,)
