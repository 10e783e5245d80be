"""Data encryption keys: generate, look up, rotate, retire, delete, restore, and the cron jobs.

Each key belongs to one client and is found by HMAC(KEY_REF_SECRET, owner, reference). Every
version's DEK is stored only wrapped under a KEK, bound to owner, reference, version and KEK version.
"""
import logging
import time
import uuid
from dataclasses import replace
from datetime import timedelta
from typing import NamedTuple

import psycopg2
from prometheus_client.core import GaugeMetricFamily

from kms import crypto, db
from kms.audit.service import new_event, record, record_alone
from kms.access import TOKEN_NOT_LIVE, authenticate
from kms.context import Context
from kms.errors import (ApiError, Conflict, Forbidden, Gone, IntegrityFailure, KekNotHeld, NotFound, StoredDataCorrupt,
                        Unauthorized)
from kms.keys.address import NO_SUCH_KEY, check_shared, hash_key_reference, own_address, owner_moved, resolve
from kms.keys.imported import claim_imported_key, imported_key_named, rewrap_source_secrets
from kms.keys.kek_holders import held_check_values, lacking, live_holders
from kms.rows import CLIENTS, KEYS, SESSIONS, typed_client, typed_session
from kms.timefmt import rfc3339_from_now

log = logging.getLogger("kms.keys")

ENCODING = "base64url (RFC 4648)"
NOT_EXPORTABLE = "This key is not exportable: its DEK never leaves the KMS; use the key's encrypt and decrypt actions."


class KeyMaterial(NamedTuple):
    dek: bytes
    version: int
    expires_at: str  # RFC 3339: how long the caller may cache the DEK
    exportable: bool = True

    def to_json(self) -> dict:
        if not self.exportable:  # the version made, never its DEK
            return {"version": self.version, "exportable": False}
        return {"dek": crypto.b64url(self.dek), "version": self.version, "encoding": ENCODING,
                "expiresAt": self.expires_at}


def _address(ctx: Context, reference: str) -> tuple[uuid.UUID, bytes]:
    """The caller's id and the hashed reference of a key of its own: how a key is found by the
    routes a grant never opens (`{owner}:{ref}` is 404 there)."""
    return own_address(ctx, reference).address


class KeyRow(NamedTuple):
    """A key row's MAC'd columns (kms.rows.KEYS), checked: which version is current, which are retired."""
    id: int
    client_id: uuid.UUID
    ref_hash: bytes
    current_version: int
    retired_below: int
    deleted: bool
    rotation_period_ms: int | None
    exportable: bool
    revision: int


def _checked_key(ctx: Context, row) -> KeyRow:
    KEYS.check(ctx.kms, row)
    return KeyRow(row.id, row.client_id, bytes(row.ref_hash), row.current_version, row.retired_below, row.deleted,
                  row.rotation_period_ms, row.exportable, row.revision)


def _lock_key(cur, ctx: Context, owner_id: uuid.UUID, ref_hash: bytes, reference: str, *,
              deleted: bool = False) -> KeyRow:
    """Lock the caller's key row (rotations queue here) and check its MAC."""
    cur.execute(db.sql.lock_key, {"client_id": owner_id, "ref_hash": ref_hash, "deleted": deleted})
    row = cur.fetchone()
    if row is None and _claim_imported(cur, ctx, owner_id, reference, ref_hash):
        cur.execute(db.sql.lock_key, {"client_id": owner_id, "ref_hash": ref_hash, "deleted": deleted})
        row = cur.fetchone()
    if row is None:
        raise NotFound(NO_SUCH_KEY)
    return _checked_key(ctx, row)


# Keys imported from the original KMS (kms/keys/imported.py): our index misses them until their
# owner first names them; that request moves the key under our index, in its own transaction.

def _claim_imported(cur, ctx: Context, owner_id: uuid.UUID, reference: str, ref_hash: bytes) -> bool:
    """Our index missed `reference`: move the caller's imported key it names (if any) under it, in
    the caller's transaction. True when a key is there now (moved by this request or another)."""
    try:
        key_id = claim_imported_key(cur, ctx.kms, owner_id, reference, ref_hash)
    except crypto.IntegrityError:
        log.error("stored key material failed authentication; the imported key was not moved")
        raise StoredDataCorrupt() from None
    if key_id:
        record(cur, ctx, "key.claim_imported", target=ref_hash.hex())
    return key_id is not None


