"""The original Go KMS's stored rows (github.com/jeltjongsma/KMS), read and opened with its secrets.

What it stores, and how (its database/migrations/00001_init_mg.up.sql, internal/storage/postgres,
internal/storage/encryption/context.go, pkg/encryption/encryption.go, pkg/hashing/hashing.go):

- clients (id, clientname, hashedClientname, password, role): clientname and role sealed under
  DB_SECRET; hashedClientname = HMAC-SHA256(USERNAME_SECRET, clientname as given); password a
  bcrypt hash (cost 10).
- keys (id, clientId, keyReference, version, dek, state, encoding), one row per version:
  keyReference = HMAC-SHA256(KEY_REF_SECRET, reference), not bound to the client (the reference
  itself is not stored); dek the 32 DEK bytes sealed under KEK; state and encoding sealed under
  DB_SECRET.

"Sealed" is AES-GCM with a random 96-bit nonce and no associated data, stored as
base64url(nonce || ciphertext || tag); every base64url is unpadded (Go's RawURLEncoding), hashes
included. The secrets come from its .env, decoded the same way (internal/bootstrap/keymanager.go).
Nothing here writes to the original's database.
"""
import base64
import binascii
import hmac
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import psycopg2
import psycopg2.extensions
import psycopg2.extras
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kms import db

# What its .env holds that the import needs; the names are ours too (docs/CONFIGURATION.md).
SECRET_NAMES = ("KEK", "DB_SECRET", "KEY_REF_SECRET", "USERNAME_SECRET")
NONCE_BYTES = 12  # Go's cipher.NewGCM: the standard nonce size
DEK_BYTES = 32  # internal/keys/service.go: encryption.GenerateKey(32)
STATES = ("in-use", "deprecated", "retired")  # internal/keys/dto.go
BCRYPT_HASH = re.compile(r"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}")
_RAW_URL = re.compile(r"[A-Za-z0-9_-]*")


class SeedEnvProblem(ValueError):
    """The original's .env lacks a secret or holds one the original itself could not use; one
    line per problem, naming the variable, never its value."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


class Unreadable(Exception):
    """A stored row that does not open: why, without a secret or a stored value."""


@dataclass(frozen=True, repr=False)
class OriginalSecrets:
    kek: bytes
    db_secret: bytes
    key_ref_secret: bytes
    username_secret: bytes

    def __repr__(self):
        return "OriginalSecrets()"


@dataclass(frozen=True)
class OriginalClient:
    id: int
    name: str
    role: str
    password_hash: str  # bcrypt

    def __repr__(self):
        return f"OriginalClient(id={self.id})"


@dataclass(frozen=True)
class OriginalVersion:
    row_id: int
    version: int
    state: str
    dek: bytes

    def __repr__(self):
        return f"OriginalVersion(row_id={self.row_id}, version={self.version}, state={self.state!r})"


@dataclass(frozen=True)
class OriginalKey:
    """One key: every row of one (clientId, keyReference), oldest version first."""
    client_id: int
    reference_hash: str  # as stored: base64url of the HMAC
    rows: list

    @property
    def label(self) -> str:
        return f"key of client #{self.client_id} (rows {', '.join(f'#{row.id}' for row in self.rows)})"


def raw_url_decode(text: str) -> bytes:
    """Go's base64.RawURLEncoding.DecodeString: the URL alphabet, no padding."""
    if not isinstance(text, str) or not _RAW_URL.fullmatch(text) or len(text) % 4 == 1:
        raise binascii.Error("not unpadded base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def raw_url_encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def hash_to_b64(secret: bytes, plain: str) -> str:
    """pkg/hashing/hashing.go HashHS256ToB64: base64url(HMAC-SHA256(secret, plain)), unpadded."""
    return raw_url_encode(hmac.new(secret, plain.encode(), "sha256").digest())


def read_seed_env(path: Path) -> OriginalSecrets:
    """The secrets from the original's .env, read as its internal/bootstrap/config.go LoadConfig
    does (KEY=VALUE, both trimmed; blank lines and lines starting with # skipped; no quoting) and
    decoded as its internal/bootstrap/keymanager.go does. KEK and DB_SECRET are AES keys there
    (aes.NewCipher: 16, 24 or 32 bytes)."""
    values = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue  # such a line stops the original from starting; nothing the import reads
        name, value = (part.strip() for part in line.split("=", 1))
        if name and value:
            values[name] = value
    problems, keys = [], {}
    for name in SECRET_NAMES:
        if name not in values:
            problems.append(f"{name}: not set in the original's .env")
            continue
        try:
            keys[name] = raw_url_decode(values[name])
        except binascii.Error:
            problems.append(f"{name}: not unpadded base64url, which the original would not have started with")
            continue
        if name in ("KEK", "DB_SECRET") and len(keys[name]) not in (16, 24, 32):
            problems.append(f"{name}: {len(keys[name])} bytes, not an AES key (16, 24 or 32 bytes)")
        elif not keys[name]:
            problems.append(f"{name}: empty")
    if problems:
        raise SeedEnvProblem(problems)
    return OriginalSecrets(kek=keys["KEK"], db_secret=keys["DB_SECRET"], key_ref_secret=keys["KEY_REF_SECRET"],
                           username_secret=keys["USERNAME_SECRET"])


def _open(key: bytes, secret: str, stored, what: str) -> bytes:
    """pkg/encryption/encryption.go Decrypt of a column as internal/storage/encryption/context.go
    stores it: base64url(nonce || AES-GCM ciphertext and tag), no associated data."""
    try:
        blob = raw_url_decode(stored)
    except binascii.Error:
        raise Unreadable(f"{what} is not base64url") from None
    if len(blob) < NONCE_BYTES + 16:
        raise Unreadable(f"{what} is too short to be sealed")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], None)
    except InvalidTag:
        raise Unreadable(f"{what} does not open under {secret}") from None


