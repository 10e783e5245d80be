"""Environment -> typed, validated settings.

Settings are read once, at start-up. A missing or malformed value raises ConfigError, whose
message names the variable and the problem but never echoes the value: these are secrets.
"""
import base64
import binascii
import os
import re
import urllib.parse
from dataclasses import MISSING, dataclass, field, fields
from types import SimpleNamespace
from typing import Mapping
from urllib.parse import quote

import click

from kms.rules import CLIENTNAME_PATTERN, DAY_MS, MINUTE_MS, password_problem

KEY_BYTES = 32


class ConfigError(click.ClickException):
    """Printed by the CLI as one line: `configuration error: KEK: must decode to 32 bytes`. Several
    problems found at once are one ConfigError naming each (`problems`); `variable` is the first."""

    exit_code = 2  # docs/OPERATIONS.md, "Exit codes": usage or configuration

    def __init__(self, variable: str, problem: str, *, problems: list[tuple[str, str]] | None = None):
        self.problems = problems or [(variable, problem)]
        super().__init__("; ".join(f"{name}: {text}" for name, text in self.problems))
        self.variable = variable

    def show(self, file=None):
        if len(self.problems) == 1:
            click.echo(f"configuration error: {self.format_message()}", err=True, file=file)
            return
        lines = [f"configuration errors: {len(self.problems)} problems"]
        lines += [f"  {name}: {text}" for name, text in self.problems]
        click.echo("\n".join(lines), err=True, file=file)


class _Problems:
    """Collects every ConfigError of a load, so that one run reports all of them."""

    def __init__(self):
        self.found: list[tuple[str, str]] = []

    def check(self, parse, *args, default=None, **kwargs):
        try:
            return parse(*args, **kwargs)
        except ConfigError as error:
            self.found.extend(error.problems)
            return default

    def raise_any(self):
        if self.found:
            raise ConfigError(self.found[0][0], self.found[0][1], problems=self.found)


@dataclass(frozen=True)
class Settings:
    database_url: str
    jwt_secret: bytes
    db_secret: bytes
    signup_secret: bytes
    key_ref_secret: bytes
    username_secret: bytes
    keks: dict  # KEK version -> 32-byte key, or a Pkcs11Uri naming the key in a token
    kek_active: int
    server_host: str = "127.0.0.1"
    server_port: int = 8080
    server_threads: int = 16
    server_workers: int = 1
    log_level: str = "INFO"
    jwt_ttl_ms: int = 15 * MINUTE_MS
    master_admin_username: str | None = None
    master_admin_password: str | None = field(default=None, repr=False)
    default_role: str = "client"
    key_deletion_wait_ms: int = 7 * DAY_MS
    login_max_failures_per_client: int = 5
    login_max_failures_per_address: int = 50
    login_failure_window_ms: int = 15 * MINUTE_MS
    login_repeat_window_ms: int = MINUTE_MS
    trusted_proxy_hops: int = 0
    max_body_bytes: int = 1024 * 1024
    connection_limit: int = 1000
    connection_limit_per_source: int = 100
    server_unverified_threads: int = 0  # 0: a quarter of server_threads, at least 1
    server_unverified_rate: int = 5
    probe_cache_ms: int = 1000
    request_read_timeout_ms: int = 10_000
    audit_seal_interval_ms: int = 2000
    audit_refusal_interval_ms: int = 10_000
    audit_key_lookups: bool = True
    audit_key_lookups_durable: bool = False
    legacy_signup_tokens: bool = True
    # Relative to the working directory of `kms serve` (created owner-only); "off" turns it off.
    audit_head_file: str | None = "kms-state/audit-head"
    audit_fail_closed_after_ms: int = 0
    audit_sink: str | None = None  # file:PATH, syslog, syslog:/dev/log, syslog:HOST:PORT (kms.audit.sink)
    hsm_dek_cache_ms: int = 60_000
    hsm_dek_cache_size: int = 10_000
    pkcs11_module: str | None = None
    pkcs11_pin: str | None = field(default=None, repr=False)
    dek_cache_ms: int = 5 * MINUTE_MS
    operation_max_plaintext_bytes: int = 4096
    operation_max_batch: int = 100
    operation_max_context_pairs: int = 16
    operation_max_context_bytes: int = 1024
    operation_key_cache_ms: int = 60_000

    def __repr__(self):  # never print secrets, even by accident
        return f"Settings(server={self.server_host}:{self.server_port})"


