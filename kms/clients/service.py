"""Client management (admin): list, change role, disable, enable, delete.

From the API the caller must be an admin; from the command line (`kms clients ...`), host access
is the authority and the audit records the actor `cli`. Every change that reduces a client's rights revokes its sessions in the same transaction, so its
tokens stop working at once. The last active admin cannot be demoted, disabled or deleted.
"""
import uuid
from datetime import timedelta

from kms import crypto, db
from kms.audit.service import record
from kms.access import require_admin
from kms.auth.service import hash_clientname
from kms.context import Context
from kms.grants.service import end_client_grants
from kms.keys.service import schedule_owner_keys_deletion
from kms.errors import Conflict, NotFound, StoredDataCorrupt
from kms.rows import CLIENTS

NO_SUCH_CLIENT = "No client with that id."
LAST_ADMIN = "This is the last active admin; promote another client first."


def _require_admin(cur, ctx: Context):
    if ctx.origin != "cli":  # the command line: host access is the authority
        require_admin(cur, ctx)


def find_client(ctx: Context, name_or_id: str) -> uuid.UUID | None:
    """The command line's way to name a client: its id as `kms clients list` shows it, or its
    name. None when neither names a client that is not deleted."""
    with db.transaction(ctx.conn) as cur:
        _require_admin(cur, ctx)
        try:
            client_id = uuid.UUID(name_or_id)
        except ValueError:
            cur.execute(db.sql.client_for_login, {"name_hash": hash_clientname(ctx.kms, name_or_id)})
            row = cur.fetchone()
            return row.id if row and row.status != "deleted" else None
        cur.execute(db.sql.lock_client, {"client_id": client_id})
        return client_id if cur.fetchone() else None


def list_clients(ctx: Context) -> list[dict]:
    with db.transaction(ctx.conn) as cur:
        _require_admin(cur, ctx)
        cur.execute(db.sql.list_clients)
        found = cur.fetchall()
    clients = []
    for client in found:
        try:
            name = ctx.kms.keyring.decrypt_field(bytes(client.name_enc), b"client-name", client.id.bytes)
        except crypto.IntegrityError:
            raise StoredDataCorrupt() from None
        clients.append({"id": client.id, "clientname": name, "role": client.role, "status": client.status,
                        "createdAt": client.created_at, "lastLoginAt": client.last_login_at})
    return clients


def _lock_target(cur, ctx: Context, client_id: uuid.UUID) -> tuple[dict, bool]:
    """Lock the active admins (always in the same order, so concurrent changes queue rather than
    deadlock), then the target, whose MAC must check out. Returns its MAC'd columns and whether it
    is the last active admin."""
    _require_admin(cur, ctx)
    cur.execute(db.sql.lock_active_admins)
    admins = [admin.id for admin in cur.fetchall()]
    cur.execute(db.sql.lock_client, {"client_id": client_id})
    row = cur.fetchone()
    if row is None:
        raise NotFound(NO_SUCH_CLIENT)
    CLIENTS.check(ctx.kms, row)
    target = {"id": client_id, "name_hash": None if row.name_hash is None else bytes(row.name_hash),
              "password_hash": row.password_hash, "role": row.role, "status": row.status,
              "session_epoch": row.session_epoch, "revision": row.revision}
    return target, admins == [client_id]


def _update(cur, ctx: Context, target: dict, *, revoke_sessions: bool, **changes):
    """Write the client's new state with its MAC; a new session epoch ends every session it has."""
    client = {**target, **changes, "revision": target["revision"] + 1}
    if revoke_sessions:
        client["session_epoch"] = target["session_epoch"] + 1
    cur.execute(db.sql.update_client, {**client, "row_mac": CLIENTS.sign(cur, ctx.kms, **client)})


def set_role(ctx: Context, client_id: uuid.UUID, role: str):
    with db.transaction(ctx.conn) as cur:
        target, last_admin = _lock_target(cur, ctx, client_id)
        if target["role"] == role:
            return
        if last_admin:
            raise Conflict(LAST_ADMIN, code="last_admin")
        _update(cur, ctx, target, role=role, revoke_sessions=True)
        record(cur, ctx, "client.role_change", target=str(client_id))


def set_enabled(ctx: Context, client_id: uuid.UUID, enabled: bool):
    status = "active" if enabled else "disabled"
    with db.transaction(ctx.conn) as cur:
        target, last_admin = _lock_target(cur, ctx, client_id)
        if target["status"] == status:
            return
        if not enabled and last_admin:
            raise Conflict(LAST_ADMIN, code="last_admin")
        _update(cur, ctx, target, status=status, revoke_sessions=not enabled)
        record(cur, ctx, "client.enable" if enabled else "client.disable", target=str(client_id))


def delete_client(ctx: Context, client_id: uuid.UUID):
    """Revoke its tokens, free its name, schedule its keys for deletion, end every grant made to
    it or on its keys."""
    with db.transaction(ctx.conn) as cur:
        target, last_admin = _lock_target(cur, ctx, client_id)
        if last_admin:
            raise Conflict(LAST_ADMIN, code="last_admin")
        _update(cur, ctx, target, status="deleted", name_hash=None, revoke_sessions=True)
        schedule_owner_keys_deletion(cur, ctx, client_id)  # its keys locked first: a grant made meanwhile is seen below
        record(cur, ctx, "client.delete", target=str(client_id))
        end_client_grants(cur, ctx, client_id)  # each end an event of its own


def purge_stale_records(ctx: Context) -> int:
    """Housekeeping for the cron job: expired sessions, old login failures and signup tokens,
    deleted clients whose keys are gone. Returns how many expired sessions were cleared."""
    window = timedelta(milliseconds=ctx.kms.settings.login_failure_window_ms)
    with db.transaction(ctx.conn) as cur:
        cur.execute(db.sql.purge_expired_sessions)
        sessions = cur.rowcount
        cur.execute(db.sql.purge_old_login_failures, {"window": window})
        cur.execute(db.sql.purge_old_signup_tokens)
        cur.execute(db.sql.purge_expired_legacy_signup_tokens)
        cur.execute(db.sql.purge_deleted_clients)
    return sessions
