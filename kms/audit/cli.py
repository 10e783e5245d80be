"""`kms audit ...`: sealing, verifying and exporting the audit trail."""
import json
import sys

import click
from flask.cli import AppGroup

from kms.audit.service import (ChainHead, ChainTampered, export_events, flush_refusals, read_head_file,
                               record_alone, seal_pending, verify_chain, write_head_file)
from kms.console import EXIT_FAILED, EXIT_INTEGRITY, Progress, cli_context


@click.group("audit", cls=AppGroup)
def audit():
    """The audit trail."""


@audit.command("seal")
def audit_seal():
    """Seal pending events into the hash chain."""
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
    with cli_context() as ctx:
        head = head or read_head_file(ctx.kms.settings.audit_head_file)
        flush_refusals(ctx)
        progress = Progress("verifying the audit chain")
        result = verify_chain(ctx.conn, ctx.kms.audit_key, head, progress=progress)
        record_alone(ctx, "audit.verify", "success" if result.ok else "broken",
                     target=None if result.ok else str(result.seq))
    if not result.ok:
        progress.finish()
        click.echo(f"audit chain BROKEN at seq {result.seq}: {result.problem} ({result.checked} rows verified before it)",
                   err=True)
        sys.exit(EXIT_FAILED)
    click.echo(f"audit chain intact: {result.checked} events verified ({progress.finish()}); "
               f"head {result.head or 'none'}")


@audit.command("export")
@click.option("--after", default=0, show_default=True, help="Export events after this sequence number.")
def audit_export(after):
    """Write events as JSON lines to stdout."""
    with cli_context() as ctx:
        for event in export_events(ctx.conn, after):
            click.echo(json.dumps(event, default=str))


COMMANDS = (audit,)
