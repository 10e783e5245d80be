"""Signup tokens, signup, login, logout and the per-request token check."""
import logging
import os
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import psycopg2
from psycopg2.errors import LockNotAvailable

from kms import crypto, db
from kms.audit.service import record, record_alone, record_refusal
from kms.access import authenticate, require_admin
from kms.auth.legacy import looks_legacy, read_legacy_signup_token
from kms.auth.recent import Verified
from kms.context import Context
from kms.errors import Conflict, IntegrityFailure, Throttled, Unauthorized
from kms.rows import CLIENTS, SESSIONS, SIGNUP_TOKENS

log = logging.getLogger("kms.auth")

LOGIN_FAILED = "Invalid client name or password."
SIGNUP_TOKEN_REFUSED = "The signup token is invalid, expired or already used; ask an admin for a new one."
SIGNUP_TOKEN_PREFIX = "kms_st_"


@dataclass(frozen=True)
class Grant:
    """A session just opened; the web layer turns it into a signed JWT."""
    client_id: uuid.UUID
    role: str
    jti: uuid.UUID
    expires_at: datetime
    ttl_ms: int


def hash_clientname(kms, clientname: str) -> bytes:
    return crypto.keyed_hash(kms.settings.username_secret, b"kms-clientname-v1", clientname.lower().encode())


def hash_signup_token(kms, token: str) -> bytes:
    return crypto.keyed_hash(kms.settings.signup_secret, b"kms-signup-token-v1", token.encode())


def issue_signup_token(ctx: Context, clientname: str, ttl_ms: int, role: str | None = None) -> tuple[str, datetime]:
    """Issue a one-time signup token bound to `clientname`. From the API the caller must be an
    admin; from the CLI, host access is the authority."""
    kms = ctx.kms
    token = SIGNUP_TOKEN_PREFIX + crypto.b64url(os.urandom(32))
    token_id = uuid.uuid4()
    expires_at = datetime.now(timezone.utc) + timedelta(milliseconds=ttl_ms)
    with db.transaction(ctx.conn) as cur:
        if ctx.origin != "cli":
            require_admin(cur, ctx)
        name_hash = hash_clientname(kms, clientname)
        cur.execute(db.sql.client_exists, {"name_hash": name_hash})
        if cur.fetchone():
            raise Conflict("A client with that name already exists.", code="client_exists")
        token_hash, role = hash_signup_token(kms, token), role or kms.settings.default_role
        cur.execute(db.sql.insert_signup_token, {
            "id": token_id, "token_hash": token_hash, "name_hash": name_hash,
            "name_enc": kms.keyring.encrypt_field(clientname, b"signup-name", token_id.bytes),
            "role": role, "expires_at": expires_at, "issued_by": ctx.actor,
            "row_mac": SIGNUP_TOKENS.mac(kms, id=token_id, token_hash=token_hash, name_hash=name_hash, role=role,
                                         expires_at=expires_at, used=False, revision=1),
        })
        record(cur, ctx, "signup_token.issue", target=str(token_id))
    return token, expires_at


def _open_session(cur, kms, client_id: uuid.UUID, role: str, epoch: int, *, defer: bool = False) -> Grant:
    ttl_ms = kms.settings.jwt_ttl_ms
    grant = Grant(client_id=client_id, role=role, jti=uuid.uuid4(), ttl_ms=ttl_ms,
                  expires_at=datetime.now(timezone.utc) + timedelta(milliseconds=ttl_ms))
    (cur.defer if defer else cur.execute)(db.sql.insert_session, {
        "jti": grant.jti, "client_id": client_id, "expires_at": grant.expires_at, "epoch": epoch, "revision": 1,
        "row_mac": SESSIONS.mac(kms, jti=grant.jti, client_id=client_id, expires_at=grant.expires_at, epoch=epoch,
                                revoked=False, revision=1)})
    return grant


