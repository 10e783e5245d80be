"""Grants: a key's owner lets another client use that key for named operations.

A grant names one grantee (never a wildcard), the operations it allows (`fetch`: the DEK routes,
exportable keys only; `encrypt`, `decrypt`, `reencrypt`, `generate-data-key`: the server-side
operations), optionally an expiry and a context subset. It never allows rotating, retiring,
deleting, restoring, setting anything or granting on. The grantee names the key `{owner}:{ref}`;
its use is checked in the statement that serves it (kms.keys.address), so a revocation, the key's
deletion or either client's disabling takes effect at once, in every process.

A grant never changes but by its end (revoked by the owner or an admin, expired, or its grantee or
owner deleted), and every row is under its MAC and revision (kms.rows.GRANTS): a grant invented,
widened, re-pointed or put back after its end is refused on use and reported.
"""
import json
import uuid
from datetime import datetime

from kms import crypto, db
from kms.access import authenticate, require_admin
from kms.audit.service import public_event, record
from kms.context import Context
from kms.audit.integrity import report_integrity_failure
from kms.errors import BadRequest, Conflict, IntegrityFailure, NotFound, StoredDataCorrupt
from kms.keys.address import NO_SUCH_KEY, OPERATIONS, caller_id, decode_context, hash_key_reference, own_address
from kms.keys.service import lock_key
from kms.operations.service import checked_context
from kms.auth.service import hash_clientname
from kms.rows import CLIENTS, GRANTS

NO_SUCH_GRANT = "No such grant on that key."
_REVISION_MAX = 2**31 - 1  # grants.revision is an integer
NO_SUCH_CLIENT = "No active client with that name."


def _canonical(context: dict | None) -> str | None:
    return json.dumps(context, separators=(",", ":"), sort_keys=True, ensure_ascii=False) if context else None


def _columns(row) -> dict:
    return {"id": row.id, "key_id": row.key_id, "grantee_id": row.grantee_id, "operations": " ".join(row.operations),
            "expires_at": row.expires_at, "context_subset": row.context_subset, "revoked": False,
            "revision": row.revision}


def _checked(ctx: Context, row) -> dict:
    """A grant row's MAC'd columns, believed once its MAC (and revision) checks out."""
    columns = _columns(row)
    GRANTS.check_values(ctx.kms, (*columns.values(), row.row_mac))
    return columns


def _name(ctx: Context, blob, client_id: uuid.UUID) -> str:
    try:
        return ctx.kms.keyring.decrypt_field(bytes(blob), b"client-name", client_id.bytes)
    except crypto.IntegrityError:
        raise StoredDataCorrupt() from None


def _reference(ctx: Context, row) -> str:
    try:
        return ctx.kms.keyring.decrypt_field(bytes(row.ref_enc), b"key-reference", row.owner_id.bytes,
                                             bytes(row.ref_hash))
    except crypto.IntegrityError:
        raise StoredDataCorrupt() from None


def _believed(ctx: Context, rows) -> list:
    """The rows of a listing whose MACs check out: one altered in the database is left out (it is
    no grant) and reported, and the listing still answers."""
    believed = []
    for row in rows:
        try:
            _checked(ctx, row)
        except IntegrityFailure as failure:
            report_integrity_failure(failure.table, failure.row_id, rolled_back=failure.rolled_back)
            continue
        believed.append(row)
    return believed


def _public(ctx: Context, row, **more) -> dict:
    return {"id": row.id, "grantee": _name(ctx, row.grantee_name_enc, row.grantee_id),
            "operations": list(row.operations), "expiresAt": row.expires_at,
            "contextSubset": decode_context(row.context_subset), "createdAt": row.created_at, **more}


def _detail(grant_id, **more) -> str:
    return json.dumps({"grant": str(grant_id), **more}, separators=(",", ":"), sort_keys=True)


