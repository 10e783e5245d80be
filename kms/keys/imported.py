"""Keys imported from the original Go KMS (`kms import-seed`, kms/importing): found by the
original's hash of their reference until their owner first names them.

The original stored no key reference, only base64url(HMAC-SHA256(KEY_REF_SECRET, reference)), not
bound to the owner (its internal/keys/service.go, pkg/hashing/hashing.go `HashHS256ToB64`). An
imported key's ref_hash is a keyed hash of that HMAC and of its owner (imported_ref_hash), under a
purpose of its own, so it never equals a ref_hash of ours. When a client names a reference our
own index misses, its HMAC is computed under the KEY_REF_SECRET of every imported deployment (kept
wrapped under our KEK in import_sources), and a key found under it is moved under our own index in
the caller's transaction: ref_hash, ref_enc and row MAC anew, every DEK version re-wrapped with
the associated data of its new address. After that first use an imported key is like any other.
"""
import hmac
import uuid
from datetime import timedelta
from typing import NamedTuple

from kms import db
from kms.crypto import IntegrityError, KekMissing, keyed_hash
from kms.rows import KEYS

IMPORTED_REFERENCE = b"kms-imported-key-reference-v1"
SOURCE_KEY_REF_SECRET = b"import-source-key-ref-secret"


class ImportedVersion(NamedTuple):
    version: int
    state: str  # in-use, deprecated or retired (then dek is None)
    dek: bytes | None


def original_reference_hash(original_key_ref_secret: bytes, reference: str) -> bytes:
    """The original's HMAC-SHA256 of a key reference, raw (it stores it base64url, unpadded):
    pkg/hashing/hashing.go `HashHS256ToB64([]byte(keyReference), KEY_REF_SECRET)`."""
    return hmac.new(original_key_ref_secret, reference.encode(), "sha256").digest()


def imported_ref_hash(kms, owner_id: uuid.UUID, original_hash: bytes) -> bytes:
    return keyed_hash(kms.settings.key_ref_secret, IMPORTED_REFERENCE, owner_id.bytes, original_hash)


def seal_source_secret(kms, fingerprint: bytes, original_key_ref_secret: bytes) -> tuple[bytes, int]:
    """The original's KEY_REF_SECRET as import_sources keeps it: (wrapped, KEK version)."""
    return kms.keyring.wrap_secret(original_key_ref_secret, SOURCE_KEY_REF_SECRET, fingerprint)


def open_source_secret(kms, source) -> bytes:
    """crypto.IntegrityError when the row was altered; crypto.KekMissing when its KEK version is not
    configured here (answered 503 kek_unavailable)."""
    return kms.keyring.unwrap_secret(bytes(source.key_ref_secret), source.kek_version, SOURCE_KEY_REF_SECRET,
                                     bytes(source.fingerprint))


def _candidates(cur, kms, owner_id: uuid.UUID, reference: str) -> list[bytes]:
    """The ref_hash an imported key named `reference` would have, one per imported deployment."""
    cur.execute(db.sql.import_sources)
    return [imported_ref_hash(kms, owner_id, original_reference_hash(open_source_secret(kms, source), reference))
            for source in cur.fetchall()]


def imported_key_named(cur, kms, owner_id: uuid.UUID, reference: str) -> bool:
    """The owner has an imported key, not named yet, that `reference` names."""
    candidates = _candidates(cur, kms, owner_id, reference)
    if not candidates:
        return False
    cur.execute(db.sql.imported_key_exists, {"client_id": owner_id, "candidates": candidates})
    return cur.fetchone() is not None