def signup(ctx: Context, token: str, password: str) -> Grant:
    """Register the client a signup token was issued for. The token is consumed atomically: of
    many parallel signups with one token exactly one succeeds. A refused signup leaves it unused.
    Tokens minted offline by the original KMS's admin tool work too, once (kms.auth.legacy)."""
    kms = ctx.kms
    if kms.settings.legacy_signup_tokens and looks_legacy(token):
        return _signup_legacy(ctx, token, password)
    token_hash = hash_signup_token(kms, token)
    with ctx.conn.cursor() as cur:  # cheap check first, one statement: a bad token costs no hashing
        cur.execute(db.sql.find_usable_signup_token, {"token_hash": token_hash})
        usable = cur.fetchone() is not None
    if not usable:
        _refuse_signup(ctx)
    with kms.passwords.admission(ctx.source_ip or "unknown"):
        password_hash = kms.passwords.hash(password)
    client_id = uuid.uuid4()
    with db.transaction(ctx.conn) as cur:
        cur.execute(db.sql.lock_usable_signup_token, {"token_hash": token_hash})
        row = cur.fetchone()
        if row is None:
            raise Unauthorized(SIGNUP_TOKEN_REFUSED, code="invalid_signup_token")
        # A token row made, re-roled, re-named, extended or un-used in the database is refused.
        SIGNUP_TOKENS.check(kms, row)
        name_hash = bytes(row.name_hash)
        cur.execute(db.sql.use_signup_token, {"id": row.id, "revision": row.revision + 1, "row_mac": SIGNUP_TOKENS.sign(
            cur, kms, id=row.id, token_hash=bytes(row.token_hash), name_hash=name_hash, role=row.role,
            expires_at=row.expires_at, used=True, revision=row.revision + 1)})
        clientname = kms.keyring.decrypt_field(bytes(row.name_enc), b"signup-name", row.id.bytes)
        record(cur, ctx, "signup_token.use", target=str(row.id))
        return _register(cur, ctx, client_id, name_hash, clientname, password_hash, row.role)


def _refuse_signup(ctx: Context):
    record_refusal(ctx, "signup", "denied")
    raise Unauthorized(SIGNUP_TOKEN_REFUSED, code="invalid_signup_token")