def _claimed_alone(ctx: Context, owner_id: uuid.UUID, reference: str, ref_hash: bytes) -> bool:
    with db.transaction(ctx.conn) as cur:
        return _claim_imported(cur, ctx, owner_id, reference, ref_hash)


def _write_key(cur, ctx: Context, key: KeyRow, **changes) -> KeyRow:
    """The key row changed, at its next revision, with its MAC; the caller's audit event records it."""
    key = key._replace(**changes, revision=key.revision + 1)
    cur.execute(db.sql.update_key, {
        **key._asdict(), "row_mac": KEYS.sign(cur, ctx.kms, **key._asdict()),
        "wait": timedelta(milliseconds=ctx.kms.settings.key_deletion_wait_ms)})
    return key


def _expires_at(ctx: Context) -> str:
    return rfc3339_from_now(ctx.kms.settings.dek_cache_ms)


def _material(ctx: Context, dek: bytes, version: int, exportable: bool = True) -> KeyMaterial:
    return KeyMaterial(dek, version, _expires_at(ctx), exportable)


_KEK_LOG_EVERY_S = 10.0
_kek_logged: dict = {}  # KEK version -> when its last "not held" line was written (time.monotonic())


def kek_not_held(ctx: Context, key_id: int, version: int, kek_version: int) -> ApiError:
    """What a DEK under a KEK version this process lacks is answered with: 503 kek_unavailable when
    some process of this deployment held that version (the configurations differ: a restart
    fixes it), 500 integrity_error when none ever did (the row was altered). Either is counted
    and logged, naming the version (one line per version per ten seconds)."""
    if kek_version not in ctx.kms.keyring.known_kek_versions:
        return IntegrityFailure("key_versions", f"{key_id}:{version}")  # reported by its error handler
    ctx.kms.metrics.kek_unavailable.labels(str(kek_version)).inc()
    now = time.monotonic()
    if now - _kek_logged.get(kek_version, -_KEK_LOG_EVERY_S) >= _KEK_LOG_EVERY_S:
        _kek_logged[kek_version] = now
        log.warning("a stored DEK is wrapped under a KEK version this server does not hold; answered 503 "
                    "kek_unavailable (restart this server with it configured)",
                    extra={"kekVersion": kek_version, "keyId": key_id, "version": version})
    return KekNotHeld()


def _unwrap(ctx: Context, key_id: int, owner_id, ref_hash: bytes, version: int, kek_version: int, wrapped) -> bytes:
    if wrapped is None:  # the version row the key row names is gone
        raise IntegrityFailure("keys", key_id)
    try:
        return ctx.kms.keyring.unwrap_dek(bytes(wrapped), owner_id, ref_hash, version, kek_version)
    except crypto.KekMissing:
        raise kek_not_held(ctx, key_id, version, kek_version) from None
    except crypto.IntegrityError:
        # Tampered, moved between rows, or the wrong KEK: never serve anything in its place.
        # Reported as any failed integrity check (a metric and an integrity.failure event beside the line).
        log.error("stored key material failed authentication", extra={"keyId": key_id, "version": version})
        raise IntegrityFailure("key_versions", f"{key_id}:{version}") from None


def _add_version(cur, ctx: Context, key: KeyRow) -> KeyMaterial:
    """Make a new version the key's current one (the caller holds the key's row lock) and write
    the key row with its MAC."""
    version = key.current_version + 1 if key.current_version else 1
    dek = crypto.new_dek()
    wrapped, kek_version = ctx.kms.keyring.wrap_dek(dek, key.client_id, key.ref_hash, version)
    params = {"key_id": key.id, "version": version, "kek_version": kek_version, "wrapped_dek": wrapped}
    if version > 1:
        cur.execute(db.sql.deprecate_in_use_version, params)  # for listings; decisions read the key row
    cur.execute(db.sql.insert_key_version, params)
    _write_key(cur, ctx, key, current_version=version)
    return _material(ctx, dek, version, key.exportable)