def claim_imported_key(cur, kms, owner_id: uuid.UUID, reference: str, ref_hash: bytes) -> int | None:
    """Move the owner's imported key that `reference` names under our own index (`ref_hash`), in
    the caller's transaction. Returns the key's id; 0 when a key of ours has that reference already
    (a parallel request moved it first: the caller looks again); None when there is no such key.
    crypto.IntegrityError when a wrapped DEK fails authentication (nothing is moved)."""
    candidates = _candidates(cur, kms, owner_id, reference)
    if not candidates:
        return None
    cur.execute(db.sql.lock_imported_key, {"client_id": owner_id, "candidates": candidates})
    row = cur.fetchone()
    cur.execute(db.sql.key_exists, {"client_id": owner_id, "ref_hash": ref_hash})
    if cur.fetchone() is not None:  # ours wins; an imported key under the same name stays as it is
        return 0
    if row is None:
        return None
    KEYS.check(kms, row)
    imported = bytes(row.ref_hash)
    cur.execute(db.sql.key_versions_to_move, {"key_id": row.id})
    for version in cur.fetchall():
        dek = kms.keyring.unwrap_dek(bytes(version.wrapped_dek), owner_id, imported, version.version,
                                     version.kek_version)
        wrapped, kek_version = kms.keyring.wrap_dek(dek, owner_id, ref_hash, version.version)
        cur.execute(db.sql.rewrap_version, {"key_id": row.id, "version": version.version, "kek_version": kek_version,
                                            "wrapped_dek": wrapped})
    cur.execute(db.sql.move_key_reference, {
        "id": row.id, "ref_hash": ref_hash,
        "ref_enc": kms.keyring.encrypt_field(reference, b"key-reference", owner_id.bytes, ref_hash),
        "revision": row.revision + 1,
        "row_mac": KEYS.sign(cur, kms, id=row.id, client_id=owner_id, ref_hash=ref_hash,
                             current_version=row.current_version, retired_below=row.retired_below,
                             deleted=row.deleted, rotation_period_ms=row.rotation_period_ms, exportable=row.exportable,
                             revision=row.revision + 1)})
    return row.id


def insert_imported_key(cur, kms, owner_id: uuid.UUID, original_hash: bytes, versions: list[ImportedVersion],
                        retired_below: int) -> tuple[int, bytes] | None:
    """Store an imported key with its versions in the caller's transaction, the newest version in
    use, every DEK wrapped under the active KEK for the key's imported address: (id, ref_hash), or
    None when the owner has it already."""
    ref_hash = imported_ref_hash(kms, owner_id, original_hash)
    cur.execute(db.sql.insert_key, {"client_id": owner_id, "ref_hash": ref_hash, "ref_enc": None})
    row = cur.fetchone()
    if row is None:
        return None
    for version in versions:
        wrapped = kek_version = None
        if version.dek is not None:
            wrapped, kek_version = kms.keyring.wrap_dek(version.dek, owner_id, ref_hash, version.version)
        cur.execute(db.sql.insert_imported_key_version, {"key_id": row.id, "version": version.version,
                                                         "state": version.state, "kek_version": kek_version,
                                                         "wrapped_dek": wrapped})
    key = {"id": row.id, "client_id": owner_id, "ref_hash": ref_hash,
           "current_version": max(version.version for version in versions), "retired_below": retired_below,
           "deleted": False, "rotation_period_ms": None, "exportable": True, "revision": 1}
    cur.execute(db.sql.update_key, {**key, "row_mac": KEYS.mac(kms, **key), "wait": timedelta(0)})
    return row.id, ref_hash


def rewrap_source_secrets(kms, cur) -> list[int]:
    """`kek rewrap`: the imported deployments' secrets under the active KEK too. Returns the ids
    of those that failed authentication (left as they are)."""
    cur.execute(db.sql.import_sources_to_rewrap, {"active": kms.keyring.kek_active})
    failed = []
    for source in cur.fetchall():
        try:
            secret = open_source_secret(kms, source)
        except IntegrityError:
            failed.append(source.id)
            continue
        except KekMissing:  # counted by `kek status`; left for a run that holds its KEK
            continue
        wrapped, kek_version = seal_source_secret(kms, bytes(source.fingerprint), secret)
        cur.execute(db.sql.rewrap_import_source, {"id": source.id, "kek_version": kek_version,
                                                  "key_ref_secret": wrapped})
    return failed


def source_kek_versions(cur) -> list[int]:
    """The KEK versions the imported deployments' secrets are wrapped with: start-up refuses a
    configuration without them, as it does for DEKs."""
    cur.execute(db.sql.import_sources_present)
    if not cur.fetchone().present:
        return []
    cur.execute(db.sql.import_source_kek_versions)
    return [row.kek_version for row in cur.fetchall()]
