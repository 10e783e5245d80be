"""Data encryption keys: generate, look up, rotate, retire, delete, restore, and the cron jobs.

Each key belongs to one client and is found by HMAC(KEY_REF_SECRET, owner, reference). Every
version's DEK is stored only wrapped under a KEK, bound to owner, reference, version and KEK version.
"""
import logging
import uuid
from dataclasses import replace
from datetime import timedelta
from typing import NamedTuple

import psycopg2

from kms import crypto, db, rows
from kms.audit.service import new_event, record, record_alone
from kms.auth.access import TOKEN_NOT_LIVE, authenticate, check_caller_row
from kms.context import Context
from kms.errors import Conflict, Gone, IntegrityFailure, NotFound, StoredDataCorrupt, Unauthorized
from kms.timefmt import rfc3339_from_now

log = logging.getLogger("kms.keys")

ENCODING = "base64url (RFC 4648)"
NO_SUCH_KEY = "No key with that reference."


class KeyMaterial(NamedTuple):
    dek: bytes
    version: int
    expires_at: str  # RFC 3339: how long the caller may cache the DEK

    def to_json(self) -> dict:
        return {"dek": crypto.b64url(self.dek), "version": self.version, "encoding": ENCODING,
                "expiresAt": self.expires_at}


def hash_key_reference(kms, owner_id: uuid.UUID, reference: str) -> bytes:
    return crypto.keyed_hash(kms.settings.key_ref_secret, b"kms-key-reference-v1", owner_id.bytes, reference.encode())


def _owner(ctx: Context) -> uuid.UUID:
    if ctx.claims is None:
        raise Unauthorized()
    return ctx.claims.client_id


def _address(ctx: Context, reference: str) -> tuple[uuid.UUID, bytes]:
    """The caller's id and the hashed reference: how a key is found."""
    owner_id = _owner(ctx)
    return owner_id, hash_key_reference(ctx.kms, owner_id, reference)


class KeyRow(NamedTuple):
    """A key row's MAC'd columns (kms.rows), checked: which version is current, which are retired."""
    key_id: int
    client_id: uuid.UUID
    ref_hash: bytes
    current_version: int
    retired_below: int
    deleted: bool
    rotation_period_ms: int | None


def _checked_key(ctx: Context, row) -> KeyRow:
    rows.check_key(ctx.kms, row[:8])
    return KeyRow(row[0], row[1], bytes(row[2]), *row[3:7])


def _lock_key(cur, ctx: Context, owner_id: uuid.UUID, ref_hash: bytes, *, deleted: bool = False) -> KeyRow:
    """Lock the caller's key row (rotations queue here) and check its MAC."""
    cur.execute(db.sql.lock_key, {"client_id": owner_id, "ref_hash": ref_hash, "deleted": deleted})
    row = cur.fetchone()
    if row is None:
        raise NotFound(NO_SUCH_KEY)
    return _checked_key(ctx, row)


def _write_key(cur, ctx: Context, key: KeyRow, **changes) -> KeyRow:
    key = key._replace(**changes)
    cur.execute(db.sql.update_key, {
        **key._asdict(), "row_mac": rows.key_mac(ctx.kms, *key),
        "wait": timedelta(milliseconds=ctx.kms.settings.key_deletion_wait_ms)})
    return key


def _expires_at(ctx: Context) -> str:
    return rfc3339_from_now(ctx.kms.settings.dek_cache_ms)


def _material(ctx: Context, dek: bytes, version: int) -> KeyMaterial:
    return KeyMaterial(dek, version, _expires_at(ctx))


def _unwrap(ctx: Context, key_id: int, owner_id, ref_hash: bytes, version: int, kek_version: int, wrapped) -> bytes:
    if wrapped is None:  # the version row the key row names is gone
        raise IntegrityFailure("keys", key_id)
    try:
        return ctx.kms.keyring.unwrap_dek(bytes(wrapped), owner_id, ref_hash, version, kek_version)
    except crypto.IntegrityError:
        # Tampered, moved between rows, or the wrong KEK: never serve anything in its place.
        log.error("stored key material failed authentication", extra={"keyId": key_id, "version": version})
        raise StoredDataCorrupt() from None


def _add_version(cur, ctx: Context, key: KeyRow) -> KeyMaterial:
    """Make a new version the key's current one (the caller holds the key's row lock) and write
    the key row with its MAC."""
    version = key.current_version + 1 if key.current_version else 1
    dek = crypto.new_dek()
    wrapped, kek_version = ctx.kms.keyring.wrap_dek(dek, key.client_id, key.ref_hash, version)
    params = {"key_id": key.key_id, "version": version, "kek_version": kek_version, "wrapped_dek": wrapped}
    if version > 1:
        cur.execute(db.sql.deprecate_in_use_version, params)  # for listings; decisions read the key row
    cur.execute(db.sql.insert_key_version, params)
    _write_key(cur, ctx, key, current_version=version)
    return _material(ctx, dek, version)