def generate_key(ctx: Context, reference: str, exportable: bool = True) -> KeyMaterial:
    owner_id, ref_hash = _address(ctx, reference)
    with db.transaction(ctx.conn) as cur:
        authenticate(cur, ctx)
        cur.execute(db.sql.lock_generate, {"lock_key": int.from_bytes(ref_hash[:8], "big", signed=True)})
        if not cur.fetchone().locked:
            raise Conflict("A key with that reference is being created.", code="key_exists")
        cur.execute(db.sql.insert_key, {"client_id": owner_id, "ref_hash": ref_hash,
                                        "ref_enc": ctx.kms.keyring.encrypt_field(reference, b"key-reference",
                                                                                 owner_id.bytes, ref_hash)})
        row = cur.fetchone()
        if row is None or imported_key_named(cur, ctx.kms, owner_id, reference):
            raise Conflict("A key with that reference exists (or its deletion is pending).", code="key_exists")
        material = _add_version(cur, ctx, KeyRow(row.id, owner_id, ref_hash, 0, 1, False, None, exportable, 0))
        record(cur, ctx, "key.generate", target=ref_hash.hex(), version=1)
    return material


# The columns every statement that reads a key to serve it returns first, in this order, named so
# that the same checks read them (_check_look_up): the session, the client, the key row.
KEY_READ = [("session_expires_at", str), ("session_epoch", int), ("session_revision", int),
            ("session_row_mac", bytes), ("client_name_hash", bytes), ("client_password_hash", str),
            ("client_role", str), ("client_revision", int), ("client_row_mac", bytes), ("key_id", int | None),
            ("key_current_version", int | None), ("key_retired_below", int | None),
            ("key_rotation_period_ms", int | None), ("key_exportable", bool | None), ("key_revision", int | None),
            ("key_row_mac", bytes | None), ("superseded", bool | None), ("rotation_due", bool | None)]
# ... and, for a grantee, the owner's client row and the grant, with what their MACs cover
# (kms.keys.address.check_shared).
SHARED_READ = [("o_name_hash", bytes | None), ("o_password_hash", str | None), ("o_role", str | None),
               ("o_status", str | None), ("o_epoch", int | None), ("o_revision", int | None), ("o_mac", bytes | None),
               ("grant_id", uuid.UUID | None), ("g_operations", list | None), ("g_expires_at", object),
               ("g_context", str | None), ("g_revision", int | None), ("g_mac", bytes | None)]
# The look-up statement's columns (sql/queries/keys.sql, lookup_key), in its order: the hot path
# names them once here instead of asking the cursor to build a record type from its description on
# every call (tests/test_rows.py holds the two together).
LookUpRow = NamedTuple("LookUpRow", [
    *KEY_READ, ("cur_kek", int | None), ("cur_wrapped", bytes | None), ("req_version", int | None),
    ("req_kek", int | None), ("req_wrapped", bytes | None), ("outcome", str), *SHARED_READ])


def _look_up(conn, params: dict, durable: bool) -> LookUpRow | None:
    with conn.cursor(cursor_factory=psycopg2.extensions.cursor) as cur:  # one statement, its own transaction
        # Who fetched which key is recorded without waiting for the disk flush (and a synchronous
        # standby), unless AUDIT_KEY_LOOKUPS_DURABLE (docs/SECURITY.md; docs/DEPLOYMENT.md).
        db.execute_prepared(cur, "lookup_key", params, prefix="" if durable else db.sql.relax_commit_durability + "; ")
        row = cur.fetchone()
    return None if row is None else LookUpRow._make(row)


