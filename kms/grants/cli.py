"""`kms grants ...`: the grants made by or to a client, and revoking one, from the KMS host, through
the same services as the admin routes (/clients/{id}/grants, DELETE /keys/{owner}:{ref}/grants/{id}),
audited with the actor `cli`."""
import json
import uuid

import click
from flask.cli import AppGroup

from kms.clients.service import find_client
from kms.console import OneLineFailure, cli_context, print_table
from kms.grants.service import list_client_grants, revoke_grant_by_id


@click.group("grants", cls=AppGroup)
def grants():
    """Grants: a key's owner sharing it with another client (list, revoke)."""


@grants.command("list")
@click.argument("client")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line instead of a table.")
def list_command(client, as_json):
    """The live grants made by CLIENT (a name or id) on its keys, or to it."""
    with cli_context() as ctx:
        client_id = find_client(ctx, client)
        if client_id is None:
            raise OneLineFailure(f"no client named {client} (see `kms clients list`)")
        found = list_client_grants(ctx, client_id)
    if as_json:
        for grant in found:
            click.echo(json.dumps(grant, default=str))
        return
    print_table(["ID", "KEY", "GRANTEE", "OPERATIONS", "EXPIRES", "CONTEXT SUBSET"],
                [[grant["id"], f"{grant['owner']}:{grant['keyReference']}", grant["grantee"],
                  ",".join(grant["operations"]), grant["expiresAt"] or "never",
                  json.dumps(grant["contextSubset"]) if grant["contextSubset"] else ""] for grant in found])


@grants.command("revoke")
@click.argument("grant_id", type=click.UUID)
def revoke(grant_id: uuid.UUID):
    """End a grant at once, in every server process (its id as `kms grants list` shows it)."""
    with cli_context() as ctx:
        revoke_grant_by_id(ctx, grant_id)
    click.echo(f"revoked grant {grant_id}: it allows nothing from now on")


COMMANDS = (grants,)
