"""The database is untrusted storage: what each table's row MAC covers, declared once, and the checks.

Every row that grants authority or decides what is served carries `row_mac`, a MAC under a key
derived from DB_SECRET (kms.crypto.RowMacs), bound to its table and identity (the first column)
and covering every column that matters. A database writer without our secrets can change such a
row, but not make the MAC match: the row is then refused (IntegrityFailure), never obeyed.

Queries return rows by name (kms.db); a query that reads a row to check it selects these columns
under these names, with a prefix where it joins several tables (`session_jti`, `client_role`).
A column written as an expression (`revoked`) is declared with it in DERIVED; a test holds the
declarations against the schema and the queries.

What a MAC alone cannot show is that a row is the *latest* one: a writer may put back an older
copy of a row, MAC and all. So every such row also carries `revision`, under its MAC: 1 when the
row is made, one more at each change. A change past revision 1 is written through `sign()`,
which names the row and its new revision on the transaction's cursor; the audit event the
transaction records carries them (`changes`, under the event's MAC, then in the chain). Each
process keeps the newest revision it knows of each changed row (`Revisions`): from its own writes,
from rows it has read, and from the audit events of every other process (kms.audit.freshness).
A row read with a lower revision than that is an older copy put back: refused like a forged one.
docs/SECURITY.md says which rollbacks are refused on read and which within a seal interval.
"""
import operator
import uuid
from datetime import datetime

import logging
import threading
import time

from kms import db
from kms.errors import IntegrityFailure

log = logging.getLogger("kms.errors")


class Revisions:
    """The newest revision this process knows of each row changed past its first (a row at
    revision 1 has no older copy), with the audit event that recorded it. Rows are named by table
    and identity as text. A row destroyed is remembered one revision past its last, so no copy of
    it is ever believed again.

    Only committed changes are learned (this process's own, once their transaction commits, and
    other processes' from the audit trail), never a row merely read. When a row turns up older
    than known, `confirm(table, row_id, known_revision, event_id)` asks the database afresh: a
    read whose snapshot began before the change committed (a look-up racing a rotation) finds the
    row at the newer revision now, and is no put-back; a change whose audit event is gone with it
    (a failover to a standby that never received that transaction) leaves the row as stored the
    newest there is. Only a row still older, with the change's event still stored, is refused."""

    def __init__(self, confirm=None):
        self._newest: dict[tuple[str, str], tuple[int, object, float]] = {}  # revision, event id, learned at
        self._lock = threading.Lock()
        self.confirm = confirm  # -> "older copy" | "raced" | "lost"; None: every older row refused
        # The transaction id below which every audit event's changes are learned (kms.audit.freshness).
        self.followed_to = "0"

    def __len__(self):
        return len(self._newest)

    def admits(self, table: str, row_id, revision: int) -> bool:
        """False when a newer revision of the row is known, still recorded: the row read is an
        older copy put back."""
        known = self._newest.get((table, str(row_id)))
        if known is None or revision >= known[0]:
            return True
        if known[2] > db.reads_began():
            # Learned after this read began: its snapshot may predate the change (a look-up racing
            # a rotation). An answer from just before the change, not a row put back.
            return True
        verdict = "older copy" if self.confirm is None else self.confirm(table, str(row_id), known[0], known[1])
        if verdict == "raced":  # read on a snapshot from before the change: an answer from just before it
            return True
        if verdict == "lost":
            log.warning("a change recorded earlier is no longer in the database (a failover, or its audit event "
                        "deleted); the row as stored is believed", extra={"table": table, "rowId": str(row_id),
                                                                          "revision": revision})
            with self._lock:
                self._newest.pop((table, str(row_id)), None)
            return True
        return False

    def learn(self, table: str, row_id, revision: int, event_id=None):
        key = (table, str(row_id))
        with self._lock:
            if revision > self._newest.get(key, (1,))[0]:
                self._newest[key] = (revision, event_id, time.monotonic())

    def learn_changes(self, changes: str, event_id):
        for table, row_id, revision in parse_changes(changes):
            self.learn(table, row_id, revision, event_id)

    def newest(self, table: str, row_id) -> int | None:
        known = self._newest.get((table, str(row_id)))
        return None if known is None else known[0]

    def forget_all(self):
        with self._lock:
            self._newest.clear()
            self.followed_to = "0"


