"""Envelope encryption, keyed hashing and key wrapping. Pure functions: no Flask, no database.

Every ciphertext this module makes is `format byte || 96-bit nonce || AES-256-GCM output`, and
every one is bound to where it is stored through associated data, so a ciphertext copied into
another row fails to open instead of yielding another row's secret.
"""
import base64
import binascii
import hmac
import os
import struct
import time
import uuid
from datetime import datetime, timezone

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kms.expiring import ExpiringMap
from kms.keyproviders.environment import EnvironmentKek

FORMAT_V1 = b"\x01"
NONCE_BYTES = 12
DEK_BYTES = 32


class IntegrityError(Exception):
    """A stored ciphertext failed authentication: tampered, moved, or the wrong key."""


class KekMissing(Exception):
    """A stored ciphertext names a KEK version this process does not hold. Not tampering by itself:
    another server may hold it (its configuration is newer), or it may be a KEK retired too soon."""

    def __init__(self, version: int):
        super().__init__(f"KEK version {version} is not configured in this process")
        self.version = version


_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")


def b64url(raw: bytes) -> str:
    """base64url without padding (RFC 4648, section 5), as the original KMS and Go's
    base64.RawURLEncoding write it: a DEK is 43 characters."""
    return binascii.b2a_base64(raw, newline=False).translate(_TO_URLSAFE).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """base64url with or without padding; binascii.Error on anything else."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


_LENGTH = struct.Struct(">I").pack


def _length_prefixed(parts) -> bytes:
    return b"".join([_LENGTH(len(part)) + part for part in parts])


def keyed_hash(key: bytes, purpose: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA256 over length-prefixed parts, so ("ab", "c") and ("a", "bc") differ."""
    # Not hmac.digest(): that one releases the GIL on every call, however short the message, and
    # under load each release hands the interpreter to another thread, and getting it back costs
    # milliseconds beside a busy thread, where hmac.new().digest() costs microseconds.
    return hmac.new(key, purpose + _length_prefixed(parts), "sha256").digest()


def new_dek() -> bytes:
    return os.urandom(DEK_BYTES)


def _associated_data(purpose: bytes, *parts: bytes) -> bytes:
    return FORMAT_V1 + purpose + _length_prefixed(parts)


