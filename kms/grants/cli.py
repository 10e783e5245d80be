"""`kms grants revoke`: ending a grant from the KMS host, through the same service as the admin
route (DELETE /keys/{owner}:{ref}/grants/{id}), audited with the actor `cli`. A client's grants are
listed by `kms clients grants CLIENT`."""
import uuid

import click
from flask.cli import AppGroup

from kms.console import cli_context
from kms.grants.service import revoke_grant_by_id


@click.group("grants", cls=AppGroup)
def grants():
    """Grants: a key's owner sharing it with another client (`kms clients grants CLIENT` lists them)."""


@grants.command("revoke")
@click.argument("grant_id", type=click.UUID)
def revoke(grant_id: uuid.UUID):
    """End a grant at once, in every server process (its id as `kms clients grants` shows it)."""
    with cli_context() as ctx:
        revoke_grant_by_id(ctx, grant_id)
    click.echo(f"revoked grant {grant_id}: it allows nothing from now on")


COMMANDS = (grants,)