def generate_key(ctx: Context, reference: str) -> KeyMaterial:
    owner_id, ref_hash = _address(ctx, reference)
    with db.transaction(ctx.conn) as cur:
        authenticate(cur, ctx)
        cur.execute(db.sql.lock_generate, {"lock_key": int.from_bytes(ref_hash[:8], "big", signed=True)})
        if not cur.fetchone()[0]:
            raise Conflict("A key with that reference is being created.", code="key_exists")
        cur.execute(db.sql.insert_key, {"client_id": owner_id, "ref_hash": ref_hash,
                                        "ref_enc": ctx.kms.keyring.encrypt_field(reference, b"key-reference",
                                                                                 owner_id.bytes, ref_hash)})
        row = cur.fetchone()
        if row is None:
            raise Conflict("A key with that reference exists (or its deletion is pending).", code="key_exists")
        material = _add_version(cur, ctx, KeyRow(row[0], owner_id, ref_hash, 0, 1, False, None))
        record(cur, ctx, "key.generate", target=ref_hash.hex(), version=1)
    return material


def _look_up(conn, params: dict, durable: bool):
    with conn.cursor() as cur:  # one statement: its own transaction, no BEGIN/COMMIT round trips
        # Who fetched which key is recorded without waiting for the disk flush (and a synchronous
        # standby), unless AUDIT_KEY_LOOKUPS_DURABLE (README, "Audit"; docs/DEPLOYMENT.md).
        db.execute_prepared(cur, "lookup_key", params, prefix="" if durable else db.sql.relax_commit_durability + "; ")
        return cur.fetchone()


def get_key(ctx: Context, reference: str, version: int | None = None) -> tuple[KeyMaterial, KeyMaterial]:
    """(decryptWith, encryptWith). One statement, one round trip: it checks the token, reads both
    versions and writes the audit record of a successful look-up. Nothing read is believed before
    its row's MAC checks out."""
    owner_id, ref_hash = _address(ctx, reference)
    target = ref_hash.hex()
    def statement_parameters():
        params = new_event(ctx, "key.lookup", "success", target=target, version=version)
        # UUIDs go as text (the statement casts them): psycopg2 adapts UUID objects in Python.
        params.update(jti=ctx.claims.jti_text, client_id=ctx.claims.client_id_text, ref_hash=ref_hash,
                      audit=ctx.kms.settings.audit_key_lookups)
        return params

    durable = ctx.kms.settings.audit_key_lookups_durable
    try:
        row = _look_up(ctx.conn, statement_parameters(), durable)
    except (psycopg2.OperationalError, psycopg2.InterfaceError) as error:
        if ctx.origin != "api" or not db.is_broken(ctx.conn, error):
            raise
        # The connection broke before an answer (a failover, a restarted server): a look-up changes
        # nothing but its own audit record, so it is tried once more on a fresh connection, as a
        # new event (the first may have committed before the answer was lost: then both are kept).
        ctx = replace(ctx, conn=db.replace_broken_connection(ctx.conn))
        row = _look_up(ctx.conn, statement_parameters(), durable)
    if row is None:
        raise Unauthorized(TOKEN_NOT_LIVE)
    expires_at, epoch, session_mac, name_hash, password_hash, role, client_mac, key_id, current, retired_below, \
        period, key_mac, superseded, rotation_due, cur_kek, cur_wrapped, req_version, req_kek, req_wrapped, outcome = row
    jti, client_id = ctx.claims.jti_text, ctx.claims.client_id_text  # what the statement matched them on
    check_caller_row(ctx.kms, (jti, client_id, expires_at, epoch, False, bytes(session_mac),
                               client_id, bytes(name_hash), password_hash, role, "active", epoch, bytes(client_mac)),
                     text_ids=True)
    if key_id is not None:
        rows.check_key(ctx.kms, (key_id, owner_id, ref_hash, current, retired_below, False, period, bytes(key_mac)))
        if superseded:  # a version after the key row's current one exists: the row was put back
            raise IntegrityFailure("keys", key_id)
    if outcome != "success":
        if ctx.kms.settings.audit_key_lookups:
            record_alone(ctx, "key.lookup", outcome, target=target, version=version)
        if outcome == "gone":
            raise Gone("That version was retired and is no longer served.", code="version_retired")
        raise NotFound(NO_SUCH_KEY if key_id is None else "The key has no such version.")

    encrypt_with = _rotate_if_due(ctx, key_id) if rotation_due else None
    if encrypt_with is None:
        encrypt_with = _material(ctx, _unwrap(ctx, key_id, owner_id, ref_hash, current, cur_kek, cur_wrapped), current)
    if version is None or version == encrypt_with.version:
        return encrypt_with, encrypt_with
    decrypt_with = KeyMaterial(_unwrap(ctx, key_id, owner_id, ref_hash, req_version, req_kek, req_wrapped),
                               req_version, encrypt_with.expires_at)
    return decrypt_with, encrypt_with