@db.reading()  # what it reads is checked against revisions learned before it began (kms.rows.Revisions)
def get_key(ctx: Context, reference: str, version: int | None = None) -> tuple[KeyMaterial, KeyMaterial]:
    """(decryptWith, encryptWith). One statement, one round trip: it checks the token, reads both
    versions and writes the audit record of a successful look-up. Nothing read is believed before
    its row's MAC checks out. `reference` may name a key another client granted `fetch` on
    (`{owner}:{ref}`): the statement then also reads the owner and the grant, and the record
    names the grant."""
    address = resolve(ctx, reference)
    owner_id, ref_hash = address.address
    target = ref_hash.hex()
    def statement_parameters():
        detail = None if address.grant is None else '{"grant":"%s"}' % address.grant.id
        params = new_event(ctx, "key.lookup", "success", target=target, version=version, detail=detail)
        # UUIDs go as text (the statement casts them): psycopg2 adapts UUID objects in Python.
        params.update(jti=ctx.claims.jti_text, client_id=ctx.claims.client_id_text, ref_hash=ref_hash,
                      audit=ctx.kms.settings.audit_key_lookups, keks=ctx.kms.keyring.held_versions,
                      **address.statement_parameters(ctx))
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
    _check_look_up(ctx, row, owner_id, ref_hash)
    if owner_moved(ctx, address, row):
        address = resolve(ctx, reference)
        owner_id, ref_hash = address.address
        target = ref_hash.hex()
        row = _look_up(ctx.conn, statement_parameters(), durable)
        if row is None:
            raise Unauthorized(TOKEN_NOT_LIVE)
        _check_look_up(ctx, row, owner_id, ref_hash)
    if row.outcome == "grant_changed":  # a grant this process had not verified yet: once more, naming it
        address = check_shared(ctx, address, row, "fetch")
        row = _look_up(ctx.conn, statement_parameters(), durable)
        if row is None:
            raise Unauthorized(TOKEN_NOT_LIVE)
        _check_look_up(ctx, row, owner_id, ref_hash)
    elif address.shared and row.outcome == "success":
        check_shared(ctx, address, row, "fetch")
    if row.key_id is None and not address.shared and _claimed_alone(ctx, owner_id, reference, ref_hash):
        row = _look_up(ctx.conn, statement_parameters(), durable)  # an imported key's first use
        if row is None:
            raise Unauthorized(TOKEN_NOT_LIVE)
        _check_look_up(ctx, row, owner_id, ref_hash)
    key_id, outcome = row.key_id, row.outcome
    if outcome != "success":
        refusal = None
        if outcome == "kek_unavailable":  # nothing was served, and the statement recorded nothing
            missing, which = ((row.cur_kek, row.key_current_version) if row.cur_kek not in ctx.kms.keyring.held_versions
                              else (row.req_kek, row.req_version))
            refusal = kek_not_held(ctx, key_id, which, missing)
            outcome = refusal.code
        if outcome == "grant_changed":  # changed again between the two statements: none to serve by
            outcome = "not_found"
        if ctx.kms.settings.audit_key_lookups:
            record_alone(ctx, "key.lookup", outcome, target=target, version=version)
        if refusal is not None:
            raise refusal
        if outcome == "gone":
            raise Gone("That version was retired and is no longer served.", code="version_retired")
        if outcome == "not_exportable":
            raise Conflict(NOT_EXPORTABLE, code="not_exportable")
        raise NotFound(NO_SUCH_KEY if key_id is None or address.shared else "The key has no such version.")

    encrypt_with = _rotate_if_due(ctx, key_id) if row.rotation_due else None
    if encrypt_with is None:
        current = row.key_current_version
        encrypt_with = _material(ctx, _unwrap(ctx, key_id, owner_id, ref_hash, current, row.cur_kek, row.cur_wrapped),
                                 current)
    if version is None or version == encrypt_with.version:
        return encrypt_with, encrypt_with
    decrypt_with = KeyMaterial(_unwrap(ctx, key_id, owner_id, ref_hash, row.req_version, row.req_kek, row.req_wrapped),
                               row.req_version, encrypt_with.expires_at)
    return decrypt_with, encrypt_with


def _check_look_up(ctx: Context, row, owner_id: uuid.UUID, ref_hash: bytes):
    """Believe nothing of a look-up's row before the MACs of its session, client and key rows
    check out. The statement matched the session and client on the token's ids (as text), a live
    session is not revoked, an active client's epoch is its session's: those columns come from
    what was matched, not from the row."""
    kms = ctx.kms
    jti, client_id = ctx.claims.jti_text, ctx.claims.client_id_text
    SESSIONS.check_values(kms, (jti, client_id, row.session_expires_at, row.session_epoch, False,
                                row.session_revision, row.session_row_mac), typed=typed_session)
    CLIENTS.check_values(kms, (client_id, row.client_name_hash, row.client_password_hash, row.client_role, "active",
                               row.session_epoch, row.client_revision, row.client_row_mac), refused_with=401,
                         typed=typed_client)
    if row.key_id is not None:
        KEYS.check_values(kms, (row.key_id, owner_id, ref_hash, row.key_current_version, row.key_retired_below, False,
                                row.key_rotation_period_ms, row.key_exportable, row.key_revision, row.key_row_mac))
        if row.superseded:  # a version after the key row's current one exists: the row was put back
            raise IntegrityFailure("keys", row.key_id)