# The defaults, written once (above) and read by the loader below.
DEFAULT = SimpleNamespace(**{f.name: f.default for f in fields(Settings) if f.default is not MISSING})

# Every environment variable the loader reads -> the setting it decides (None: it feeds another
# one, as DB_HOST feeds database_url). `KEK_<n>` stands for KEK_2, KEK_3, ...
# docs/CONFIGURATION.md documents each; a test holds the two together.
VARIABLES = {
    "DATABASE_URL": "database_url", "DB_HOST": None, "DB_PORT": None, "DB_NAME": None, "DB_USER": None,
    "DB_PASSWORD": None, "DB_SSLMODE": None,
    "JWT_SECRET": "jwt_secret", "DB_SECRET": "db_secret", "SIGNUP_SECRET": "signup_secret",
    "KEY_REF_SECRET": "key_ref_secret", "USERNAME_SECRET": "username_secret",
    "KEK": "keks", "KEK_<n>": "keks", "KEK_ACTIVE": "kek_active",
    "PKCS11_MODULE": "pkcs11_module", "PKCS11_PIN": "pkcs11_pin", "PKCS11_PIN_FILE": None,
    "HSM_DEK_CACHE": "hsm_dek_cache_ms", "HSM_DEK_CACHE_SIZE": "hsm_dek_cache_size",
    "SERVER_HOST": "server_host", "SERVER_PORT": "server_port", "SERVER_THREADS": "server_threads",
    "SERVER_WORKERS": "server_workers", "SERVER_CONNECTION_LIMIT": "connection_limit",
    "SERVER_CONNECTION_LIMIT_PER_SOURCE": "connection_limit_per_source",
    "SERVER_UNVERIFIED_THREADS": "server_unverified_threads", "SERVER_UNVERIFIED_RATE": "server_unverified_rate",
    "PROBE_CACHE": "probe_cache_ms",
    "REQUEST_READ_TIMEOUT": "request_read_timeout_ms", "MAX_BODY_BYTES": "max_body_bytes",
    "TRUSTED_PROXY_HOPS": "trusted_proxy_hops", "LOG_LEVEL": "log_level",
    "JWT_TTL": "jwt_ttl_ms", "MASTER_ADMIN_USERNAME": "master_admin_username",
    "MASTER_ADMIN_PASSWORD": "master_admin_password", "DEFAULT_ROLE": "default_role",
    "KEY_DELETION_WAIT": "key_deletion_wait_ms",
    "LOGIN_MAX_FAILURES_PER_CLIENT": "login_max_failures_per_client",
    "LOGIN_MAX_FAILURES_PER_ADDRESS": "login_max_failures_per_address",
    "LOGIN_FAILURE_WINDOW": "login_failure_window_ms", "LOGIN_REPEAT_WINDOW": "login_repeat_window_ms",
    "AUDIT_SEAL_INTERVAL": "audit_seal_interval_ms", "AUDIT_REFUSAL_INTERVAL": "audit_refusal_interval_ms", "AUDIT_KEY_LOOKUPS": "audit_key_lookups",
    "AUDIT_KEY_LOOKUPS_DURABLE": "audit_key_lookups_durable", "AUDIT_HEAD_FILE": "audit_head_file",
    "AUDIT_FAIL_CLOSED_AFTER": "audit_fail_closed_after_ms", "AUDIT_SINK": "audit_sink",
    "LEGACY_SIGNUP_TOKENS": "legacy_signup_tokens",
    "OPERATION_MAX_PLAINTEXT": "operation_max_plaintext_bytes", "OPERATION_MAX_BATCH": "operation_max_batch",
    "OPERATION_MAX_CONTEXT_PAIRS": "operation_max_context_pairs",
    "OPERATION_MAX_CONTEXT_BYTES": "operation_max_context_bytes", "OPERATION_KEY_CACHE": "operation_key_cache_ms",
}