def change_text(table: str, row_id, revision: int) -> str:
    """How an audit event names a row it changed: `keys:12@3` (no secret: ids and numbers)."""
    return f"{table}:{row_id}@{revision}"


def parse_changes(text: str) -> list[tuple[str, str, int]]:
    changes = []
    for item in text.split(" "):
        name, _, revision = item.rpartition("@")
        table, _, row_id = name.partition(":")
        changes.append((table, row_id, int(revision)))
    return changes


class MacdTable:
    """A table whose rows carry a MAC over `columns` (identity first)."""

    def __init__(self, name: str, columns: tuple[str, ...], refused_with: int, derived: dict | None = None):
        self.name = name
        self.purpose = name.encode()
        self.columns = columns
        self.refused_with = refused_with  # 401: refused as if it did not exist; 500: integrity_error
        self.derived = derived or {}  # column -> the SQL expression it is read as
        self._getters: dict = {}

    def values(self, row, prefix: str = "") -> tuple:
        """The MAC'd columns of a named row, in MAC order, followed by its row_mac."""
        getter = self._getters.get(prefix)
        if getter is None:
            getter = self._getters[prefix] = operator.attrgetter(*(prefix + c for c in self.columns), prefix + "row_mac")
        return getter(row)

    def mac(self, kms, **columns) -> bytes:
        return kms.keyring.rows.mac(self.purpose, *(columns[name] for name in self.columns))

    def sign(self, cur, kms, **columns) -> bytes:
        """The MAC of a row being written in `cur`'s transaction. A change past revision 1 is
        named on the cursor for the audit event that must record it (kms.audit.service.record;
        the transaction refuses to commit a change no event recorded), and learned once the
        transaction commits."""
        revision = columns["revision"]
        if revision > 1:
            self._changed(cur, kms, columns[self.columns[0]], revision)
        return self.mac(kms, **columns)

    def _changed(self, cur, kms, row_id, revision: int):
        # Learned with the event that records it, once committed (kms.audit.service.record).
        cur.row_changes.append(change_text(self.name, row_id, revision))

    def destroyed(self, cur, kms, row_id, last_revision: int):
        """A row deleted for good: remembered one revision past its last, so a copy put back
        is refused."""
        self._changed(cur, kms, row_id, last_revision + 1)

    def check(self, kms, row, *, prefix: str = "", refused_with: int | None = None, typed=None):
        """Believe `row` (named columns, as read) only if its MAC checks out. `typed` turns the
        columns into the types the MAC was made over, for a row read with text ids."""
        self.check_values(kms, self.values(row, prefix), refused_with=refused_with, typed=typed)

    def check_values(self, kms, values: tuple, *, refused_with: int | None = None, typed=None):
        """As check(), for the MAC'd columns and row_mac already in MAC order."""
        if not kms.keyring.rows.verify(self.purpose, values, typed):
            raise IntegrityFailure(self.name, values[0], refused_with or self.refused_with)
        if not kms.revisions.admits(self.name, values[0], values[-2]):  # revision: the last column
            raise IntegrityFailure(self.name, values[0], refused_with or self.refused_with, rolled_back=True)


# The identity first, `revision` last (MacdTable.check reads it there).
CLIENTS = MacdTable("clients", ("id", "name_hash", "password_hash", "role", "status", "session_epoch", "revision"),
                    500)
SESSIONS = MacdTable("sessions", ("jti", "client_id", "expires_at", "epoch", "revoked", "revision"), 401,
                     {"revoked": "revoked_at IS NOT NULL"})
SIGNUP_TOKENS = MacdTable("signup_tokens", ("id", "token_hash", "name_hash", "role", "expires_at", "used",
                                            "revision"), 401, {"used": "used_at IS NOT NULL"})
KEYS = MacdTable("keys", ("id", "client_id", "ref_hash", "current_version", "retired_below", "deleted",
                          "rotation_period_ms", "exportable", "revision"), 500,
                 {"deleted": "deleted_at IS NOT NULL"})