def _rotate_if_due(ctx: Context, key_id: int) -> KeyMaterial | None:
    """Rotate a key whose rotation period has passed. If another request holds the key (it is
    rotating it), do not wait: return None and serve the version already read."""
    with db.transaction(ctx.conn) as cur:
        cur.execute(db.sql.lock_key_if_free, {"key_id": key_id})
        row = cur.fetchone()
        if row is None or not row.due:
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
        material = _add_version(cur, ctx, _lock_key(cur, ctx, owner_id, ref_hash, reference))
        record(cur, ctx, "key.rotate", target=ref_hash.hex(), version=material.version)
    return material


def delete_key(ctx: Context, reference: str):
    """Stop serving the key now; destroy it after KEY_DELETION_WAIT (0: now)."""
    owner_id, ref_hash = _address(ctx, reference)
    with db.transaction(ctx.conn) as cur:
        authenticate(cur, ctx)
        key = _write_key(cur, ctx, _lock_key(cur, ctx, owner_id, ref_hash, reference), deleted=True)
        record(cur, ctx, "key.delete", target=ref_hash.hex())
        if not ctx.kms.settings.key_deletion_wait_ms:
            _destroy(cur, ctx, key.id)
            record(cur, ctx, "key.destroy", target=ref_hash.hex())


def _destroy(cur, ctx: Context, key_id: int):
    cur.execute(db.sql.destroy_key, {"key_id": key_id})
    KEYS.destroyed(cur, ctx.kms, key_id, cur.fetchone().revision)


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
            key = _lock_key(cur, ctx, owner_id, ref_hash, reference, deleted=True)
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
        key = _lock_key(cur, ctx, owner_id, ref_hash, reference)
        if below_version > key.current_version:  # a fact of the key's state, not of the request's form: 409
            raise Conflict(f"belowVersion may be at most the current version ({key.current_version}); the in-use "
                           "version cannot be retired.", code="version_in_use")
        cur.execute(db.sql.retire_versions_below, {"key_id": key.id, "below": below_version})
        retired = [row.version for row in cur.fetchall()]
        if below_version > key.retired_below:
            _write_key(cur, ctx, key, retired_below=below_version)
        # The first event records the key row's change; a line moved past versions already erased
        # is recorded on its own.
        for version in retired or ([below_version - 1] if cur.row_changes else []):
            record(cur, ctx, "key.retire", target=ref_hash.hex(), version=version)
        return _metadata(cur, ctx, owner_id, ref_hash)[0]


def set_rotation_period(ctx: Context, reference: str, period_ms: int | None) -> dict:
    owner_id, ref_hash = _address(ctx, reference)
    with db.transaction(ctx.conn) as cur:
        authenticate(cur, ctx)
        _write_key(cur, ctx, _lock_key(cur, ctx, owner_id, ref_hash, reference), rotation_period_ms=period_ms)
        record(cur, ctx, "key.set_rotation_period", target=ref_hash.hex())
        return _metadata(cur, ctx, owner_id, ref_hash)[0]


def make_not_exportable(ctx: Context, reference: str) -> dict:
    """From now on the key's DEK is never returned, on any route; there is no way back."""
    owner_id, ref_hash = _address(ctx, reference)
    with db.transaction(ctx.conn) as cur:
        authenticate(cur, ctx)
        key = _lock_key(cur, ctx, owner_id, ref_hash, reference)
        if key.exportable:
            _write_key(cur, ctx, key, exportable=False)
            record(cur, ctx, "key.set_exportable", target=ref_hash.hex(), outcome="success")
        return _metadata(cur, ctx, owner_id, ref_hash)[0]


def _metadata(cur, ctx: Context, owner_id, ref_hash: bytes | None) -> list[dict]:
    cur.execute(db.sql.key_metadata, {"client_id": owner_id, "ref_hash": ref_hash})
    keys = []
    for key in cur.fetchall():
        reference = None  # a key imported from the original KMS that nobody has named since
        try:
            if key.ref_enc is not None:
                reference = ctx.kms.keyring.decrypt_field(bytes(key.ref_enc), b"key-reference", owner_id.bytes,
                                                          bytes(key.ref_hash))
        except crypto.IntegrityError:
            log.error("stored key reference failed authentication")
            raise StoredDataCorrupt() from None
        keys.append({"keyReference": reference, "currentVersion": key.current_version,
                     "state": "pending-deletion" if key.destroy_after else "enabled",
                     "rotationPeriod": key.rotation_period_ms, "exportable": key.exportable, "createdAt": key.created_at,
                     "rotatedAt": key.rotated_at, "destroyAt": key.destroy_after})
    return keys