def decode_key(variable: str, value: str | None) -> bytes:
    """Decode a 32-byte base64url key (padding optional)."""
    if value is None or value.strip() == "":
        raise ConfigError(variable, "is not set; make one with `kms gen-secret`")
    text = value.strip()
    if not re.fullmatch(r"[A-Za-z0-9_-]+={0,2}", text):
        raise ConfigError(variable, "must be base64url (RFC 4648): characters A-Z a-z 0-9 - _")
    text = text.rstrip("=")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ConfigError(variable, "is not valid base64url (RFC 4648)") from None
    if len(raw) != KEY_BYTES:
        raise ConfigError(variable, f"must decode to {KEY_BYTES} bytes")
    return raw


def _int(env: Mapping, variable: str, default: int, *, minimum: int = 0, maximum: int | None = None) -> int:
    value = env.get(variable)
    if value is None or value.strip() == "":
        return default
    try:
        number = int(value.strip())
    except ValueError:
        raise ConfigError(variable, "must be a whole number") from None
    if number < minimum or (maximum is not None and number > maximum):
        upper = f" and at most {maximum}" if maximum is not None else ""
        raise ConfigError(variable, f"must be at least {minimum}{upper}")
    return number


def _bool(env: Mapping, variable: str, default: bool) -> bool:
    value = (env.get(variable) or "").strip().lower()
    if not value:
        return default
    if value not in {"true", "false", "1", "0", "yes", "no"}:
        raise ConfigError(variable, "must be true or false")
    return value in {"true", "1", "yes"}


def _database_url(env: Mapping) -> str:
    url = (env.get("DATABASE_URL") or "").strip()
    if url:
        if not url.startswith(("postgres://", "postgresql://")):
            raise ConfigError("DATABASE_URL", "must be a postgresql:// URL")
        return url
    host = (env.get("DB_HOST") or "").strip()
    if not host:
        raise ConfigError("DATABASE_URL", "is not set (nor DB_HOST)")
    port = _int(env, "DB_PORT", 5432, minimum=1, maximum=65535)
    name = (env.get("DB_NAME") or "kms").strip()
    user = (env.get("DB_USER") or "kms").strip()
    password = env.get("DB_PASSWORD") or ""
    sslmode = (env.get("DB_SSLMODE") or "prefer").strip()
    if sslmode not in {"disable", "allow", "prefer", "require", "verify-ca", "verify-full"}:
        raise ConfigError("DB_SSLMODE", "must be one of disable, allow, prefer, require, verify-ca, verify-full")
    credentials = quote(user, safe="") + (":" + quote(password, safe="") if password else "")
    return f"postgresql://{credentials}@{host}:{port}/{quote(name, safe='')}?sslmode={sslmode}"


@dataclass(frozen=True)
class Pkcs11Uri:
    """The parts of an RFC 7512 URI that name a key: token label and object label."""
    token: str
    object: str

    def __str__(self):
        quote = urllib.parse.quote
        return f"pkcs11:token={quote(self.token, safe='')};object={quote(self.object, safe='')}"


def parse_pkcs11_uri(text: str) -> Pkcs11Uri:
    """`pkcs11:token=kms;object=kek-2` (path attributes percent-encoded; `type=secret-key` allowed).
    ValueError with what is wrong, never echoing a value (a PIN could be in a malformed one)."""
    if not text.startswith("pkcs11:"):
        raise ValueError("is not a pkcs11: URI")
    path, _, query = text[len("pkcs11:"):].partition("?")
    if query:
        raise ValueError("must not carry query attributes (set the PIN with PKCS11_PIN or PKCS11_PIN_FILE)")
    attributes = {}
    for part in filter(None, path.split(";")):
        name, equals, value = part.partition("=")
        if not equals or name not in ("token", "object", "type"):
            raise ValueError("may name only token, object and type=secret-key")
        attributes[name] = urllib.parse.unquote(value)
    if attributes.get("type", "secret-key") != "secret-key":
        raise ValueError("must name a secret key (type=secret-key)")
    if not attributes.get("token") or not attributes.get("object"):
        raise ValueError("must name both token= and object=")
    return Pkcs11Uri(attributes["token"], attributes["object"])


