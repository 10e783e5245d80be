"""The database is untrusted storage: what each table's row MAC covers, and the checks.

Every row that grants authority or decides what is served carries `row_mac`, a MAC under a key
derived from DB_SECRET (kms.crypto.RowMacs), bound to its table and identity (the first column
below) and covering every column that matters. A database writer without our secrets can change
such a row, but not make the MAC match: the row is then refused (IntegrityFailure), never obeyed.

What a MAC cannot show is that a row is the *latest* one: a writer may put back an older copy of
a row, MAC and all. The columns are chosen so that such copies gain nothing that lasts: sessions
carry their client's epoch (moved on by disable, delete, role change), keys carry their current
version and the line below which versions are retired, and look-ups check that the version after
the key row's current one does not exist. README's security model lists what remains.
"""
import uuid
from datetime import datetime

from kms.errors import IntegrityFailure

CLIENTS, SESSIONS, SIGNUP_TOKENS, KEYS = b"clients", b"sessions", b"signup_tokens", b"keys"


def client_mac(kms, client_id, name_hash, password_hash, role, status, session_epoch) -> bytes:
    return kms.keyring.rows.mac(CLIENTS, client_id, name_hash, password_hash, role, status, session_epoch)


def check_client(kms, row: tuple, *, status_code=500, typed=None):
    """row: (id, name_hash, password_hash, role, status, session_epoch, row_mac)."""
    if not kms.keyring.rows.verify(CLIENTS, row, typed):
        raise IntegrityFailure("clients", row[0], status_code)


def session_mac(kms, jti, client_id, expires_at, epoch, revoked: bool) -> bytes:
    return kms.keyring.rows.mac(SESSIONS, jti, client_id, expires_at, epoch, revoked)


def check_session(kms, row: tuple, typed=None):
    """row: (jti, client_id, expires_at, epoch, revoked, row_mac)."""
    if not kms.keyring.rows.verify(SESSIONS, row, typed):
        raise IntegrityFailure("sessions", row[0], 401)


def typed_session(columns: tuple) -> tuple:
    """A session row read with text ids and expiry (the look-up's), as its MAC was made."""
    jti, client_id, expires_at, epoch, revoked = columns
    return uuid.UUID(jti), uuid.UUID(client_id), datetime.fromisoformat(expires_at), epoch, revoked


def typed_client(columns: tuple) -> tuple:
    return (uuid.UUID(columns[0]), *columns[1:])


def signup_token_mac(kms, token_id, token_hash, name_hash, role, expires_at, used: bool) -> bytes:
    return kms.keyring.rows.mac(SIGNUP_TOKENS, token_id, token_hash, name_hash, role, expires_at, used)


def check_signup_token(kms, row: tuple):
    """row: (id, token_hash, name_hash, role, expires_at, used, row_mac)."""
    if not kms.keyring.rows.verify(SIGNUP_TOKENS, row):
        raise IntegrityFailure("signup_tokens", row[0], 401)


def key_mac(kms, key_id, client_id, ref_hash, current_version, retired_below, deleted: bool,
            rotation_period_ms) -> bytes:
    return kms.keyring.rows.mac(KEYS, key_id, client_id, ref_hash, current_version, retired_below, deleted,
                                rotation_period_ms)


def check_key(kms, row: tuple):
    """row: (id, client_id, ref_hash, current_version, retired_below, deleted, rotation_period_ms, row_mac)."""
    if not kms.keyring.rows.verify(KEYS, row):
        raise IntegrityFailure("keys", row[0], 500)


def backfill_row_macs(cur, kms) -> int:
    """Migration 004's step: the MACs of the rows already stored, computed once, in the migration's
    transaction. Only an upgrade runs it; afterwards a row without a MAC is refused like a bad one."""
    from kms import db
    written = 0
    for select, update, mac in ((db.sql.clients_for_row_macs, db.sql.set_client_row_mac, client_mac),
                                (db.sql.sessions_for_row_macs, db.sql.set_session_row_mac, session_mac),
                                (db.sql.signup_tokens_for_row_macs, db.sql.set_signup_token_row_mac,
                                 signup_token_mac),
                                (db.sql.keys_for_row_macs, db.sql.set_key_row_mac, key_mac)):
        cur.execute(select)
        for row in cur.fetchall():
            cur.execute(update, {"id": row[0], "row_mac": mac(kms, *row)})
            written += 1
    return written