def create_grant(ctx: Context, reference: str, grantee: str, operations: list[str],
                 expires_at: datetime | None = None, context_subset: dict | None = None) -> dict:
    """The owner grants `grantee` `operations` on its key `reference`. 404 for no such key or no
    such active client, 400 for granting itself, 409 for `fetch` on a key that is not exportable or
    when the grantee holds a live grant on the key already (revoke it first: a grant never changes;
    one past its expiry is ended here)."""
    operations = sorted(set(operations))
    if context_subset:  # a subset no context could hold would allow nothing, ever
        checked_context(context_subset, "contextSubset", ctx.kms.settings)
    if not operations or any(name not in OPERATIONS for name in operations):
        raise BadRequest("operations: one or more of " + ", ".join(OPERATIONS) + ".", code="validation_failed",
                         fields={"operations": ["Unknown operation."]})
    if "fetch" in operations and context_subset:
        raise BadRequest("contextSubset: a grant with fetch hands over the DEK, which works under any context, so "
                         "a subset would constrain nothing.", code="validation_failed",
                         fields={"contextSubset": ["Not with fetch: the DEK works under any context."]})
    address = own_address(ctx, reference)
    with db.transaction(ctx.conn) as cur:
        owner = authenticate(cur, ctx)
        key = lock_key(cur, ctx, address.owner_id, address.ref_hash, reference)
        if "fetch" in operations and not key.exportable:
            raise Conflict("This key is not exportable: `fetch` cannot be granted on it.", code="not_exportable")
        cur.execute(db.sql.client_for_login, {"name_hash": hash_clientname(ctx.kms, grantee)})
        found = cur.fetchone()
        if found is None or found.status != "active":
            raise NotFound(NO_SUCH_CLIENT, code="no_such_client")
        cur.execute(db.sql.lock_client, {"client_id": found.id})  # its deletion waits, then revokes this grant
        grantee_row = cur.fetchone()
        if grantee_row is None or grantee_row.status != "active":
            raise NotFound(NO_SUCH_CLIENT, code="no_such_client")
        CLIENTS.check(ctx.kms, grantee_row)
        if grantee_row.id == owner.id:
            raise BadRequest("A key's owner needs no grant on it.", code="validation_failed",
                             fields={"grantee": ["The key's owner."]})
        cur.execute(db.sql.lock_expired_grant, {"key_id": key.id, "grantee_id": grantee_row.id})
        expired = cur.fetchone()
        if expired is not None:  # it allowed nothing since its expiry: its end is recorded now, not by the cron job
            _end(cur, ctx, expired)
            record(cur, ctx, "grant.expire", target=address.ref_hash.hex(), detail=_detail(expired.id))
        grant = {"id": uuid.uuid4(), "key_id": key.id, "grantee_id": grantee_row.id,
                 "operations": " ".join(operations), "expires_at": expires_at,
                 "context_subset": _canonical(context_subset), "revoked": False, "revision": 1}
        cur.execute(db.sql.insert_grant, {**grant, "operations": operations,
                                          "row_mac": GRANTS.sign(cur, ctx.kms, **grant)})
        created = cur.fetchone()
        if created is None:
            raise Conflict("The grantee holds a live grant on this key: revoke it first.", code="grant_exists")
        record(cur, ctx, "grant.create", target=address.ref_hash.hex(),
               detail=_detail(grant["id"], grantee=str(grantee_row.id), operations=operations))
    return {"id": grant["id"], "grantee": grantee, "operations": operations, "expiresAt": expires_at,
            "contextSubset": context_subset or None, "createdAt": created.created_at}


def list_key_grants(ctx: Context, reference: str) -> list[dict]:
    address = own_address(ctx, reference)
    with db.transaction(ctx.conn) as cur:
        authenticate(cur, ctx)
        key = lock_key(cur, ctx, address.owner_id, address.ref_hash, reference)
        cur.execute(db.sql.key_grants, {"key_id": key.id})
        return [_public(ctx, row) for row in _believed(ctx, cur.fetchall())]


def list_grants_to_me(ctx: Context) -> list[dict]:
    """The live grants made to the caller, with each key's owner and reference: what it may name."""
    with db.transaction(ctx.conn) as cur:
        caller = authenticate(cur, ctx)
        cur.execute(db.sql.client_grants, {"to_client": caller.id, "by_client": None})
        return [_public(ctx, row, owner=_name(ctx, row.owner_name_enc, row.owner_id),
                        keyReference=_reference(ctx, row)) for row in _believed(ctx, cur.fetchall())]


def list_client_grants(ctx: Context, client_id: uuid.UUID) -> list[dict]:
    """Admin: the live grants made by or to a client (404 for a client unknown or deleted)."""
    with db.transaction(ctx.conn) as cur:
        if ctx.origin != "cli":
            require_admin(cur, ctx)
        cur.execute(db.sql.lock_client, {"client_id": client_id})
        if cur.fetchone() is None:
            raise NotFound("No client with that id.")
        cur.execute(db.sql.client_grants, {"to_client": client_id, "by_client": client_id})
        return [_public(ctx, row, owner=_name(ctx, row.owner_name_enc, row.owner_id), keyReference=_reference(ctx, row))
                for row in _believed(ctx, cur.fetchall())]


def revoke_grant(ctx: Context, reference: str, grant_id: uuid.UUID):
    """The key's owner, or an admin (naming the key `{owner}:{ref}`), ends a grant: from the next
    statement on, in every process, it allows nothing."""
    with db.transaction(ctx.conn) as cur:
        caller = authenticate(cur, ctx)
        cur.execute(db.sql.lock_grant, {"grant_id": grant_id})
        row = cur.fetchone()
        if row is None or not _names_key(cur, ctx, caller, reference, row):
            raise NotFound(NO_SUCH_GRANT)
        _end(cur, ctx, row)
        record(cur, ctx, "grant.revoke", target=bytes(row.ref_hash).hex(), detail=_detail(row.id))