# The audit chain's own state: whether a chain was ever started (so "no chain yet" can be told
# from "chain wiped") and a tampering found and not yet acknowledged (kms.audit.chainstate).
AUDIT_CHAIN_STATE = MacdTable("audit_chain_state", ("id", "chain_id", "started", "tampered", "revision"), 500)
# A grant (kms.grants): which client may use which key for which operations, until when, within
# which context. Refused as if it did not exist (404): a grantee learns nothing of a forged grant.
GRANTS = MacdTable("grants", ("id", "key_id", "grantee_id", "operations", "expires_at", "context_subset", "revoked",
                              "revision"), 404, {"revoked": "revoked_at IS NOT NULL"})
TABLES = (CLIENTS, SESSIONS, SIGNUP_TOKENS, KEYS, AUDIT_CHAIN_STATE, GRANTS)


def typed_session(values: tuple) -> tuple:
    """A session's columns read with text ids and expiry (the look-up's), as its MAC was made."""
    jti, client_id, expires_at, epoch, revoked, revision = values
    return uuid.UUID(jti), uuid.UUID(client_id), datetime.fromisoformat(expires_at), epoch, revoked, revision


def typed_client(values: tuple) -> tuple:
    return (uuid.UUID(values[0]), *values[1:])


def stale_rows(cur, newest: dict[tuple[str, str], int]) -> list[tuple[str, str, int, int]]:
    """The rows stored at a lower revision than `newest` names: (table, id, stored, newest). A row
    no longer stored is not stale (deleting a row takes away, it grants nothing)."""
    by_table: dict[str, list[str]] = {}
    for table, row_id in newest:
        by_table.setdefault(table, []).append(row_id)
    stale = []
    for table, ids in sorted(by_table.items()):
        if table not in {known.name for known in TABLES}:
            continue
        cur.execute(getattr(db.sql, f"{table}_revisions"), {"ids": ids})
        for row in cur.fetchall():
            if row.revision < newest[(table, row.id)]:
                stale.append((table, row.id, row.revision, newest[(table, row.id)]))
    return stale


# Migration 007's step (004's, before revisions existed): which query reads each table's rows without a MAC, and which writes one.
_BACKFILL = ((CLIENTS, "clients_for_row_macs", "set_client_row_mac"),
             (SESSIONS, "sessions_for_row_macs", "set_session_row_mac"),
             (SIGNUP_TOKENS, "signup_tokens_for_row_macs", "set_signup_token_row_mac"),
             (KEYS, "keys_for_row_macs", "set_key_row_mac"),
             (AUDIT_CHAIN_STATE, "audit_chain_state_for_row_macs", "set_audit_chain_state_row_mac"))


def backfill_row_macs(cur, kms) -> int:
    """Migration 007's step: the MACs of the rows already stored, computed once, in the migration's
    transaction. Only an upgrade runs it; afterwards a row without a MAC is refused like a bad one."""
    written = 0
    for table, select, update in _BACKFILL:
        cur.execute(getattr(db.sql, select))
        for row in cur.fetchall():
            columns = row._asdict()
            cur.execute(getattr(db.sql, update), {"id": columns[table.columns[0]], "row_mac": table.mac(kms, **columns)})
            written += 1
    return written


# Migration 009's step: the key rows' MACs over the declaration with `exportable`, each written only
# once the row's MAC over the earlier declaration (every column but that one) checks out.
KEYS_BEFORE_EXPORTABLE = MacdTable("keys", tuple(c for c in KEYS.columns if c != "exportable"), 500, KEYS.derived)


def remac_key_rows(cur, kms) -> int:
    """Migration 009's step, in its transaction: a row that checks out under neither declaration
    (tampered before the upgrade) is left as it is, to be refused like any other bad row."""
    written = 0
    cur.execute(db.sql.keys_to_remac)
    for row in cur.fetchall():
        if kms.keyring.rows.verify(KEYS.purpose, KEYS.values(row)):
            continue  # MAC'd over the new declaration already (by migration 004's backfill)
        if not kms.keyring.rows.verify(KEYS_BEFORE_EXPORTABLE.purpose, KEYS_BEFORE_EXPORTABLE.values(row)):
            continue
        cur.execute(db.sql.set_key_row_mac, {"id": row.id, "row_mac": KEYS.mac(kms, **row._asdict())})
        written += 1
    return written
