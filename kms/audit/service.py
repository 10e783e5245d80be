"""The audit trail: record events, seal them into a keyed hash chain, verify the chain.

Each event gets a keyed MAC over its content when it is written (in the caller's transaction, so
no change commits without its record and a rolled-back change leaves none). A single sealer later
gives sealed events consecutive chain positions and chains their MACs; appends never wait on it.
No secret and no raw key reference is ever written here: keys are named by their HMAC.
"""
from dataclasses import dataclass, replace
from datetime import datetime, timezone

from prometheus_client.core import GaugeMetricFamily

from kms import crypto, db
from kms.access import require_admin
from kms.audit.chainstate import ChainHead, ChainTampered, HeadFile, check_chain, read_state, write_state
from kms.context import Context
from kms.ids import time_ordered_uuid
from kms.rows import parse_changes, stale_rows

GENESIS = b"\x00" * 32
SEAL_BATCH = 2000


def _event(ctx: Context, action: str, outcome: str, target: str | None, version: int | None,
           actor: str | None, repeats: int | None = None, changes: str | None = None,
           detail: str | None = None) -> dict:
    return {
        "event_id": time_ordered_uuid(),
        "at": datetime.now(timezone.utc).isoformat(),  # as _text() gives it: the MAC covers this text
        "actor": actor or ctx.actor,
        "action": action,
        "target": target,
        "version": version,
        "outcome": outcome,
        "request_id": ctx.request_id,
        "source_ip": ctx.source_ip,
        "repeats": repeats,
        "changes": changes,
        "detail": detail,
    }


def new_event(ctx: Context, action: str, outcome: str = "success", *, target: str | None = None,
              version: int | None = None, actor: str | None = None, repeats: int | None = None,
              changes: str | None = None, detail: str | None = None) -> dict:
    """The parameters of one insert_audit_event, with its MAC. `detail`: JSON text saying what a
    batch touched (never a secret, a plaintext, a ciphertext or a context value)."""
    event = _event(ctx, action, outcome, target, version, actor, repeats, changes, detail)
    event["row_mac"] = row_mac(ctx.kms.audit_key, event)
    return event


def record(cur, ctx: Context, action: str, outcome: str = "success", *, target: str | None = None,
           version: int | None = None, actor: str | None = None, defer: bool = False,
           detail: str | None = None):
    """Write an event in the caller's transaction: it commits with the change it describes, and
    names every row the transaction changed so far (kms.rows: table, id and new revision), which
    binds each change to its place in the chain. `defer`: sent with the transaction's next
    statement or its COMMIT (db.transaction)."""
    changes = " ".join(cur.row_changes) or None
    cur.row_changes.clear()
    event = new_event(ctx, action, outcome, target=target, version=version, actor=actor, changes=changes,
                      detail=detail)
    if changes:  # known here once committed: a change rolled back must not make the row look old
        cur.after_commit.append(lambda: ctx.kms.revisions.learn_changes(changes, event["event_id"]))
    db.execute_prepared(cur, "insert_audit_event", event, defer=defer)


def record_refusal(ctx: Context, action: str, outcome: str):
    """Count a refusal of a caller nobody knows, in memory: no write, no transaction (a flood of
    them must cost next to nothing). flush_refusals writes the counts as audit events."""
    ctx.kms.refusals.count(action, outcome, ctx.source_ip)


def flush_refusals(ctx: Context) -> int:
    """Write this process's counted refusals, one event per action, outcome and source with
    `repeats` (how many refusals it stands for; none for one), in one transaction, each under its
    row MAC from the moment it is written. Returns the events written."""
    counts = ctx.kms.refusals.take()
    try:
        with db.transaction(ctx.conn) as cur:
            for (action, outcome, source), count in sorted(counts.items()):
                event = new_event(replace(ctx, source_ip=source, request_id=None), action, outcome,
                                  actor="anonymous", repeats=count if count > 1 else None)
                db.execute_prepared(cur, "insert_audit_event", event)
    except BaseException:
        ctx.kms.refusals.put_back(counts)
        raise
    return len(counts)


def record_alone(ctx: Context, action: str, outcome: str, **fields):
    """Record an event in a transaction of its own: for refusals, whose work is rolled back."""
    with db.transaction(ctx.conn) as cur:
        record(cur, ctx, action, outcome, **fields)