def _kek(variable: str, value: str | None):
    """32 bytes of key material, or an RFC 7512 pkcs11: URI naming a key in a token."""
    if value is not None and value.strip().startswith("pkcs11:"):
        try:
            return parse_pkcs11_uri(value.strip())
        except ValueError as problem:
            raise ConfigError(variable, str(problem)) from None
    return decode_key(variable, value)


def kek_variable(version: int) -> str:
    return "KEK" if version == 1 else f"KEK_{version}"


def _keks(env: Mapping) -> tuple[dict, int]:
    """KEK is version 1, KEK_2, KEK_3 ... further versions. After every DEK has been re-wrapped
    under a newer one, an old version may be left out (start-up checks nothing still needs it)."""
    keks = {}
    if (env.get("KEK") or "").strip():
        keks[1] = _kek("KEK", env.get("KEK"))
    for variable, value in env.items():
        match = re.fullmatch(r"KEK_(\d+)", variable)
        if match and (value or "").strip():  # an empty one is left out, as KEK may be
            version = int(match.group(1))
            if version < 2:
                raise ConfigError(variable, "KEK versions start at KEK_2 (KEK is version 1)")
            keks[version] = _kek(variable, value)
    if not keks:
        raise ConfigError("KEK", "is not set; make one with `kms gen-secret`")
    active = _int(env, "KEK_ACTIVE", max(keks), minimum=1)
    if active not in keks:
        raise ConfigError("KEK_ACTIVE", "names a KEK version that is not configured")
    return keks, active


def _pkcs11(env: Mapping, keks: dict) -> tuple[str | None, str | None]:
    """PKCS11_MODULE and the PIN (PKCS11_PIN, or the first line of PKCS11_PIN_FILE), needed when
    a KEK is a pkcs11: URI."""
    module = (env.get("PKCS11_MODULE") or "").strip() or None
    pin = env.get("PKCS11_PIN") or None
    pin_file = (env.get("PKCS11_PIN_FILE") or "").strip()
    if pin_file:
        if pin:
            raise ConfigError("PKCS11_PIN_FILE", "is set together with PKCS11_PIN; use one")
        try:
            with open(pin_file) as file:
                pin = file.readline().rstrip("\n") or None
        except OSError:
            raise ConfigError("PKCS11_PIN_FILE", "cannot be read") from None
    in_tokens = [kek_variable(version) for version, kek in sorted(keks.items()) if not isinstance(kek, bytes)]
    if in_tokens and not module:
        raise ConfigError("PKCS11_MODULE", f"is not set, but {in_tokens[0]} is a pkcs11: URI")
    if in_tokens and not pin:
        raise ConfigError("PKCS11_PIN", f"is not set (nor PKCS11_PIN_FILE), but {in_tokens[0]} is a pkcs11: URI")
    return module, pin


def _admin(env: Mapping) -> tuple[str | None, str | None]:
    admin_user = (env.get("MASTER_ADMIN_USERNAME") or "").strip() or None
    admin_password = env.get("MASTER_ADMIN_PASSWORD") or None
    if bool(admin_user) != bool(admin_password):
        missing = "MASTER_ADMIN_PASSWORD" if admin_user else "MASTER_ADMIN_USERNAME"
        raise ConfigError(missing, "must be set together with the other MASTER_ADMIN_* variable")
    if admin_user and not re.fullmatch(CLIENTNAME_PATTERN, admin_user):
        raise ConfigError("MASTER_ADMIN_USERNAME", "must be 4-64 characters of A-Z a-z 0-9 -")
    if admin_password and (problem := password_problem(admin_password)):
        raise ConfigError("MASTER_ADMIN_PASSWORD", problem)
    return admin_user, admin_password


