"""The audit trail: record events, seal them into a keyed hash chain, verify the chain.

Each event gets a keyed MAC over its content when it is written (in the caller's transaction, so
no change commits without its record and a rolled-back change leaves none). A single sealer later
gives sealed events consecutive chain positions and chains their MACs; appends never wait on it.
No secret and no raw key reference is ever written here: keys are named by their HMAC.
"""
from dataclasses import dataclass, replace
from datetime import datetime, timezone

from kms import crypto, db
from kms.auth.access import require_admin
from kms.context import Context
from kms.ids import random_uuid

GENESIS = b"\x00" * 32
SEAL_BATCH = 2000


REFUSAL_WINDOW_S = 60


def _event(ctx: Context, action: str, outcome: str, target: str | None, version: int | None,
           actor: str | None, repeats: int | None = None) -> dict:
    return {
        "event_id": random_uuid(),
        "at": datetime.now(timezone.utc).isoformat(),  # as _text() gives it: the MAC covers this text
        "actor": actor or ctx.actor,
        "action": action,
        "target": target,
        "version": version,
        "outcome": outcome,
        "request_id": ctx.request_id,
        "source_ip": ctx.source_ip,
        "repeats": repeats,
    }


def new_event(ctx: Context, action: str, outcome: str = "success", *, target: str | None = None,
              version: int | None = None, actor: str | None = None, repeats: int | None = None) -> dict:
    """The parameters of one insert_audit_event, with its MAC."""
    event = _event(ctx, action, outcome, target, version, actor, repeats)
    event["row_mac"] = row_mac(ctx.kms.audit_key, event)
    return event


def record(cur, ctx: Context, action: str, outcome: str = "success", *, target: str | None = None,
           version: int | None = None, actor: str | None = None):
    """Write an event in the caller's transaction: it commits with the change it describes."""
    event = new_event(ctx, action, outcome, target=target, version=version, actor=actor)
    db.execute_prepared(cur, "insert_audit_event", event)


def record_refusal(cur, ctx: Context, action: str, outcome: str):
    """Record a refusal of an unauthenticated caller without letting a flood of them fill the
    table: the first in a minute from one source is an event at once, the others are counted and
    written as one event with `repeats` when the minute is over (flush_refusals)."""
    cur.execute(db.sql.count_refusal, {"action": action, "outcome": outcome, "source_ip": ctx.source_ip or "unknown",
                                       "window_s": REFUSAL_WINDOW_S})
    if cur.fetchone()[0] == 1:
        record(cur, ctx, action, outcome)


def flush_refusals(ctx: Context, *, everything: bool = False) -> int:
    """Write the counted refusals of closed windows (all of them with `everything`) as events
    with `repeats`, in one transaction with their removal from the counters."""
    written = 0
    with db.transaction(ctx.conn) as cur:
        cur.execute(db.sql.take_closed_refusal_windows, {"window_s": REFUSAL_WINDOW_S, "all": everything})
        for action, outcome, source_ip, _window_start, count in cur.fetchall():
            if count > 1:  # the first was recorded when it happened
                event = new_event(replace(ctx, source_ip=source_ip), action, outcome, actor="anonymous",
                                  repeats=count - 1)
                db.execute_prepared(cur, "insert_audit_event", event)
                written += 1
    return written


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
    return parts


def row_mac(key: bytes, event: dict) -> bytes:
    return crypto.keyed_hash(key, ROW_MAC_PURPOSE, *_mac_parts(event))


def chain_hash(key: bytes, previous: bytes, position: int, mac: bytes) -> bytes:
    return crypto.keyed_hash(key, b"kms-audit-chain-v1", previous, position.to_bytes(8, "big"), mac)


EVENT_COLUMNS = ("seq", "event_id", "at", "actor", "action", "target", "version", "outcome", "request_id",
                 "source_ip", "repeats", "row_mac")


def seal_pending(conn, key: bytes, *, wait: bool = False) -> int:
    """Seal every unsealed event into the chain; returns how many. One sealer at a time: without
    `wait`, a caller that finds another sealer at work returns 0 at once."""
    sealed = 0
    while True:
        with db.transaction(conn) as cur:
            cur.execute(db.sql.lock_audit_sealer if wait else db.sql.try_lock_audit_sealer)
            if not wait and not cur.fetchone()[0]:
                return sealed
            cur.execute(db.sql.audit_chain_head)
            head = cur.fetchone()
            position, previous = (head[0], bytes(head[1])) if head else (0, GENESIS)
            cur.execute(db.sql.unsealed_audit_events, {"limit": SEAL_BATCH})
            rows = cur.fetchall()
            seqs, positions, hashes = [], [], []
            for seq, mac in rows:
                position += 1
                previous = chain_hash(key, previous, position, bytes(mac))
                seqs.append(seq)
                positions.append(position)
                hashes.append(previous)
            if rows:
                cur.execute(db.sql.seal_audit_events, {"seqs": seqs, "positions": positions, "hashes": hashes})
        sealed += len(rows)
        if len(rows) < SEAL_BATCH:
            return sealed


@dataclass
class VerifyResult:
    checked: int
    problem: str | None = None
    seq: int | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


def verify_chain(conn, key: bytes) -> VerifyResult:
    """Seal what is pending, then walk the chain from its start; stop at the first bad row."""
    seal_pending(conn, key, wait=True)
    expected_position, previous, checked = 1, GENESIS, 0
    while True:
        with db.transaction(conn) as cur:
            cur.execute(db.sql.sealed_audit_chain, {"after_pos": expected_position - 1, "limit": 5000})
            rows = cur.fetchall()
        if not rows:
            return VerifyResult(checked)
        for row in rows:
            event = dict(zip(EVENT_COLUMNS, row))
            position, stored_hash = row[12], bytes(row[13])
            if position != expected_position:
                return VerifyResult(checked, f"chain position {expected_position} is missing (row deleted?)",
                                    event["seq"])
            if row_mac(key, event) != bytes(event["row_mac"]):
                return VerifyResult(checked, "row content does not match its MAC (altered or inserted out of band)",
                                    event["seq"])
            if chain_hash(key, previous, position, bytes(event["row_mac"])) != stored_hash:
                return VerifyResult(checked, "chain hash does not match (row altered or reordered)", event["seq"])
            previous, expected_position, checked = stored_hash, expected_position + 1, checked + 1


def public_event(row) -> dict:
    seq, at, actor, action, target, version, outcome, request_id, source_ip, repeats = row
    return {"seq": seq, "at": at, "actor": actor, "action": action, "target": target, "version": version,
            "outcome": outcome, "requestId": str(request_id) if request_id else None, "sourceIp": source_ip,
            "repeats": repeats}


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
            rows = cur.fetchall()
        for row in rows:
            event = public_event(row[:10])
            event["at"] = row[1].astimezone(timezone.utc).isoformat()
            event["chainPos"] = row[10]
            event["chainHash"] = bytes(row[11]).hex() if row[11] is not None else None
            yield event
            after = row[0]
        if len(rows) < page:
            return