def _text(value) -> bytes:
    if value is None:
        return b"\x00"
    if isinstance(value, datetime):
        value = value.astimezone(timezone.utc).isoformat()
    return str(value).encode()


MAC_FIELDS = ("event_id", "at", "actor", "action", "target", "version", "outcome", "request_id", "source_ip")
ROW_MAC_PURPOSE = b"kms-audit-row-v1"


def _mac_parts(event: dict) -> list[bytes]:
    parts = [_text(event[name]) for name in MAC_FIELDS]
    if event.get("repeats") is not None:  # a part only when set: rows from before it keep their MAC
        parts.append(b"repeats=" + _text(event["repeats"]))
    if event.get("changes") is not None:
        parts.append(b"changes=" + _text(event["changes"]))
    if event.get("detail") is not None:  # likewise
        parts.append(b"detail=" + _text(event["detail"]))
    return parts


def row_mac(key: bytes, event: dict) -> bytes:
    return crypto.keyed_hash(key, ROW_MAC_PURPOSE, *_mac_parts(event))


def chain_hash(key: bytes, previous: bytes, position: int, mac: bytes) -> bytes:
    """Chain format 1, for rows sealed before format 2 existed."""
    return crypto.keyed_hash(key, b"kms-audit-chain-v1", previous, position.to_bytes(8, "big"), mac)


def chain_hash_v2(key: bytes, previous: bytes, position: int, seq: int, txid: int, mac: bytes) -> bytes:
    """Chain format 2: also covers the row's seq and the transaction that wrote it."""
    return crypto.keyed_hash(key, b"kms-audit-chain-v2", previous, position.to_bytes(8, "big"),
                             seq.to_bytes(8, "big"), txid.to_bytes(8, "big"), mac)


def _expected_hash(key: bytes, previous: bytes, chain_format: int, position: int, seq: int, txid: int,
                   mac: bytes) -> bytes | None:
    if chain_format == 1:
        return chain_hash(key, previous, position, mac)
    if chain_format == 2:
        return chain_hash_v2(key, previous, position, seq, txid, mac)
    return None


def _checked_head(cur, key: bytes, known: ChainHead | None) -> tuple[int, bytes, int]:
    """(position, hash, txid) of the chain's head, after checking it is the head a sealer made and
    that it is not behind one this process saw earlier; ChainTampered otherwise."""
    if known is not None:
        cur.execute(db.sql.audit_chain_hash_at, {"position": known.position})
        row = cur.fetchone()
        if row is None or bytes(row.chain_hash) != known.mac:
            raise ChainTampered(f"chain position {known.position}, sealed by this process, is gone or changed "
                                "(rows deleted and the chain rebuilt?)")
    cur.execute(db.sql.audit_chain_head)
    last_two = cur.fetchall()
    if not last_two:
        return 0, GENESIS, 0
    head = last_two[0]
    before = last_two[1] if len(last_two) > 1 else None
    previous = bytes(before.chain_hash) if before else GENESIS
    position = head.chain_pos
    if position != (before.chain_pos + 1 if before else 1) or _expected_hash(
            key, previous, head.chain_format, position, head.seq, int(head.txid), bytes(head.row_mac)) \
            != bytes(head.chain_hash):
        raise ChainTampered(f"the chain's head (position {position}) was not made by a sealer", head.seq)
    cur.execute(db.sql.unsealed_behind_head, {"txid": head.txid})
    behind = cur.fetchone().seq
    if behind is not None:
        raise ChainTampered("an unsealed row is older than the chain's head (inserted out of band, or its chain "
                            "was taken off it)", behind)
    return position, bytes(head.chain_hash), int(head.txid)