def _seal(aead: AESGCM, plaintext: bytes, ad: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return FORMAT_V1 + nonce + aead.encrypt(nonce, plaintext, ad)


def _open(aead: AESGCM, blob: bytes, ad: bytes) -> bytes:
    if len(blob) < 1 + NONCE_BYTES + 16 or blob[0] != FORMAT_V1[0]:
        raise IntegrityError("unknown ciphertext format")
    try:
        return aead.decrypt(blob[1 : 1 + NONCE_BYTES], blob[1 + NONCE_BYTES :], ad)
    except InvalidTag:
        raise IntegrityError("ciphertext failed authentication") from None


# What _associated_data(b"dek", owner, ref_hash, version, kek_version) lays out, for parts of fixed
# size (a 16-byte owner id, a 32-byte reference hash, two 32-bit numbers), in one precompiled pack:
# every DEK wrap and unwrap builds one.
_DEK_PARTS = struct.Struct(">I16sI32sIIII")


def dek_associated_data(owner_id: uuid.UUID, ref_hash: bytes, version: int, kek_version: int) -> bytes:
    if len(ref_hash) != 32:
        raise ValueError("a key reference hash is 32 bytes")
    return FORMAT_V1 + b"dek" + _DEK_PARTS.pack(16, owner_id.bytes, 32, bytes(ref_hash), 4, version, 4, kek_version)


def _secret_associated_data(purpose: bytes, identity: tuple, kek_version: int) -> bytes:
    return _associated_data(b"secret:" + purpose, *identity, _LENGTH(kek_version))


ROW_MAC_V1 = b"\x01"


def _field_bytes(value) -> bytes:
    """A column value as MAC input, tagged by type, so None, "", 0 and False all differ."""
    if value is None:
        return b"N"
    if isinstance(value, bool):
        return b"T" if value else b"F"
    if isinstance(value, int):
        return b"i" + str(value).encode()
    if isinstance(value, str):
        return b"s" + value.encode()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return b"b" + bytes(value)
    if isinstance(value, uuid.UUID):
        return b"u" + value.bytes
    if isinstance(value, datetime):
        return b"d" + value.astimezone(timezone.utc).isoformat().encode()
    raise TypeError(f"no MAC encoding for {type(value).__name__}")


class RowMacs:
    """MACs over database rows: `format byte || HMAC-SHA256(key, table, column values...)`.

    The first column is the row's identity. A row whose MAC does not match was written by someone
    without DB_SECRET (or moved from another row) and must not be obeyed. Verified rows are
    remembered by their exact content (columns and MAC, per table), so the hot path pays one HMAC
    per distinct row rather than per request; the memory is bounded and holds no secret (only
    what the database holds already)."""

    def __init__(self, key: bytes, remembered: int = 8192):
        self._key = key
        self._verified: dict[bytes, dict] = {}  # table -> {MAC: the columns it was verified over}
        self._remembered = remembered

    def __repr__(self):
        return "RowMacs()"

    def mac(self, table: bytes, *columns) -> bytes:
        return ROW_MAC_V1 + keyed_hash(self._key, b"kms-row-v1:" + table, *[_field_bytes(c) for c in columns])

    def verify(self, table: bytes, row: tuple, typed=None) -> bool:
        """`row` is the columns in MAC order followed by the stored MAC. `typed`, if given, turns
        the columns into the types the MAC was made over (for rows read with text ids)."""
        seen = self._verified.get(table)
        if seen is None:
            seen = self._verified[table] = {}
        if memoryview in map(type, row):  # bytea as psycopg2 reads it: unhashable, so as bytes
            row = tuple(bytes(value) if type(value) is memoryview else value for value in row)
        stored, columns = row[-1], row[:-1]
        if stored is not None and seen.get(stored) == columns:  # these very columns had this MAC
            return True
        typed_columns = columns if typed is None else typed(columns)
        if stored is None or not hmac.compare_digest(bytes(stored), self.mac(table, *typed_columns)):
            return False
        if len(seen) >= self._remembered:
            seen.clear()
        seen[stored] = columns
        return True


class DekCache:
    """Unwrapped DEKs, bounded in number and age, for KEKs whose every unwrap is a round trip to
    an HSM. An entry is found only by everything its unwrap authenticated (the wrapped blob itself
    and its associated data), so a changed row misses and is unwrapped, and fails, as usual. It
    holds DEKs in plaintext in the process's memory for at most `ttl_s`: the security model says so."""

    def __init__(self, ttl_s: float, size: int):
        self.ttl_s = ttl_s
        self.size = size
        self._entries = ExpiringMap(size)

    def get(self, address: tuple) -> bytes | None:
        return self._entries.get(address, time.monotonic())

    def put(self, address: tuple, dek: bytes):
        self._entries.put(address, dek, time.monotonic() + self.ttl_s)


class Keyring:
    """The KEKs and the database secret, ready to use. Holds key material: never log it."""

    def __init__(self, keks: dict, kek_active: int, db_secret: bytes, dek_cache: DekCache | None = None):
        """`keks`: version -> a provider's Kek (kms.keyproviders), or 32 bytes of key material.
        `dek_cache`: for DEKs unwrapped by a KEK in a token (never for environment KEKs, whose
        unwrap costs a microsecond)."""
        self._dek_cache = dek_cache
        self._keks = {version: EnvironmentKek(kek) if isinstance(kek, bytes) else kek for version, kek in keks.items()}
        self.kek_active = kek_active
        self.held_versions = sorted(self._keks)  # (a list: the look-up statement takes it as an array)
        # The version new wraps use: KEK_ACTIVE, or an older one while a live server lacks it
        # (kms.keys.kek_holders keeps it current); and every version this deployment ever held.
        self.kek_wrap = kek_active
        self.known_kek_versions = frozenset(self._keks)
        self._db = AESGCM(db_secret)
        self.rows = RowMacs(keyed_hash(db_secret, b"kms-derive-v1", b"row-mac"))

    def __repr__(self):
        return f"Keyring(kek_versions={sorted(self._keks)}, active={self.kek_active}, wrap={self.kek_wrap})"

    @property
    def kek_versions(self):
        return sorted(self._keks)

    def kek(self, version: int):
        """The provider's KEK of a version (for status and start-up checks; it holds no readable key)."""
        return self._keks[version]

    def wrap_dek(self, dek: bytes, owner_id: uuid.UUID, ref_hash: bytes, version: int,
                 kek_version: int | None = None) -> tuple[bytes, int]:
        """Under `kek_version` (kek rewrap names its target), else the version new wraps use."""
        kek_version = self.kek_wrap if kek_version is None else kek_version
        ad = dek_associated_data(owner_id, ref_hash, version, kek_version)
        return _seal(self._keks[kek_version], dek, ad), kek_version

    def unwrap_dek(self, wrapped: bytes, owner_id: uuid.UUID, ref_hash: bytes, version: int, kek_version: int) -> bytes:
        kek = self._keks.get(kek_version)
        if kek is None:
            raise KekMissing(kek_version)
        cache = self._dek_cache if kek.provider != "environment" else None
        if cache is not None:
            address = (wrapped, owner_id, bytes(ref_hash), version, kek_version)
            dek = cache.get(address)
            if dek is not None:
                return dek
        dek = _open(kek, wrapped, dek_associated_data(owner_id, ref_hash, version, kek_version))
        if cache is not None:
            cache.put(address, dek)
        return dek

    def wrap_secret(self, secret: bytes, purpose: bytes, *identity: bytes) -> tuple[bytes, int]:
        """Seal a secret that is not a DEK under the KEK new wraps use, bound (as a DEK is) to what
        it is for, where it is kept and the KEK version."""
        kek_version = self.kek_wrap
        return _seal(self._keks[kek_version], secret, _secret_associated_data(purpose, identity, kek_version)), \
            kek_version

    def unwrap_secret(self, wrapped: bytes, kek_version: int, purpose: bytes, *identity: bytes) -> bytes:
        kek = self._keks.get(kek_version)
        if kek is None:
            raise KekMissing(kek_version)
        return _open(kek, wrapped, _secret_associated_data(purpose, identity, kek_version))

    def encrypt_field(self, plaintext: str, purpose: bytes, *identity: bytes) -> bytes:
        """Encrypt a column value under DB_SECRET, bound to its purpose and row identity."""
        return _seal(self._db, plaintext.encode(), _associated_data(purpose, *identity))

    def decrypt_field(self, blob: bytes, purpose: bytes, *identity: bytes) -> str:
        return _open(self._db, blob, _associated_data(purpose, *identity)).decode()
