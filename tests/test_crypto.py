"""The pure crypto module: formats that stored data depends on, and what binds a wrapped DEK."""
import hashlib
import hmac
import os
import struct
import uuid

import pytest

from kms import crypto

OWNER = uuid.UUID("6f1c2a52-7d3e-4f57-9a0b-3c8e5d2f1a90")
REF_HASH = bytes(range(32))


def length_prefixed(*parts: bytes) -> bytes:
    return b"".join(struct.pack(">I", len(part)) + part for part in parts)


def test_keyed_hash_is_hmac_sha256_over_length_prefixed_parts():
    key = os.urandom(32)
    expected = hmac.new(key, b"purpose" + length_prefixed(b"ab", b"c"), hashlib.sha256).digest()
    assert crypto.keyed_hash(key, b"purpose", b"ab", b"c") == expected
    assert crypto.keyed_hash(key, b"purpose", b"ab", b"c") != crypto.keyed_hash(key, b"purpose", b"a", b"bc")


def test_dek_associated_data_keeps_its_stored_layout():
    # Every stored wrapped DEK was sealed with this exact associated data: it must never change.
    expected = b"\x01dek" + length_prefixed(OWNER.bytes, REF_HASH, struct.pack(">I", 7), struct.pack(">I", 2))
    assert crypto.dek_associated_data(OWNER, REF_HASH, 7, 2) == expected
    assert crypto.dek_associated_data(OWNER, memoryview(REF_HASH), 7, 2) == expected
    with pytest.raises(ValueError):
        crypto.dek_associated_data(OWNER, REF_HASH[:31], 7, 2)


@pytest.mark.parametrize("moved", ["owner", "reference", "version", "kek version"])
def test_a_wrapped_dek_opens_only_where_it_was_wrapped(moved):
    keyring = crypto.Keyring({1: os.urandom(32), 2: os.urandom(32)}, kek_active=2, db_secret=os.urandom(32))
    dek = crypto.new_dek()
    wrapped, kek_version = keyring.wrap_dek(dek, OWNER, REF_HASH, 3)
    assert kek_version == 2 and wrapped[:1] == crypto.FORMAT_V1 and dek not in wrapped
    assert keyring.unwrap_dek(wrapped, OWNER, REF_HASH, 3, kek_version) == dek
    elsewhere = {"owner": (uuid.uuid4(), REF_HASH, 3, 2), "reference": (OWNER, bytes(32), 3, 2),
                 "version": (OWNER, REF_HASH, 4, 2), "kek version": (OWNER, REF_HASH, 3, 1)}[moved]
    with pytest.raises(crypto.IntegrityError):
        keyring.unwrap_dek(wrapped, *elsewhere)


def test_a_tampered_or_unknown_format_ciphertext_fails():
    keyring = crypto.Keyring({1: os.urandom(32)}, kek_active=1, db_secret=os.urandom(32))
    wrapped, _ = keyring.wrap_dek(crypto.new_dek(), OWNER, REF_HASH, 1)
    flipped = bytearray(wrapped)
    flipped[-1] ^= 1
    for blob in (bytes(flipped), b"\x02" + wrapped[1:], wrapped[:20]):
        with pytest.raises(crypto.IntegrityError):
            keyring.unwrap_dek(blob, OWNER, REF_HASH, 1, 1)