def _signup_legacy(ctx: Context, token: str, password: str) -> Grant:
    kms = ctx.kms
    legacy = read_legacy_signup_token(kms.settings.signup_secret, token, time.time_ns() // 1_000_000)
    if legacy is not None:
        token_hash = crypto.keyed_hash(kms.settings.signup_secret, b"kms-legacy-signup-token-v1",
                                       legacy.canonical.encode())
        with ctx.conn.cursor() as cur:
            cur.execute(db.sql.legacy_signup_token_used, {"token_hash": token_hash})
            if cur.fetchone() is not None:
                legacy = None  # a replay
    if legacy is None:
        _refuse_signup(ctx)
    with kms.passwords.admission(ctx.source_ip or "unknown"):
        password_hash = kms.passwords.hash(password)
    client_id = uuid.uuid4()
    with db.transaction(ctx.conn) as cur:
        cur.execute(db.sql.use_legacy_signup_token, {"token_hash": token_hash, "expires_at": legacy.expires_at})
        if cur.fetchone() is None:
            raise Unauthorized(SIGNUP_TOKEN_REFUSED, code="invalid_signup_token")
        record(cur, ctx, "signup_token.use_legacy", target=token_hash[:8].hex())
        return _register(cur, ctx, client_id, hash_clientname(kms, legacy.clientname), legacy.clientname,
                         password_hash, kms.settings.default_role)


def _register(cur, ctx: Context, client_id: uuid.UUID, name_hash: bytes, clientname: str, password_hash: str,
              role: str) -> Grant:
    """Create the client of a signup in the caller's transaction, and open its first session."""
    kms = ctx.kms
    if not _insert_client(cur, kms, client_id, name_hash, clientname, password_hash, role):
        raise Conflict("A client with that name already exists.", code="client_exists")
    record(cur, ctx, "client.signup", target=str(client_id), actor=str(client_id))
    return _open_session(cur, kms, client_id, role, 0)


def _insert_client(cur, kms, client_id: uuid.UUID, name_hash: bytes, clientname: str, password_hash: str,
                   role: str) -> bool:
    """False when the name is taken."""
    cur.execute(db.sql.insert_client, {
        "id": client_id, "name_hash": name_hash,
        "name_enc": kms.keyring.encrypt_field(clientname, b"client-name", client_id.bytes),
        "password_hash": password_hash, "role": role,
        "row_mac": CLIENTS.mac(kms, id=client_id, name_hash=name_hash, password_hash=password_hash, role=role,
                               status="active", session_epoch=0, revision=1),
    })
    return cur.fetchone() is not None


def _reserve_address_attempt(ctx: Context, address: str) -> tuple[int | None, int | None]:
    """Count this attempt against its address before its password is checked: (seconds until the
    throttle lifts, None) when the limit is reached, else (None, the reservation's id). The lock
    and the count travel in one round trip, the count on a snapshot taken once the lock is held."""
    settings = ctx.kms.settings
    with db.transaction(ctx.conn) as cur:
        cur.defer(db.sql.lock_login_address, {"address": address})
        cur.execute(db.sql.login_failures_in_window, {
            "scope": "address", "subject": address,
            "window": timedelta(milliseconds=settings.login_failure_window_ms)})
        window = cur.fetchone()
        if window.failures >= settings.login_max_failures_per_address:
            record_refusal(ctx, "login", "throttled")
            return window.seconds_left, None
        cur.execute(db.sql.insert_login_failure, {"scope": "address", "subject": address})
        return None, cur.fetchone().id


def login(ctx: Context, clientname: str, password: str) -> Grant:
    """Unknown client, wrong password and disabled client get the same answer in about the same
    time: an unknown client's password is checked against a dummy hash.

    No more passwords are checked than the limits allow, however many guesses arrive at once: an
    attempt counts against its address before the check (a success takes it back), and attempts
    on one client name take turns under a lock, each seeing the failures before it.

    A login that repeats the credential this process last verified for the name within
    LOGIN_REPEAT_WINDOW needs no hashing (kms.auth.recent), so it takes no place in the hasher's
    line either; and logins of one name take turns for the full check, so a burst of one client's
    logins hashes once."""
    kms = ctx.kms
    name_hash = hash_clientname(kms, clientname)
    recent = kms.recent_logins.remembered(name_hash, password)
    if recent is not None:
        return _login(ctx, name_hash, password, recent)
    with kms.recent_logins.turn(name_hash, kms.passwords.wait_s):
        recent = kms.recent_logins.remembered(name_hash, password)  # the login before this one's turn
        if recent is not None:
            return _login(ctx, name_hash, password, recent)
        with kms.passwords.admission(ctx.source_ip or "unknown", name_hash.hex()):
            return _login(ctx, name_hash, password, None)


def _login(ctx: Context, name_hash: bytes, password: str, recent: Verified | None) -> Grant:
    """Five round trips: the address's count (lock and count; the reservation; commit), then the
    name's (lock, count and client row; the password checked; every write and the commit in one)."""
    kms = ctx.kms
    subject, address = name_hash.hex(), ctx.source_ip or "unknown"
    retry_after, reservation = _reserve_address_attempt(ctx, address)
    if retry_after is not None:
        raise Throttled(retry_after, "Too many failed logins; wait before trying again.")
    failed, denied = True, None  # denied: the target of a password checked and refused
    try:
        with db.transaction(ctx.conn) as cur:
            cur.defer(db.sql.lock_login_client, {"client": subject})
            try:
                cur.execute(db.sql.login_check, {
                    "client": subject, "name_hash": name_hash,
                    "window": timedelta(milliseconds=kms.settings.login_failure_window_ms)})
            except LockNotAvailable:
                raise Throttled(1, "Too many logins for this client at once; retry in a second.") from None
            row = cur.fetchone()
            retry_after, client_id = row.seconds_left, row.client_id
            if row.failures >= kms.settings.login_max_failures_per_client:
                cur.defer(db.sql.release_login_attempt, {"id": reservation})  # not a password check
                record_refusal(ctx, "login", "throttled")
            else:
                retry_after = None
                if client_id is not None:
                    try:
                        CLIENTS.check(kms, row, prefix="client_", refused_with=401)
                    except IntegrityFailure:
                        # A password hash, role or status written in the database: never obeyed,
                        # and answered like any failed login (after the same hashing work).
                        kms.passwords.verify_login(password, None, imported_remain=row.imported_passwords_remain)
                        raise
                matched, replacement = _password_matches(kms, password, row, recent)
                if matched and row.client_status == "active":
                    if replacement is not None:  # a client imported from the original KMS, logging in first
                        _replace_imported_password(cur, kms, row, replacement)
                    kms.recent_logins.remember(name_hash, password, replacement or row.client_password_hash,
                                               row.client_session_epoch)
                    cur.defer(db.sql.release_login_attempt, {"id": reservation})
                    cur.defer(db.sql.clear_client_login_failures, {"client": subject})
                    cur.defer(db.sql.record_login, {"client_id": client_id})
                    grant = _open_session(cur, kms, client_id, row.client_role, row.client_session_epoch, defer=True)
                    record(cur, ctx, "login", target=str(client_id), actor=str(client_id), defer=True)
                    failed = False
                else:  # the address's reservation stays, as the failure, and the name's is added
                    denied = str(client_id) if client_id else ""
                    cur.defer(db.sql.insert_login_failure, {"scope": "client", "subject": subject})
                    record(cur, ctx, "login", "denied", target=denied or None, defer=True)
        reservation = None
    except Exception:
        if denied is not None:  # the password was checked: the failure counts though its COMMIT failed
            reservation = None  # the address's reservation stays, as the failure
            _count_login_failure_alone(ctx, subject, denied or None)
        raise
    finally:
        if reservation is not None:  # the check never happened (no hashing slot, a lock wait)
            with db.transaction(ctx.conn) as cur:
                cur.execute(db.sql.release_login_attempt, {"id": reservation})
    if retry_after is not None:
        raise Throttled(retry_after, "Too many failed logins; wait before trying again.")
    if failed:
        raise Unauthorized(LOGIN_FAILED, code="invalid_credentials")
    return grant


def _count_login_failure_alone(ctx: Context, subject: str, target: str | None):
    """A refused password whose transaction failed (its deferred writes run at COMMIT): the name's
    failure in a transaction of its own, then its audit event in another, so the count does not
    depend on the event, which may be what failed."""
    try:
        with db.transaction(ctx.conn) as cur:
            cur.execute(db.sql.insert_login_failure, {"scope": "client", "subject": subject})
    except psycopg2.Error as error:
        log.error("a failed login was not counted", extra={"error_code": type(error).__name__})
        return
    try:
        record_alone(ctx, "login", "denied", target=target)
    except psycopg2.Error as error:
        log.error("a failed login's audit event was not written", extra={"error_code": type(error).__name__})


def _password_matches(kms, password: str, row, recent: Verified | None) -> tuple[bool, str | None]:
    """(whether the password is the client's, its Argon2id replacement for an imported bcrypt
    hash): the full check, unless this credential was verified moments ago against this very row
    state (kms.auth.recent)."""
    if (recent is not None and row.client_id is not None and row.client_status == "active"
            and recent.password_hash == row.client_password_hash and recent.epoch == row.client_session_epoch):
        return True, None
    return kms.passwords.verify_login(password, row.client_password_hash, imported_remain=row.imported_passwords_remain)


def _replace_imported_password(cur, kms, row, password_hash: str):
    """In the login's transaction (its last round trip): the bcrypt hash gives way to Argon2id."""
    revision = row.client_revision + 1
    cur.defer(db.sql.replace_imported_password, {
        "id": row.client_id, "password_hash": password_hash, "imported_hash": row.client_password_hash,
        "old_row_mac": bytes(row.client_row_mac), "revision": revision,
        "row_mac": CLIENTS.sign(cur, kms, id=row.client_id, name_hash=bytes(row.client_name_hash),
                                password_hash=password_hash, role=row.client_role, status=row.client_status,
                                session_epoch=row.client_session_epoch, revision=revision)})


def insert_imported_client(cur, kms, client_id: uuid.UUID, clientname: str, password_hash: str, role: str) -> bool:
    """A client of the original KMS (kms.importing), with its bcrypt hash, in the caller's
    transaction; False when the name is taken."""
    return _insert_client(cur, kms, client_id, hash_clientname(kms, clientname), clientname, password_hash, role)


def unlock_client(ctx: Context, clientname: str | None = None, client_id: uuid.UUID | None = None) -> bool:
    """Lift the per-name login lock of a client (its failures are forgotten), by name (CLI) or id
    (admin API). False when no such client exists."""
    with db.transaction(ctx.conn) as cur:
        if ctx.origin != "cli":
            require_admin(cur, ctx)
        if client_id is not None:
            cur.execute(db.sql.client_name_hash, {"client_id": client_id})
            row = cur.fetchone()
            name_hash = bytes(row.name_hash) if row else None
        else:
            name_hash = hash_clientname(ctx.kms, clientname)
            cur.execute(db.sql.client_for_login, {"name_hash": name_hash})
            row = cur.fetchone()
            client_id = row.id if row else None
        if name_hash is None or client_id is None:
            return False
        cur.execute(db.sql.clear_client_login_failures, {"client": name_hash.hex()})
        record(cur, ctx, "client.unlock", target=str(client_id))
    return True


def logout(ctx: Context):
    with db.transaction(ctx.conn) as cur:
        caller = authenticate(cur, ctx)
        jti, client_id, expires_at, epoch, revision = caller.session
        cur.execute(db.sql.revoke_session, {
            "jti": jti, "revision": revision + 1,
            "row_mac": SESSIONS.sign(cur, ctx.kms, jti=jti, client_id=client_id, expires_at=expires_at, epoch=epoch,
                                     revoked=True, revision=revision + 1)})
        record(cur, ctx, "logout", target=str(ctx.claims.client_id))


def create_client(ctx: Context, clientname: str, password: str, role: str) -> uuid.UUID:
    """Create a client directly (CLI and first-admin bootstrap); None if the name is taken."""
    kms = ctx.kms
    password_hash = kms.passwords.hash(password)
    client_id = uuid.uuid4()
    with db.transaction(ctx.conn) as cur:
        if not _insert_client(cur, kms, client_id, hash_clientname(kms, clientname), clientname, password_hash, role):
            return None
        record(cur, ctx, "client.create", target=str(client_id))
    return client_id


def ensure_master_admin(kms):
    """Create the first admin from MASTER_ADMIN_* when no active admin exists. Restarts find the
    admin in place and do nothing."""
    settings = kms.settings
    with kms.pool.connection() as conn:
        with db.transaction(conn) as cur:
            cur.execute(db.sql.active_admin_exists)
            if cur.fetchone().found:
                return
        if not settings.master_admin_username:
            log.warning("no active admin exists, so nobody can issue signup tokens over HTTP: create one with "
                        "`kms create-admin --name NAME`, or set MASTER_ADMIN_USERNAME and MASTER_ADMIN_PASSWORD "
                        "for the next start (and remove the password from the environment afterwards)")
            return
        ctx = Context(kms=kms, conn=conn, origin="cli")
        created = create_client(ctx, settings.master_admin_username, settings.master_admin_password, "admin")
        if created is None:
            log.warning("MASTER_ADMIN_USERNAME names an existing client that is not an active admin; not changed")
        else:
            log.info("created the first admin from MASTER_ADMIN_USERNAME", extra={"clientId": str(created)})