def seal_pending(conn, kms, *, wait: bool = False, known: ChainHead | None = None,
                 chain_id: str | None = None) -> tuple[int, ChainHead | None]:
    """Seal every unsealed event of ended transactions into the chain: (how many, the new head).
    One sealer at a time: without `wait`, a caller that finds another sealer at work returns at
    once. It never chains a row older than the head: it checks the head first (and against
    `known`, a head recorded outside the database), and the chain's state (a chain started before
    is not started again over rows whose chain was wiped; a tampering found and not acknowledged
    stops it), and raises ChainTampered instead of building on a chain that was cut or re-written."""
    key = kms.audit_key
    sealed, head = 0, known
    while True:
        starting = False
        with db.transaction(conn) as cur:
            cur.execute(db.sql.lock_audit_sealer if wait else db.sql.try_lock_audit_sealer)
            if not wait and not cur.fetchone().locked:
                return sealed, head
            cur.execute(db.sql.audit_seal_horizon)  # first: it must not depend on what we read next
            horizon = cur.fetchone().horizon
            position, previous, _ = _checked_head(cur, key, head)
            state = read_state(cur, kms)
            check_chain(HeadFile(chain_id=chain_id), state)  # `known` came from this chain's head file
            if state.tampered:
                raise ChainTampered(f"tampering found earlier and not acknowledged: {state.tampered}")
            if position == 0 and state.started:
                raise ChainTampered("the chain was started before and is empty now (its rows unchained in the "
                                    "database)")
            cur.execute(db.sql.unsealed_audit_events, {"horizon": horizon, "limit": SEAL_BATCH})
            unsealed = cur.fetchall()
            if unsealed and not state.started:
                # The chain starts: said in the state row, in the transaction that seals its first
                # rows (so no sealer ever sees it started and empty); the record of it is sealed
                # in the next round, once this transaction has ended.
                write_state(cur, kms, state, started=True)
                record(cur, Context(kms=kms, conn=conn), "audit.chain_start", actor="kms")
                starting = True
            seqs, positions, hashes = [], [], []
            for event in unsealed:
                position += 1
                previous = chain_hash_v2(key, previous, position, event.seq, int(event.txid), bytes(event.row_mac))
                seqs.append(event.seq)
                positions.append(position)
                hashes.append(previous)
            if unsealed:
                cur.execute(db.sql.seal_audit_events, {"seqs": seqs, "positions": positions, "hashes": hashes})
            if position:
                head = ChainHead(position, previous)
        sealed += len(unsealed)
        if len(unsealed) < SEAL_BATCH and not starting:
            return sealed, head


@dataclass
class VerifyResult:
    checked: int
    problem: str | None = None
    seq: int | None = None
    head: ChainHead | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


def verify_chain(conn, kms, recorded_head: ChainHead | None = None, progress=None) -> VerifyResult:
    """Walk the chain from its start, writing nothing; stop at the first bad row. With
    `recorded_head` (a head written down outside the database), the chain must still contain it:
    that catches the newest rows deleted, or the whole database put back to an older state. Then
    the chain's state, and every row whose change the chain records must be stored at that
    revision or a later one (kms.audit.freshness): an older copy put back is found here too."""
    key = kms.audit_key
    newest: dict[tuple[str, str], int] = {}
    expected_position, previous, checked, head, head_txid = 1, GENESIS, 0, None, 0
    if progress is not None:
        with db.transaction(conn) as cur:
            cur.execute(db.sql.audit_chain_length)
            progress.total = cur.fetchone().length
    while True:
        with db.transaction(conn) as cur:
            cur.execute(db.sql.sealed_audit_chain, {"after_pos": expected_position - 1, "limit": 5000})
            page = cur.fetchall()
        if not page:
            break
        for row in page:
            event = row._asdict()
            position, stored_hash, txid, chain_format = row.chain_pos, bytes(row.chain_hash), int(row.txid), \
                row.chain_format
            if position < expected_position:
                return VerifyResult(checked, f"chain position {position} appears twice (a row duplicated?)",
                                    event["seq"])
            if position != expected_position:
                return VerifyResult(checked, f"chain position {expected_position} is missing (row deleted?)",
                                    event["seq"])
            if row_mac(key, event) != bytes(event["row_mac"]):
                return VerifyResult(checked, "row content does not match its MAC (altered or inserted out of band)",
                                    event["seq"])
            expected = _expected_hash(key, previous, chain_format, position, event["seq"], txid,
                                      bytes(event["row_mac"]))
            if expected != stored_hash:
                return VerifyResult(checked, "chain hash does not match (row altered, renumbered or reordered)",
                                    event["seq"])
            if recorded_head is not None and position == recorded_head.position and stored_hash != recorded_head.mac:
                return VerifyResult(checked, f"chain position {position} is not the recorded head (the chain was "
                                             "re-written)", event["seq"])
            previous, expected_position, checked = stored_hash, expected_position + 1, checked + 1
            head, head_txid = ChainHead(position, stored_hash), txid
            if event["changes"]:
                for table, row_id, revision in parse_changes(event["changes"]):
                    newest[(table, row_id)] = max(revision, newest.get((table, row_id), 0))
        if progress is not None:
            progress.update(checked)
    if recorded_head is not None and (head is None or head.position < recorded_head.position):
        return VerifyResult(checked, f"the chain ends before the recorded head at position {recorded_head.position} "
                                     "(newest rows deleted, or the database restored to an older state)", head=head)
    unsealed = _verify_unsealed(conn, key, head_txid, newest)
    if unsealed is not None:
        problem, seq = unsealed
        return VerifyResult(checked, problem, seq, head=head)
    with db.transaction(conn) as cur:
        try:
            state = read_state(cur, kms, lock=False)
        except ChainTampered as tampered:
            return VerifyResult(checked, tampered.problem, head=head)
        if state.tampered:
            return VerifyResult(checked, f"tampering found earlier and not acknowledged: {state.tampered}", head=head)
        if head is None and state.started:
            return VerifyResult(checked, "the chain was started before and is empty now (its rows unchained in the "
                                         "database)")
        for table, row_id, stored, expected in stale_rows(cur, newest):
            return VerifyResult(checked, f"{table} row {row_id} is at revision {stored}, but the chain records "
                                         f"revision {expected}: an older copy put back", head=head)
    return VerifyResult(checked, head=head)