def _rotate_if_due(ctx: Context, key_id: int) -> KeyMaterial | None:
    """Rotate a key whose rotation period has passed. If another request holds the key (it is
    rotating it), do not wait: return None and serve the version already read."""
    with db.transaction(ctx.conn) as cur:
        cur.execute(db.sql.lock_key_if_free, {"key_id": key_id})
        row = cur.fetchone()
        if row is None or not row[8]:
            return None
        key = _checked_key(ctx, row)
        material = _add_version(cur, ctx, key)
        record(cur, ctx, "key.auto_rotate", target=key.ref_hash.hex(), version=material.version)
    return material


def rotate_key(ctx: Context, reference: str) -> KeyMaterial:
    """One transaction holding the key's row lock: parallel rotations queue briefly and yield
    contiguous versions with exactly one in use."""
    owner_id, ref_hash = _address(ctx, reference)
    with db.transaction(ctx.conn) as cur:
        authenticate(cur, ctx)
        material = _add_version(cur, ctx, _lock_key(cur, ctx, owner_id, ref_hash))
        record(cur, ctx, "key.rotate", target=ref_hash.hex(), version=material.version)
    return material


def delete_key(ctx: Context, reference: str):
    """Stop serving the key now; destroy it after KEY_DELETION_WAIT (0: now)."""
    owner_id, ref_hash = _address(ctx, reference)
    with db.transaction(ctx.conn) as cur:
        authenticate(cur, ctx)
        key = _write_key(cur, ctx, _lock_key(cur, ctx, owner_id, ref_hash), deleted=True)
        record(cur, ctx, "key.delete", target=ref_hash.hex())
        if not ctx.kms.settings.key_deletion_wait_ms:
            cur.execute(db.sql.destroy_key, {"key_id": key.key_id})
            record(cur, ctx, "key.destroy", target=ref_hash.hex())


def schedule_owner_keys_deletion(cur, ctx: Context, owner_id: uuid.UUID):
    """In the caller's transaction: every live key of a deleted client is scheduled for deletion."""
    cur.execute(db.sql.lock_owner_keys, {"client_id": owner_id})
    for row in cur.fetchall():
        _write_key(cur, ctx, _checked_key(ctx, row), deleted=True)


def restore_key(ctx: Context, reference: str) -> dict:
    owner_id, ref_hash = _address(ctx, reference)
    with db.transaction(ctx.conn) as cur:
        authenticate(cur, ctx)
        try:
            key = _lock_key(cur, ctx, owner_id, ref_hash, deleted=True)
        except NotFound:
            cur.execute(db.sql.key_exists, {"client_id": owner_id, "ref_hash": ref_hash})
            if cur.fetchone() is not None:
                raise Conflict("The key is not pending deletion.", code="not_pending_deletion") from None
            raise
        _write_key(cur, ctx, key, deleted=False)
        record(cur, ctx, "key.restore", target=ref_hash.hex())
        return _metadata(cur, ctx, owner_id, ref_hash)[0]


def retire_versions(ctx: Context, reference: str, below_version: int) -> dict:
    """Retire every version below `below_version`: never served again, wrapped material erased."""
    owner_id, ref_hash = _address(ctx, reference)
    with db.transaction(ctx.conn) as cur:
        authenticate(cur, ctx)
        key = _lock_key(cur, ctx, owner_id, ref_hash)
        if below_version > key.current_version:  # a fact of the key's state, not of the request's form: 409
            raise Conflict(f"belowVersion may be at most the current version ({key.current_version}); the in-use "
                           "version cannot be retired.", code="version_in_use")
        cur.execute(db.sql.retire_versions_below, {"key_id": key.key_id, "below": below_version})
        for (retired,) in cur.fetchall():
            record(cur, ctx, "key.retire", target=ref_hash.hex(), version=retired)
        _write_key(cur, ctx, key, retired_below=max(key.retired_below, below_version))
        return _metadata(cur, ctx, owner_id, ref_hash)[0]


def set_rotation_period(ctx: Context, reference: str, period_ms: int | None) -> dict:
    owner_id, ref_hash = _address(ctx, reference)
    with db.transaction(ctx.conn) as cur:
        authenticate(cur, ctx)
        _write_key(cur, ctx, _lock_key(cur, ctx, owner_id, ref_hash), rotation_period_ms=period_ms)
        record(cur, ctx, "key.set_rotation_period", target=ref_hash.hex())
        return _metadata(cur, ctx, owner_id, ref_hash)[0]