def list_keys(ctx: Context) -> list[dict]:
    with db.transaction(ctx.conn) as cur:
        caller = authenticate(cur, ctx)
        return _metadata(cur, ctx, caller.id, None)


def list_client_keys(ctx: Context, owner_id: uuid.UUID) -> list[dict]:
    """One client's keys, for the command line (`kms keys list`), where host access is the
    authority: metadata only, never DEK material."""
    if ctx.origin != "cli":
        raise Forbidden()
    with db.transaction(ctx.conn) as cur:
        return _metadata(cur, ctx, owner_id, None)


def list_versions(ctx: Context, reference: str) -> list[dict]:
    owner_id, ref_hash = _address(ctx, reference)
    with db.transaction(ctx.conn) as cur:
        authenticate(cur, ctx)
        cur.execute(db.sql.key_versions, {"client_id": owner_id, "ref_hash": ref_hash})
        versions = cur.fetchall()
        if not versions and _claim_imported(cur, ctx, owner_id, reference, ref_hash):
            cur.execute(db.sql.key_versions, {"client_id": owner_id, "ref_hash": ref_hash})
            versions = cur.fetchall()
    if not versions:
        raise NotFound(NO_SUCH_KEY)
    return [{"version": v.version, "state": v.state, "createdAt": v.created_at} for v in versions]


# Jobs for cron: `flask --app app kms keys rotate-due`.

def rotate_due_keys(ctx: Context, progress=None) -> int:
    with db.transaction(ctx.conn) as cur:
        cur.execute(db.sql.keys_due_for_rotation)
        due = [key.id for key in cur.fetchall()]
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
            gone = cur.fetchall()
            for key in gone:
                KEYS.destroyed(cur, ctx.kms, key.id, key.revision)
                record(cur, ctx, "key.destroy", target=bytes(key.ref_hash).hex())
        destroyed += len(gone)
        if not gone:
            return destroyed


def gauges(kms, conn) -> list:
    """For /metrics: the cron's backlog and the DEK versions each KEK version wraps."""
    with db.transaction(conn) as cur:
        cur.execute(db.sql.bounded_statement_time)
        cur.execute(db.sql.keys_backlog)
        backlog = cur.fetchone()
        cur.execute(db.sql.kek_usage)
        usage = {row.kek_version: row.versions for row in cur.fetchall()}
    versions = GaugeMetricFamily("kms_kek_wrapped_dek_versions", "DEK versions wrapped by each KEK version "
                                 "(0 for a configured one that wraps none)", labels=["kek_version"])
    for version in sorted(set(usage) | set(kms.keyring.kek_versions)):
        versions.add_metric([str(version)], usage.get(version, 0))
    not_held = GaugeMetricFamily("kms_kek_not_configured_dek_versions", "DEK versions wrapped under a KEK version "
                                 "this process does not hold: their look-ups answer 503 kek_unavailable (500 "
                                 "integrity_error for a version no process ever held)", labels=["kek_version"])
    for version in sorted(set(usage) - set(kms.keyring.kek_versions)):
        not_held.add_metric([str(version)], usage[version])
    return [
        not_held,
        GaugeMetricFamily("kms_kek_wrap_version", "The KEK version new DEK versions are wrapped under: the active "
                          "one, or an older one while a live server lacks it", value=kms.keyring.kek_wrap),
        GaugeMetricFamily("kms_keys_rotation_due", "Keys past their rotation period (`kms keys rotate-due` rotates "
                          "them)", value=backlog.rotation_due),
        GaugeMetricFamily("kms_keys_destruction_due", "Deleted keys whose wait is over, not yet destroyed",
                          value=backlog.destruction_due),
        versions,
        GaugeMetricFamily("kms_kek_active_version", "The KEK version new DEKs are wrapped with",
                          value=kms.keyring.kek_active),
    ]


