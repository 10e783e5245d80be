"""What a running KMS holds: settings, keys, the connection pool, metrics, the hashing limiter."""
import logging
from dataclasses import dataclass

from kms import crypto, db
from kms.audit.refusals import RefusalCounts
from kms.auth.passwords import PasswordHasher
from kms.auth.recent import RecentLogins
from kms.auth.service import ensure_master_admin
from kms.auth.tokens import VerifiedTokenCache
from kms.config import ConfigError, Settings, kek_variable
from kms.keyproviders.base import key_check_value
from kms.keyproviders.opening import open_keks
from kms.keys.imported import source_kek_versions
from kms.observability.metrics import Metrics
from kms.observability.probes import ProbeAnswers
from kms.operations.keycache import OperationKeys
from kms.rows import backfill_row_macs, remac_key_rows

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
    operation_keys: OperationKeys

    @classmethod
    def open(cls, settings: Settings, *, pool_size: int | None = None, hash_gate=None) -> "Kms":
        """Keys, pool and metrics, without touching the database (see prepare() and check())."""
        return cls(
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
            operation_keys=OperationKeys(settings.operation_key_cache_ms / 1000),
        )

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
        def row_macs(cur):  # migration 004: MACs of the stored rows, with secrets checked first
            _check_secrets(cur, self)
            backfill_row_macs(cur, self)

        def key_row_macs(cur):  # migration 008: the key rows' MACs cover `exportable` too
            _check_secrets(cur, self)
            remac_key_rows(cur, self)

        return db.migrate(self.settings.database_url, steps={"row_macs": row_macs, "key_row_macs": key_row_macs})

    def prepare(self) -> list[str]:
        """Once per server start, before serving: migrate, check the secrets against the stored
        data, create the first admin (or warn that there is none)."""
        applied = self.migrate()
        with self.pool.connection() as conn, db.transaction(conn) as cur:
            _check_secrets(cur, self)
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

    def close(self):
        self.pool.close()


def _check_values(kms) -> dict:
    settings = kms.settings
    values = {name: key_check_value(key) for name, key in (
        ("DB_SECRET", settings.db_secret), ("KEY_REF_SECRET", settings.key_ref_secret),
        ("USERNAME_SECRET", settings.username_secret), ("SIGNUP_SECRET", settings.signup_secret))}
    for version in kms.keyring.kek_versions:
        values[kek_variable(version)] = kms.keyring.kek(version).check_value()
    return values


def _check_secrets(cur, kms):
    """Refuse to start when a secret differs from the one the stored data was written with,
    or when stored keys are wrapped under a KEK version that is not configured."""
    settings = kms.settings
    configured = _check_values(kms)
    for name, check_value in configured.items():
        cur.execute(db.sql.remember_secret_check, {"name": name, "check_value": check_value})
    cur.execute(db.sql.secret_checks)
    stored = {row.name: bytes(row.check_value) for row in cur.fetchall()}
    cur.execute(db.sql.kek_versions_in_use)
    kek_versions_in_use = [row.kek_version for row in cur.fetchall()] + source_kek_versions(cur)
    for name, check_value in configured.items():
        if stored[name] != check_value:
            raise StartupError(name, "does not match the key the stored data was written with")
    for version in kek_versions_in_use:
        if version not in settings.keks:
            name = "KEK" if version == 1 else f"KEK_{version}"
            raise StartupError(name, "is not set, but stored keys are wrapped with it")