def _open_text(key: bytes, stored, what: str) -> str:
    """A text column sealed under DB_SECRET."""
    try:
        return _open(key, "DB_SECRET", stored, what).decode()
    except UnicodeDecodeError:
        raise Unreadable(f"{what} is not text") from None


def open_client(secrets: OriginalSecrets, row) -> OriginalClient:
    """A clients row, opened and checked: its name hash is the original's HMAC of its name (else
    USERNAME_SECRET is not the one it was written with, or the row was altered)."""
    name = _open_text(secrets.db_secret, row.clientname, "the name")
    if not hmac.compare_digest(hash_to_b64(secrets.username_secret, name), row.hashedclientname or ""):
        raise Unreadable("hashedClientname is not the HMAC of its name under USERNAME_SECRET")
    role = _open_text(secrets.db_secret, row.role, "the role")
    password_hash = (row.password or "").rstrip(" ")  # CHAR(60)
    if not BCRYPT_HASH.fullmatch(password_hash):
        raise Unreadable("the password is not a bcrypt hash")
    return OriginalClient(id=row.id, name=name, role=role, password_hash=password_hash)


def open_key_version(secrets: OriginalSecrets, row) -> OriginalVersion:
    dek = _open(secrets.kek, "KEK", row.dek, "the DEK")
    if len(dek) != DEK_BYTES:
        raise Unreadable(f"the DEK is {len(dek)} bytes, not {DEK_BYTES}")
    state = _open_text(secrets.db_secret, row.state, "the state")
    if state not in STATES:
        raise Unreadable("the state is none the original knows")
    _open_text(secrets.db_secret, row.encoding, "the encoding")  # always "base64url (RFC 4648)"; unused
    return OriginalVersion(row_id=row.id, version=row.version, state=state, dek=dek)


def misfits(secrets: OriginalSecrets, client_rows: list, key_rows: list) -> list[str]:
    """The secrets that open none of the given rows they should open: a wrong secret, not a row
    or two that fail (those are named one by one as they are imported)."""
    found = []
    names = []
    for row in client_rows:
        try:
            names.append((_open_text(secrets.db_secret, row.clientname, "the name"), row.hashedclientname or ""))
        except Unreadable:
            continue
    states = [row for row in key_rows if _opens(lambda: _open_text(secrets.db_secret, row.state, "the state"))]
    if (client_rows or key_rows) and not names and not states:
        found.append("DB_SECRET opens none of the stored client names and key states")
    if names and not any(hmac.compare_digest(hash_to_b64(secrets.username_secret, name), stored)
                         for name, stored in names):
        found.append("USERNAME_SECRET hashes none of the stored client names as the original did")
    if key_rows and not any(_opens(lambda: _open(secrets.kek, "KEK", row.dek, "the DEK")) for row in key_rows):
        found.append("KEK opens none of the stored DEKs")
    return found


def _opens(attempt) -> bool:
    try:
        attempt()
    except Unreadable:
        return False
    return True


def connect(url: str):
    """A connection to the original's database that reads one snapshot and cannot write: every
    transaction on it is REPEATABLE READ and READ ONLY."""
    conn = psycopg2.connect(url, connect_timeout=10, application_name="kms-import-seed",
                            cursor_factory=psycopg2.extras.NamedTupleCursor,
                            options="-c default_transaction_read_only=on -c statement_timeout=0")
    conn.set_session(isolation_level=psycopg2.extensions.ISOLATION_LEVEL_REPEATABLE_READ, readonly=True)
    return conn


def is_original_schema(conn) -> bool:
    with conn.cursor() as cur:
        cur.execute(db.sql.original_schema)
        return cur.fetchone().present


def read_clients(conn) -> list:
    with conn.cursor() as cur:
        cur.execute(db.sql.original_clients)
        return cur.fetchall()


def sample_key_rows(conn, limit: int) -> list:
    with conn.cursor() as cur:
        cur.execute(db.sql.original_key_sample, {"limit": limit})
        return cur.fetchall()


def count_keys(conn):
    with conn.cursor() as cur:
        cur.execute(db.sql.original_key_counts)
        return cur.fetchone()


def has_key_named(conn, client_id: int, reference_hash: str) -> bool:
    with conn.cursor() as cur:
        cur.execute(db.sql.original_key_named, {"client_id": client_id, "reference_hash": reference_hash})
        return cur.fetchone() is not None


def read_keys(conn) -> Iterator[OriginalKey]:
    """Every key, one at a time, from a server-side cursor (the table may be large)."""
    with conn.cursor("original_keys") as cur:
        cur.itersize = 2000
        cur.execute(db.sql.original_key_rows)
        key = None
        for row in cur:
            if key is None or (row.clientid, row.keyreference) != (key.client_id, key.reference_hash):
                if key is not None:
                    yield key
                key = OriginalKey(client_id=row.clientid, reference_hash=row.keyreference, rows=[])
            key.rows.append(row)
        if key is not None:
            yield key
