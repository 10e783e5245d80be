"""The database is untrusted storage: what each table's row MAC covers, declared once, and the checks.

Every row that grants authority or decides what is served carries `row_mac`, a MAC under a key
derived from DB_SECRET (kms.crypto.RowMacs), bound to its table and identity (the first column)
and covering every column that matters. A database writer without our secrets can change such a
row, but not make the MAC match: the row is then refused (IntegrityFailure), never obeyed.

Queries return rows by name (kms.db); a query that reads a row to check it selects these columns
under these names, with a prefix where it joins several tables (`session_jti`, `client_role`).
A column written as an expression (`revoked`) is declared with it in DERIVED; a test holds the
declarations against the schema and the queries.

What a MAC cannot show is that a row is the *latest* one: a writer may put back an older copy of
a row, MAC and all. The columns are chosen so that such copies gain nothing that lasts: sessions
carry their client's epoch (moved on by disable, delete, role change), keys carry their current
version and the line below which versions are retired, and look-ups check that the version after
the key row's current one does not exist. docs/SECURITY.md lists what remains.
"""
import operator
import uuid
from datetime import datetime

from kms import db
from kms.errors import IntegrityFailure


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

    def check(self, kms, row, *, prefix: str = "", refused_with: int | None = None, typed=None):
        """Believe `row` (named columns, as read) only if its MAC checks out. `typed` turns the
        columns into the types the MAC was made over, for a row read with text ids."""
        self.check_values(kms, self.values(row, prefix), refused_with=refused_with, typed=typed)

    def check_values(self, kms, values: tuple, *, refused_with: int | None = None, typed=None):
        """As check(), for the MAC'd columns and row_mac already in MAC order."""
        if not kms.keyring.rows.verify(self.purpose, values, typed):
            raise IntegrityFailure(self.name, values[0], refused_with or self.refused_with)


CLIENTS = MacdTable("clients", ("id", "name_hash", "password_hash", "role", "status", "session_epoch"), 500)
SESSIONS = MacdTable("sessions", ("jti", "client_id", "expires_at", "epoch", "revoked"), 401,
                     {"revoked": "revoked_at IS NOT NULL"})
SIGNUP_TOKENS = MacdTable("signup_tokens", ("id", "token_hash", "name_hash", "role", "expires_at", "used"), 401,
                          {"used": "used_at IS NOT NULL"})
KEYS = MacdTable("keys", ("id", "client_id", "ref_hash", "current_version", "retired_below", "deleted",
                          "rotation_period_ms", "exportable"), 500, {"deleted": "deleted_at IS NOT NULL"})
TABLES = (CLIENTS, SESSIONS, SIGNUP_TOKENS, KEYS)


def typed_session(values: tuple) -> tuple:
    """A session's columns read with text ids and expiry (the look-up's), as its MAC was made."""
    jti, client_id, expires_at, epoch, revoked = values
    return uuid.UUID(jti), uuid.UUID(client_id), datetime.fromisoformat(expires_at), epoch, revoked


def typed_client(values: tuple) -> tuple:
    return (uuid.UUID(values[0]), *values[1:])


# Migration 004's step: which query reads each table's rows without a MAC, and which writes one.
_BACKFILL = ((CLIENTS, "clients_for_row_macs", "set_client_row_mac"),
             (SESSIONS, "sessions_for_row_macs", "set_session_row_mac"),
             (SIGNUP_TOKENS, "signup_tokens_for_row_macs", "set_signup_token_row_mac"),
             (KEYS, "keys_for_row_macs", "set_key_row_mac"))


def backfill_row_macs(cur, kms) -> int:
    """Migration 004's step: the MACs of the rows already stored, computed once, in the migration's
    transaction. Only an upgrade runs it; afterwards a row without a MAC is refused like a bad one."""
    written = 0
    for table, select, update in _BACKFILL:
        cur.execute(getattr(db.sql, select))
        for row in cur.fetchall():
            columns = row._asdict()
            cur.execute(getattr(db.sql, update), {"id": columns[table.columns[0]], "row_mac": table.mac(kms, **columns)})
            written += 1
    return written


# Migration 008's step: the key rows' MACs over the declaration with `exportable`, each written only
# once the row's MAC over the earlier declaration (every column but that one) checks out.
KEYS_BEFORE_EXPORTABLE = MacdTable("keys", tuple(c for c in KEYS.columns if c != "exportable"), 500, KEYS.derived)


def remac_key_rows(cur, kms) -> int:
    """Migration 008's step, in its transaction: a row that checks out under neither declaration
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