def _metadata(cur, ctx: Context, owner_id, ref_hash: bytes | None) -> list[dict]:
    cur.execute(db.sql.key_metadata, {"client_id": owner_id, "ref_hash": ref_hash})
    keys = []
    for row_hash, ref_enc, current, period, created_at, rotated_at, destroy_at in cur.fetchall():
        try:
            reference = ctx.kms.keyring.decrypt_field(bytes(ref_enc), b"key-reference", owner_id.bytes, bytes(row_hash))
        except crypto.IntegrityError:
            log.error("stored key reference failed authentication")
            raise StoredDataCorrupt() from None
        keys.append({"keyReference": reference, "currentVersion": current,
                     "state": "pending-deletion" if destroy_at else "enabled", "rotationPeriod": period,
                     "createdAt": created_at, "rotatedAt": rotated_at, "destroyAt": destroy_at})
    return keys


def list_keys(ctx: Context) -> list[dict]:
    with db.transaction(ctx.conn) as cur:
        caller = authenticate(cur, ctx)
        return _metadata(cur, ctx, caller.id, None)


def list_versions(ctx: Context, reference: str) -> list[dict]:
    owner_id, ref_hash = _address(ctx, reference)
    with db.transaction(ctx.conn) as cur:
        authenticate(cur, ctx)
        cur.execute(db.sql.key_versions, {"client_id": owner_id, "ref_hash": ref_hash})
        rows = cur.fetchall()
    if not rows:
        raise NotFound(NO_SUCH_KEY)
    return [{"version": version, "state": state, "createdAt": created_at} for version, state, created_at in rows]


# Jobs for cron: `flask --app app kms keys rotate-due`.

def rotate_due_keys(ctx: Context, progress=None) -> int:
    with db.transaction(ctx.conn) as cur:
        cur.execute(db.sql.keys_due_for_rotation)
        due = [row[0] for row in cur.fetchall()]
    if progress is not None:
        progress.total = len(due)
    rotated = 0
    for done, key_id in enumerate(due, 1):
        rotated += _rotate_if_due(ctx, key_id) is not None
        if progress is not None:
            progress.update(done)
    return rotated


def destroy_due_keys(ctx: Context) -> int:
    destroyed = 0
    while True:
        with db.transaction(ctx.conn) as cur:
            cur.execute(db.sql.destroy_due_keys)
            rows = cur.fetchall()
            for _owner_id, ref_hash in rows:
                record(cur, ctx, "key.destroy", target=bytes(ref_hash).hex())
        destroyed += len(rows)
        if not rows:
            return destroyed


def kek_usage(ctx: Context) -> dict:
    with db.transaction(ctx.conn) as cur:
        cur.execute(db.sql.kek_usage)
        return dict(cur.fetchall())


class RewrapResult(NamedTuple):
    rewrapped: int
    failed: list  # (key id, version) of DEK versions that failed authentication: never material


def rewrap_keys(ctx: Context, batch: int = 500, progress=None) -> RewrapResult:
    """Re-wrap every DEK not under the active KEK, in batches, each batch one transaction. A
    version whose wrapped DEK fails authentication is left as it is, logged, audited and reported;
    every other one is moved."""
    keyring = ctx.kms.keyring
    rewrapped, failed = 0, []
    after = (0, 0)
    if progress is not None:
        with db.transaction(ctx.conn) as cur:
            cur.execute(db.sql.rewrap_backlog, {"active": keyring.kek_active})
            progress.total = cur.fetchone()[0]
    while True:
        with db.transaction(ctx.conn) as cur:
            cur.execute(db.sql.versions_to_rewrap, {"active": keyring.kek_active, "limit": batch,
                                                   "after_key": after[0], "after_version": after[1]})
            rows = cur.fetchall()
            moved = 0
            for key_id, version, kek_version, wrapped, owner_id, ref_hash in rows:
                after = (key_id, version)
                ref_hash = bytes(ref_hash)
                try:
                    dek = keyring.unwrap_dek(bytes(wrapped), owner_id, ref_hash, version, kek_version)
                except crypto.IntegrityError:
                    log.error("stored key material failed authentication; not re-wrapped",
                              extra={"keyId": key_id, "version": version})
                    record(cur, ctx, "kek.rewrap", outcome="integrity_error", target=ref_hash.hex(), version=version)
                    failed.append((key_id, version))
                    continue
                new_wrapped, new_kek = keyring.wrap_dek(dek, owner_id, ref_hash, version)
                cur.execute(db.sql.rewrap_version, {"key_id": key_id, "version": version, "kek_version": new_kek,
                                                    "wrapped_dek": new_wrapped})
                moved += 1
            if moved:
                record(cur, ctx, "kek.rewrap", outcome="success", version=keyring.kek_active)
        rewrapped += moved
        if progress is not None:
            progress.update(rewrapped + len(failed))
        if len(rows) < batch:
            return RewrapResult(rewrapped, failed)