def _choice(env: Mapping, variable: str, default: str, choices: tuple[str, ...], *, upper: bool = False) -> str:
    value = (env.get(variable) or default).strip()
    value = value.upper() if upper else value
    if value not in choices:
        raise ConfigError(variable, "must be " + ", ".join(choices[:-1]) + " or " + choices[-1])
    return value


def _audit_sink(env: Mapping, variable: str, default: str | None) -> str | None:
    value = (env.get(variable) or "").strip()
    if not value:
        return default
    if re.fullmatch(r"file:/.+|syslog|syslog:/.+|syslog:[\w.\-\[\]:]+:\d{1,5}", value):
        return value
    raise ConfigError(variable, "must be file:/ABSOLUTE/PATH, syslog, syslog:/dev/log or syslog:HOST:PORT")


def _head_file(value: str | None) -> str | None:
    value = (value or "").strip()
    if value.lower() == "off":
        return None
    return value or DEFAULT.audit_head_file


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def load_settings(env: Mapping | None = None) -> Settings:
    """Every problem is reported at once, in one ConfigError (a fresh .env shows all it lacks)."""
    env = os.environ if env is None else env
    problems = _Problems()
    check = problems.check
    keks, kek_active = check(_keks, env, default=({}, 0))
    pkcs11_module, pkcs11_pin = check(_pkcs11, env, keks, default=(None, None))
    admin_user, admin_password = check(_admin, env, default=(None, None))
    values = dict(
        database_url=check(_database_url, env),
        jwt_secret=check(decode_key, "JWT_SECRET", env.get("JWT_SECRET")),
        db_secret=check(decode_key, "DB_SECRET", env.get("DB_SECRET")),
        signup_secret=check(decode_key, "SIGNUP_SECRET", env.get("SIGNUP_SECRET")),
        key_ref_secret=check(decode_key, "KEY_REF_SECRET", env.get("KEY_REF_SECRET")),
        username_secret=check(decode_key, "USERNAME_SECRET", env.get("USERNAME_SECRET")),
        keks=keks,
        kek_active=kek_active,
        server_host=(env.get("SERVER_HOST") or DEFAULT.server_host).strip(),
        server_port=check(_int, env, "SERVER_PORT", DEFAULT.server_port, minimum=1, maximum=65535),
        server_threads=check(_int, env, "SERVER_THREADS", DEFAULT.server_threads, minimum=1, maximum=256),
        server_workers=check(_int, env, "SERVER_WORKERS", DEFAULT.server_workers, minimum=1, maximum=64),
        log_level=check(_choice, env, "LOG_LEVEL", DEFAULT.log_level, LOG_LEVELS, upper=True),
        jwt_ttl_ms=check(_int, env, "JWT_TTL", DEFAULT.jwt_ttl_ms, minimum=1000, maximum=DAY_MS),
        master_admin_username=admin_user,
        master_admin_password=admin_password,
        default_role=check(_choice, env, "DEFAULT_ROLE", DEFAULT.default_role, ("client", "admin")),
        key_deletion_wait_ms=check(_int, env, "KEY_DELETION_WAIT", DEFAULT.key_deletion_wait_ms),
        login_max_failures_per_client=check(_int, env, "LOGIN_MAX_FAILURES_PER_CLIENT", DEFAULT.login_max_failures_per_client, minimum=1),
        login_max_failures_per_address=check(_int, env, "LOGIN_MAX_FAILURES_PER_ADDRESS", DEFAULT.login_max_failures_per_address, minimum=1),
        login_failure_window_ms=check(_int, env, "LOGIN_FAILURE_WINDOW", DEFAULT.login_failure_window_ms, minimum=1000),
        login_repeat_window_ms=check(_int, env, "LOGIN_REPEAT_WINDOW", DEFAULT.login_repeat_window_ms,
                                     maximum=15 * MINUTE_MS),
        trusted_proxy_hops=check(_int, env, "TRUSTED_PROXY_HOPS", DEFAULT.trusted_proxy_hops, maximum=5),
        max_body_bytes=check(_int, env, "MAX_BODY_BYTES", DEFAULT.max_body_bytes, minimum=1024, maximum=16 * 1024 * 1024),
        connection_limit=check(_int, env, "SERVER_CONNECTION_LIMIT", DEFAULT.connection_limit, minimum=16, maximum=100_000),
        connection_limit_per_source=check(_int, env, "SERVER_CONNECTION_LIMIT_PER_SOURCE",
                                          DEFAULT.connection_limit_per_source, maximum=100_000),
        server_unverified_threads=check(_int, env, "SERVER_UNVERIFIED_THREADS", DEFAULT.server_unverified_threads,
                                        maximum=256),
        server_unverified_rate=check(_int, env, "SERVER_UNVERIFIED_RATE", DEFAULT.server_unverified_rate,
                                     maximum=100_000),
        probe_cache_ms=check(_int, env, "PROBE_CACHE", DEFAULT.probe_cache_ms, maximum=60_000),
        request_read_timeout_ms=check(_int, env, "REQUEST_READ_TIMEOUT", DEFAULT.request_read_timeout_ms, minimum=1000, maximum=300_000),
        audit_seal_interval_ms=check(_int, env, "AUDIT_SEAL_INTERVAL", DEFAULT.audit_seal_interval_ms),
        audit_refusal_interval_ms=check(_int, env, "AUDIT_REFUSAL_INTERVAL", DEFAULT.audit_refusal_interval_ms,
                                        minimum=100, maximum=300_000),
        audit_key_lookups=check(_bool, env, "AUDIT_KEY_LOOKUPS", DEFAULT.audit_key_lookups),
        audit_key_lookups_durable=check(_bool, env, "AUDIT_KEY_LOOKUPS_DURABLE", DEFAULT.audit_key_lookups_durable),
        legacy_signup_tokens=check(_bool, env, "LEGACY_SIGNUP_TOKENS", DEFAULT.legacy_signup_tokens),
        audit_head_file=_head_file(env.get("AUDIT_HEAD_FILE")),
        audit_sink=check(_audit_sink, env, "AUDIT_SINK", None),
        audit_fail_closed_after_ms=check(_int, env, "AUDIT_FAIL_CLOSED_AFTER", DEFAULT.audit_fail_closed_after_ms,
                                         maximum=86_400_000),
        pkcs11_module=pkcs11_module,
        pkcs11_pin=pkcs11_pin,
        hsm_dek_cache_ms=check(_int, env, "HSM_DEK_CACHE", DEFAULT.hsm_dek_cache_ms, maximum=3_600_000),
        hsm_dek_cache_size=check(_int, env, "HSM_DEK_CACHE_SIZE", DEFAULT.hsm_dek_cache_size, minimum=1, maximum=1_000_000),
        operation_max_plaintext_bytes=check(_int, env, "OPERATION_MAX_PLAINTEXT", DEFAULT.operation_max_plaintext_bytes,
                                            minimum=32, maximum=1024 * 1024),
        operation_max_batch=check(_int, env, "OPERATION_MAX_BATCH", DEFAULT.operation_max_batch, minimum=1,
                                  maximum=10_000),
        operation_max_context_pairs=check(_int, env, "OPERATION_MAX_CONTEXT_PAIRS",
                                          DEFAULT.operation_max_context_pairs, maximum=256),
        operation_max_context_bytes=check(_int, env, "OPERATION_MAX_CONTEXT_BYTES",
                                          DEFAULT.operation_max_context_bytes, maximum=64 * 1024),
        operation_key_cache_ms=check(_int, env, "OPERATION_KEY_CACHE", DEFAULT.operation_key_cache_ms,
                                     maximum=3_600_000),
    )
    problems.raise_any()
    return Settings(**values)


def generate_secret() -> str:
    return base64.urlsafe_b64encode(os.urandom(KEY_BYTES)).rstrip(b"=").decode()


SECRET_VARIABLES = ("JWT_SECRET", "KEK", "DB_SECRET", "SIGNUP_SECRET", "KEY_REF_SECRET", "USERNAME_SECRET")