def revoke_grant_by_id(ctx: Context, grant_id: uuid.UUID):
    """The command line's revocation (`kms grants revoke`), where host access is the authority."""
    if ctx.origin != "cli":
        raise NotFound(NO_SUCH_GRANT)
    with db.transaction(ctx.conn) as cur:
        cur.execute(db.sql.lock_grant, {"grant_id": grant_id})
        row = cur.fetchone()
        if row is None:
            raise NotFound(NO_SUCH_GRANT)
        _end(cur, ctx, row)
        record(cur, ctx, "grant.revoke", target=bytes(row.ref_hash).hex(), detail=_detail(row.id))


def _names_key(cur, ctx: Context, caller, reference: str, row) -> bool:
    """Whether `reference` names the grant's key for this caller: its own key (named alone or in
    full), or for an admin any client's as `{owner}:{ref}`."""
    if ":" not in reference:
        return row.owner_id == caller.id and own_address(ctx, reference).ref_hash == bytes(row.ref_hash)
    if not (caller.is_admin or row.owner_id == caller.id):
        return False
    owner_name, ref = reference.split(":", 1)
    cur.execute(db.sql.client_for_login, {"name_hash": hash_clientname(ctx.kms, owner_name)})
    owner = cur.fetchone()
    return owner is not None and owner.id == row.owner_id \
        and hash_key_reference(ctx.kms, row.owner_id, ref) == bytes(row.ref_hash)


def _end(cur, ctx: Context, row):
    """Revoke a locked grant row at its next revision (the caller's audit event records the
    change). A row altered in the database (or put back) allowed nothing: it is reported, and
    ended all the same, so that nobody's revocation, deletion or cron job waits on its MAC. Its
    end is signed past the revision stored, so that no copy of the grant, neither the one altered
    nor the one from before the alteration, can be put back live."""
    grant = _columns(row)
    try:
        GRANTS.check_values(ctx.kms, (*grant.values(), row.row_mac))
    except IntegrityFailure as failure:  # ending it takes nothing away, whatever it says
        report_integrity_failure(failure.table, failure.row_id, rolled_back=failure.rolled_back)
    known = ctx.kms.revisions.newest("grants", row.id) or 1
    grant.update(revoked=True, revision=min(max(grant["revision"], known), _REVISION_MAX - 1) + 1)
    cur.execute(db.sql.revoke_grant, {"id": row.id, "revision": grant["revision"],
                                      "row_mac": GRANTS.sign(cur, ctx.kms, **grant)})


def end_client_grants(cur, ctx: Context, client_id: uuid.UUID) -> int:
    """In the caller's transaction (a client's deletion): every live grant to the client or on its
    keys ends, each recorded as a revocation (its owner reads it in the grant's uses)."""
    cur.execute(db.sql.lock_client_grants, {"client_id": client_id})
    rows = cur.fetchall()
    for row in rows:
        _end(cur, ctx, row)
        record(cur, ctx, "grant.revoke", target=bytes(row.ref_hash).hex(), detail=_detail(row.id))
    return len(rows)


def expire_grants(ctx: Context) -> int:
    """Cron job: record the end of every grant past its expiry (it allowed nothing since; this
    writes its end in the audit trail and frees the grantee for a new grant)."""
    ended = 0
    while True:
        with db.transaction(ctx.conn) as cur:
            cur.execute(db.sql.lock_expired_grants)
            rows = cur.fetchall()
            for row in rows:
                _end(cur, ctx, row)
                record(cur, ctx, "grant.expire", target=bytes(row.ref_hash).hex(), detail=_detail(row.id))
        ended += len(rows)
        if len(rows) < 1000:
            return ended


def grant_uses(ctx: Context, reference: str, grant_id: uuid.UUID, after: int, limit: int) -> list[dict]:
    """The owner reads what a grant on its key was used for: the audit events naming it (its
    creation, each look-up or operation through it, its end)."""
    address = own_address(ctx, reference)
    with db.transaction(ctx.conn) as cur:
        authenticate(cur, ctx)
        key = lock_key(cur, ctx, address.owner_id, address.ref_hash, reference)
        cur.execute(db.sql.grant_on_key, {"grant_id": grant_id, "key_id": key.id})
        if cur.fetchone() is None:
            raise NotFound(NO_SUCH_GRANT)
        cur.execute(db.sql.grant_uses, {"grant_id": str(grant_id), "after": after, "limit": limit})
        return [public_event(row) for row in cur.fetchall()]
