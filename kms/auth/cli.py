"""`kms signup-token` and `kms create-admin`: signing services up from the KMS host."""
import re
import sys

import click
from flask.cli import with_appcontext

from kms.auth.service import create_client, issue_signup_token
from kms.console import cli_context, open_kms, parse_duration_ms
from kms.rules import CLIENTNAME_PATTERN, CLIENTNAME_PROBLEM, SIGNUP_TOKEN_MAX_TTL_MS, password_problem


@click.command("signup-token")
@with_appcontext
@click.option("--name", "clientname", required=True, help="Client name the token is bound to.")
@click.option("--ttl", default="24h", show_default=True, help="Lifetime: 30m, 24h, 7d (at most 30d).")
@click.option("--role", type=click.Choice(["client", "admin"]), default=None, help="Role (default: DEFAULT_ROLE).")
def signup_token(clientname, ttl, role):
    """Issue a one-time signup token; prints it alone on the last line."""
    if not re.fullmatch(CLIENTNAME_PATTERN, clientname):
        raise click.BadParameter(CLIENTNAME_PROBLEM, param_hint="--name")
    try:
        ttl_ms = parse_duration_ms(ttl)
    except click.BadParameter as problem:
        raise click.BadParameter(problem.message, param_hint="--ttl") from None
    if not 0 < ttl_ms <= SIGNUP_TOKEN_MAX_TTL_MS:
        raise click.BadParameter("must be more than 0 and at most 30d", param_hint="--ttl")
    with cli_context() as ctx:
        token, expires_at = issue_signup_token(ctx, clientname, ttl_ms, role)
    click.echo(f"Signup token for {clientname}, valid until {expires_at.isoformat(timespec='seconds')}:", err=True)
    click.echo(token)


@click.command("create-admin")
@with_appcontext
@click.option("--name", "clientname", default="admin", show_default=True, help="The admin's client name.")
def create_admin(clientname):
    """Create an admin client. The password is asked twice on a terminal, or read from the first
    line of stdin when piped."""
    open_kms()  # configuration and database first: nobody types a password for nothing
    if sys.stdin.isatty():
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    else:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise click.UsageError("no password: pipe it on stdin (one line), or run on a terminal to be asked")
    problem = password_problem(password)
    if problem:
        raise click.ClickException(f"password: {problem}")
    with cli_context() as ctx:
        client_id = create_client(ctx, clientname, password, "admin")
    if client_id is None:
        raise click.ClickException(f"a client named {clientname} already exists")
    click.echo(f"Created admin {clientname} ({client_id}).")


COMMANDS = (signup_token, create_admin)
