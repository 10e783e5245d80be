"""What a running KMS holds: settings, keys, the connection pool, metrics, the hashing limiter."""
import logging
import threading
from dataclasses import dataclass

import psycopg2

from kms import crypto, db
from kms.audit.chainstate import ChainTampered, read_state
from kms.audit.refusals import RefusalCounts
from kms.auth.passwords import PasswordHasher
from kms.auth.recent import RecentLogins
from kms.auth.service import ensure_master_admin
from kms.auth.tokens import VerifiedTokenCache
from kms.config import ConfigError, Settings, kek_variable
from kms.errors import ServiceUnavailable
from kms.keyproviders.base import key_check_value
from kms.keyproviders.opening import open_keks
from kms.keys.address import GrantorMemory
from kms.keys.imported import source_kek_versions
from kms.keys.kek_holders import held_check_values, refresh
from kms.observability.metrics import Metrics
from kms.observability.probes import ProbeAnswers
from kms.operations.keycache import OperationKeys
from kms.rows import Revisions, backfill_row_macs, remac_key_rows

log = logging.getLogger("kms")


class StartupError(ConfigError):
    """The settings are well-formed but do not fit the stored data."""


@dataclass
class Kms:
    settings: Settings
    keyring: crypto.Keyring
    pool: db.ConnectionPool
    metrics: Metrics
    passwords: PasswordHasher
    audit_key: bytes
    verified_tokens: VerifiedTokenCache
    refusals: RefusalCounts
    probes: ProbeAnswers
    recent_logins: RecentLogins
    revisions: Revisions
    operation_keys: OperationKeys
    grantors: GrantorMemory
    # AUDIT_FAIL_CLOSED_AFTER: set while the oldest unsealed audit event is older than that
    # (kms.audit.freshness.ChangeFollower); audited work is then refused.
    audit_behind: bool = False

    @classmethod
    def open(cls, settings: Settings, *, pool_size: int | None = None, hash_gate=None) -> "Kms":
        """Keys, pool and metrics, without touching the database (see prepare() and check())."""
        kms = cls(
            settings=settings,
            keyring=crypto.Keyring(open_keks(settings), settings.kek_active, settings.db_secret,
                                   dek_cache=crypto.DekCache(settings.hsm_dek_cache_ms / 1000, settings.hsm_dek_cache_size)
                                   if settings.hsm_dek_cache_ms else None),
            pool=db.ConnectionPool(settings.database_url, size=pool_size or settings.server_threads),
            metrics=Metrics(),
            passwords=PasswordHasher(admitted=max(2, settings.server_threads // 4), gate=hash_gate),
            # Its own key, derived from DB_SECRET: someone with database access alone cannot
            # recompute the audit chain.
            audit_key=crypto.keyed_hash(settings.db_secret, b"kms-audit-chain-v1"),
            verified_tokens=VerifiedTokenCache(),
            refusals=RefusalCounts(),
            probes=ProbeAnswers(settings.probe_cache_ms / 1000),
            recent_logins=RecentLogins(settings.login_repeat_window_ms / 1000),
            revisions=Revisions(),
            operation_keys=OperationKeys(settings.operation_key_cache_ms / 1000),
            grantors=GrantorMemory(),
        )
        kms.revisions.confirm = OlderCopyCheck(settings.database_url)
        return kms

    @classmethod
    def start(cls, settings: Settings, **kwargs) -> "Kms":
        """Open, prepare the database and fill the pool: what a server does before serving."""
        kms = cls.open(settings, **kwargs)
        try:
            kms.prepare()
            kms.pool.warm()
        except BaseException:
            kms.close()
            raise
        return kms

    def migrate(self) -> list[str]:
        """Apply pending migrations (computing row MACs where one needs them); returns their names."""
        def check_secrets(cur):  # migration 004: the MACs come with 007, over the columns as they are then
            _check_secrets(cur, self)

        def row_macs(cur):  # migration 007: MACs of the stored rows, with secrets checked first
            _check_secrets(cur, self)
            backfill_row_macs(cur, self)

        def key_row_macs(cur):  # migration 009: the key rows' MACs cover `exportable` too
            _check_secrets(cur, self)
            remac_key_rows(cur, self)

        return db.migrate(self.settings.database_url, steps={"row_macs_from_007": check_secrets, "row_macs": row_macs,
                                                             "key_row_macs": key_row_macs})

    def prepare(self) -> list[str]:
        """Once per server start, before serving: migrate, check the secrets against the stored
        data, create the first admin (or warn that there is none)."""
        applied = self.migrate()
        with self.pool.connection() as conn, db.transaction(conn) as cur:
            _check_secrets(cur, self, report=True)
            try:
                read_state(cur, self)  # signs the chain's state of a database migrated without secrets
            except ChainTampered:
                pass  # the sealer reports it
        ensure_master_admin(self)
        return applied

    def check(self):
        """For a command-line tool: the schema is current and the secrets fit the stored data;
        nothing is changed (`kms migrate` migrates)."""
        with self.pool.connection() as conn:
            version = db.schema_version_if_any(conn)
            if version != db.latest_schema_version():
                raise StartupError("DATABASE_URL", f"names a database whose schema is at version {version}, "
                                   f"not {db.latest_schema_version()}: run `kms migrate` (or start the server) first")
            with db.transaction(conn) as cur:
                _check_secrets(cur, self)
                # what a command wraps (the cron's rotations, an import) goes under the version
                # the live servers share (kms.keys.kek_holders)
                refresh(cur, self.keyring, held_check_values(self.keyring))

    def close(self):
        self.revisions.confirm.close()
        self.pool.close()


class OlderCopyCheck:
    """kms.rows.Revisions's second look, when a row turns up older than its newest known revision:
    on a connection of its own (the asking request holds one of the pool's already), one at a
    time; rare, so one connection, opened when first needed."""

    def __init__(self, dsn: str):
        self.dsn = dsn
        self._conn = None
        self._lock = threading.Lock()

    def __call__(self, table: str, row_id: str, known: int, event_id) -> str:
        with self._lock:
            for attempt in (1, 2):  # a connection broken since its last use (a failover) is replaced once
                try:
                    if self._conn is None or self._conn.closed:
                        self._conn = db.connect(self.dsn, application_name="kms-freshness")
                    return self._look(table, row_id, known, event_id)
                except psycopg2.Error:
                    if self._conn is not None:
                        self._conn.close()
                    if attempt == 2:
                        raise ServiceUnavailable() from None
        raise AssertionError("unreachable")

    def _look(self, table: str, row_id: str, known: int, event_id) -> str:
        with db.transaction(self._conn) as cur:
            cur.execute(getattr(db.sql, f"{table}_revisions"), {"ids": [row_id]})
            row = cur.fetchone()
            if row is not None and row.revision >= known:
                return "raced"
            cur.execute(db.sql.audit_event_exists, {"event_id": event_id})
            return "older copy" if cur.fetchone() is not None else "lost"

    def close(self):
        with self._lock:
            if self._conn is not None:
                self._conn.close()


def _check_values(kms) -> dict:
    settings = kms.settings
    values = {name: key_check_value(key) for name, key in (
        ("DB_SECRET", settings.db_secret), ("KEY_REF_SECRET", settings.key_ref_secret),
        ("USERNAME_SECRET", settings.username_secret), ("SIGNUP_SECRET", settings.signup_secret))}
    for version in kms.keyring.kek_versions:
        values[kek_variable(version)] = kms.keyring.kek(version).check_value()
    return values


def _check_secrets(cur, kms, report: bool = False):
    """Refuse to start when a secret differs from the one the stored data was written with. Stored
    keys wrapped under a KEK version that is not configured here do not stop anything: their
    look-ups answer 503 kek_unavailable (kms.keys.service); `report` says so in the log."""
    configured = _check_values(kms)
    for name, check_value in configured.items():
        cur.execute(db.sql.remember_secret_check, {"name": name, "check_value": check_value})
    cur.execute(db.sql.secret_checks)
    stored = {row.name: bytes(row.check_value) for row in cur.fetchall()}
    for name, check_value in configured.items():
        if stored[name] != check_value:
            raise StartupError(name, "does not match the key the stored data was written with")
    known = frozenset(int(name[4:]) if name != "KEK" else 1 for name in stored
                      if name == "KEK" or (name.startswith("KEK_") and name[4:].isdigit()))
    kms.keyring.known_kek_versions = known | set(kms.keyring.kek_versions)
    if not report:
        return
    cur.execute(db.sql.kek_versions_in_use)
    in_use = set(row.kek_version for row in cur.fetchall()) | set(source_kek_versions(cur))
    for version in sorted(in_use - set(kms.keyring.kek_versions)):
        if version in known:
            log.warning("stored keys are wrapped under a KEK version that is not configured here: their look-ups "
                        "answer 503 kek_unavailable until it is", extra={"kekVersion": version,
                                                                         "setting": kek_variable(version)})
        else:
            log.error("stored keys name a KEK version no server of this deployment ever held: those rows were "
                      "altered or damaged, and their look-ups answer 500 integrity_error",
                      extra={"kekVersion": version})