def _verify_unsealed(conn, key: bytes, head_txid: int, newest: dict) -> tuple[str, int] | None:
    """The rows no sealer has chained yet: each MAC must check out, and none may come from a
    transaction older than the chain's head (a sealer would have chained it). (problem, seq)."""
    after = 0
    while True:
        with db.transaction(conn) as cur:
            cur.execute(db.sql.unsealed_audit_page, {"after": after, "limit": 5000})
            page = cur.fetchall()
        for row in page:
            if row_mac(key, row._asdict()) != bytes(row.row_mac):
                return "unsealed row content does not match its MAC (altered or inserted out of band)", row.seq
            if int(row.txid) < head_txid:
                return ("an unsealed row is older than the chain's head (inserted out of band, or its chain "
                        "was taken off it)"), row.seq
            if row.changes:
                for table, row_id, revision in parse_changes(row.changes):
                    newest[(table, row_id)] = max(revision, newest.get((table, row_id), 0))
            after = row.seq
        if len(page) < 5000:
            return None


def gauges(conn) -> list:
    """For /metrics: the audit events not yet sealed into the chain."""
    with db.transaction(conn) as cur:
        cur.execute(db.sql.bounded_statement_time)
        cur.execute(db.sql.audit_backlog)
        backlog = cur.fetchone()
    return [
        GaugeMetricFamily("kms_audit_unsealed_events", "Audit events not yet sealed into the chain",
                          value=backlog.unsealed),
        GaugeMetricFamily("kms_audit_unsealed_oldest_seconds", "Age of the oldest unsealed audit event",
                          value=float(backlog.oldest_seconds or 0)),
    ]


def public_event(row) -> dict:
    return {"seq": row.seq, "at": row.at, "actor": row.actor, "action": row.action, "target": row.target,
            "version": row.version, "outcome": row.outcome,
            "requestId": str(row.request_id) if row.request_id else None, "sourceIp": row.source_ip,
            "repeats": row.repeats, "detail": row.detail}


def list_events(ctx: Context, after: int, limit: int) -> list[dict]:
    with db.transaction(ctx.conn) as cur:
        require_admin(cur, ctx)
        cur.execute(db.sql.audit_events_after, {"after": after, "limit": limit})
        return [public_event(row) for row in cur.fetchall()]


def export_events(conn, after: int = 0, page: int = 5000):
    """Every event after `after`, oldest first, with its chain position, for `audit export`."""
    while True:
        with db.transaction(conn) as cur:
            cur.execute(db.sql.audit_export_page, {"after": after, "limit": page})
            events = cur.fetchall()
        for row in events:
            event = public_event(row)
            event["at"] = row.at.astimezone(timezone.utc).isoformat()
            event["chainPos"] = row.chain_pos
            event["chainHash"] = bytes(row.chain_hash).hex() if row.chain_hash is not None else None
            yield event
            after = row.seq
        if len(events) < page:
            return