def kek_usage(ctx: Context) -> dict:
    with db.transaction(ctx.conn) as cur:
        cur.execute(db.sql.kek_usage)
        return {usage.kek_version: usage.versions for usage in cur.fetchall()}


class RewrapResult(NamedTuple):
    rewrapped: int
    failed: list  # (key id, version) of DEK versions that failed authentication: never material
    skipped: dict  # KEK version not configured here -> how many DEK versions under it were left as they are


class KekNotHeldByAll(Exception):
    """`kek rewrap` would move DEKs to a KEK version some live server does not hold."""

    def __init__(self, version: int, lacking: list):
        super().__init__(f"{len(lacking)} live server process(es) lack KEK version {version}")
        self.version = version
        self.lacking = lacking


def rewrap_keys(ctx: Context, batch: int = 500, progress=None) -> RewrapResult:
    """Re-wrap every DEK not under the active KEK, in batches, each batch one transaction; refused
    (KekNotHeldByAll, nothing moved) while a live server lacks the active KEK. A version whose
    wrapped DEK fails authentication is left as it is, logged, audited and reported; one under a
    KEK version not configured here is left as it is and counted; every other one is moved."""
    keyring = ctx.kms.keyring
    target = keyring.kek_active
    with db.transaction(ctx.conn) as cur:
        mine = held_check_values(keyring)
        behind = lacking(live_holders(cur), target, mine[target])
    if behind:
        raise KekNotHeldByAll(target, behind)
    keyring.kek_wrap = target  # what else this command seals (imported deployments' secrets) goes there too
    rewrapped, failed, skipped = 0, [], {}
    after = (0, 0)
    with db.transaction(ctx.conn) as cur:  # the secrets of deployments imported from the original KMS
        for source_id in rewrap_source_secrets(ctx.kms, cur):
            log.error("an imported deployment's stored secret failed authentication; not re-wrapped",
                      extra={"importSource": source_id})
    if progress is not None:
        with db.transaction(ctx.conn) as cur:
            cur.execute(db.sql.rewrap_backlog, {"active": target})
            progress.total = cur.fetchone().versions
    while True:
        with db.transaction(ctx.conn) as cur:
            cur.execute(db.sql.versions_to_rewrap, {"active": target, "limit": batch,
                                                   "after_key": after[0], "after_version": after[1]})
            versions = cur.fetchall()
            moved = 0
            for row in versions:
                key_id, version, owner_id, ref_hash = row.key_id, row.version, row.client_id, bytes(row.ref_hash)
                after = (key_id, version)
                try:
                    dek = keyring.unwrap_dek(bytes(row.wrapped_dek), owner_id, ref_hash, version, row.kek_version)
                except crypto.KekMissing:
                    skipped[row.kek_version] = skipped.get(row.kek_version, 0) + 1
                    continue
                except crypto.IntegrityError:
                    log.error("stored key material failed authentication; not re-wrapped",
                              extra={"keyId": key_id, "version": version})
                    record(cur, ctx, "kek.rewrap", outcome="integrity_error", target=ref_hash.hex(), version=version)
                    failed.append((key_id, version))
                    continue
                new_wrapped, new_kek = keyring.wrap_dek(dek, owner_id, ref_hash, version, kek_version=target)
                cur.execute(db.sql.rewrap_version, {"key_id": key_id, "version": version, "kek_version": new_kek,
                                                    "wrapped_dek": new_wrapped})
                moved += 1
            if moved:
                record(cur, ctx, "kek.rewrap", outcome="success", version=target)
        rewrapped += moved
        if progress is not None:
            progress.update(rewrapped + len(failed) + sum(skipped.values()))
        if len(versions) < batch:
            for kek_version, count in sorted(skipped.items()):
                log.warning("DEK versions under a KEK version not configured here were not re-wrapped",
                            extra={"kekVersion": kek_version, "versions": count})
            return RewrapResult(rewrapped, failed, skipped)


# What the server-side operations (kms/operations) use, as look-ups use it: how a key is found, the
# checks of a read of its row, unwrapping, rotation when due, the first use of an imported key.
key_address = _address
lock_key = _lock_key
check_key_read = _check_look_up
unwrap_version = _unwrap
rotate_if_due = _rotate_if_due
claimed_alone = _claimed_alone
