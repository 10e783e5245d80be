"""`kms audit ...`: sealing, verifying, acknowledging and exporting the audit trail."""
import json
import sys
import uuid

import click
from flask.cli import AppGroup

from kms import db
from kms.audit.chainstate import (ChainHead, ChainState, ChainTampered, HeadFile, HeadFileOfAnotherChain,
                                  HeadFileUnreadable, chain_id_of, check_chain, read_head_file, read_state,
                                  write_head_file, write_state)
from kms.audit.service import export_events, flush_refusals, record, seal_pending, verify_chain
from kms.console import EXIT_FAILED, EXIT_INTEGRITY, Progress, cli_context


@click.group("audit", cls=AppGroup)
def audit():
    """The audit trail."""


def _parse_head(_ctx, _param, value):
    if value is None:
        return None
    try:
        return ChainHead.parse(value)
    except ValueError:
        raise click.BadParameter("POSITION:MAC, as the server logs it (`audit chain head`) or /metrics shows it")


def _recorded(ctx) -> HeadFile:
    """The head file's content; an unreadable one, or one of another database's chain, ends the
    command (exit 4), never a traceback."""
    try:
        recorded = read_head_file(ctx.kms.settings.audit_head_file)
        if recorded.chain_id is not None:
            with db.transaction(ctx.conn) as cur:
                check_chain(recorded, read_state(cur, ctx.kms, lock=False))
        return recorded
    except HeadFileUnreadable as unreadable:
        click.echo(f"{unreadable}: counted as tampering until `kms audit acknowledge --head POSITION:MAC`", err=True)
    except HeadFileOfAnotherChain as foreign:
        click.echo(str(foreign), err=True)
    except ChainTampered as tampered:
        click.echo(f"audit chain tampered with: {tampered.problem}", err=True)
    sys.exit(EXIT_INTEGRITY)


HEAD_HELP = "A chain head recorded outside the database (default: the one in AUDIT_HEAD_FILE)."


@audit.command("seal")
@click.option("--head", callback=_parse_head, metavar="POSITION:MAC", help=HEAD_HELP)
def audit_seal(head):
    """Seal pending events into the hash chain (never over a chain that was cut or wiped)."""
    with cli_context() as ctx:
        settings = ctx.kms.settings
        recorded = _recorded(ctx)
        if recorded.tampered:
            click.echo(f"audit chain tampering found earlier: {recorded.tampered}; nothing sealed until "
                       "`kms audit acknowledge`", err=True)
            sys.exit(EXIT_INTEGRITY)
        flush_refusals(ctx)
        try:
            count, new_head = seal_pending(ctx.conn, ctx.kms, wait=True, known=head or recorded.head,
                                           chain_id=recorded.chain_id)
        except ChainTampered as tampered:
            where = f" at seq {tampered.seq}" if tampered.seq is not None else ""
            click.echo(f"audit chain tampered with{where}: {tampered.problem}; nothing sealed", err=True)
            sys.exit(EXIT_INTEGRITY)
        if new_head is not None and settings.audit_head_file:
            write_head_file(settings.audit_head_file, HeadFile(new_head, chain_id=chain_id_of(ctx.conn, ctx.kms)))
    click.echo(f"sealed {count} events; head {new_head or 'none (empty chain)'}")


@audit.command("verify")
@click.option("--head", callback=_parse_head, metavar="POSITION:MAC", help=HEAD_HELP)
def audit_verify(head):
    """Walk the chain and the rows it records changes of; write nothing. Exit 1 naming the first
    bad row."""
    with cli_context() as ctx:
        recorded = _recorded(ctx)
        progress = Progress("verifying the audit chain")
        result = verify_chain(ctx.conn, ctx.kms, head or recorded.head, progress=progress)
        with db.transaction(ctx.conn) as cur:
            cur.execute(db.sql.audit_backlog)
            pending = cur.fetchone().unsealed
    if result.ok and recorded.tampered and head is None:
        result.problem = f"the head file records tampering found earlier: {recorded.tampered}"
    if not result.ok:
        progress.finish()
        where = f" at seq {result.seq}" if result.seq is not None else ""
        click.echo(f"audit chain BROKEN{where}: {result.problem} ({result.checked} rows verified before it)", err=True)
        sys.exit(EXIT_FAILED)
    click.echo(f"audit chain intact: {result.checked} events verified ({progress.finish()}); "
               f"head {result.head or 'none'}; {pending} events not sealed yet")


@audit.command("acknowledge")
@click.option("--head", callback=_parse_head, metavar="POSITION:MAC", required=True,
              help="The chain head the operator checked and accepts: the chain is anchored on it from now on.")
def audit_acknowledge(head):
    """After tampering was found, or a restore from backup: accept the chain up to HEAD (which
    must be in the chain as stored), clear the tamper flag, and let sealing resume. Audited."""
    with cli_context() as ctx:
        settings = ctx.kms.settings
        try:
            recorded = read_head_file(settings.audit_head_file)
        except HeadFileUnreadable:
            recorded = HeadFile()  # replaced below
        result = verify_chain(ctx.conn, ctx.kms, head)
        if result.checked < head.position:
            # The chain must hold the accepted head intact; what lies after it is sealed anew.
            click.echo(f"the chain does not hold {head} intact: {result.problem}; nothing acknowledged", err=True)
            sys.exit(EXIT_INTEGRITY)
        with db.transaction(ctx.conn) as cur:
            try:
                state = read_state(cur, ctx.kms)
            except ChainTampered:
                state = None
            if state is None:  # gone or forged: written anew, past every revision the chain records
                state = ChainState(recorded.chain_id or str(uuid.uuid4()), True, None,
                                   ctx.kms.revisions.newest("audit_chain_state", True) or 1)
            write_state(cur, ctx.kms, state, started=True, tampered=None)
            record(cur, ctx, "audit.acknowledge", target=str(head))
        if settings.audit_head_file:
            write_head_file(settings.audit_head_file, HeadFile(head, chain_id=chain_id_of(ctx.conn, ctx.kms)))
    click.echo(f"acknowledged: the chain is anchored on {head}"
               + (f" (the head file recorded: {recorded.tampered})" if recorded.tampered else "")
               + "; sealing resumes")


@audit.command("export")
@click.option("--after", default=0, show_default=True, help="Export events after this sequence number.")
def audit_export(after):
    """Write events as JSON lines to stdout."""
    with cli_context() as ctx:
        for event in export_events(ctx.conn, after):
            click.echo(json.dumps(event, default=str))


COMMANDS = (audit,)
