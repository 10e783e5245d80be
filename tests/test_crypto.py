"""The pure crypto module: formats that stored data depends on, and what binds a wrapped DEK."""
import hashlib
import hmac
import os
import struct
import uuid

import pytest

from kms import crypto
from kms.crypto import DekCache, IntegrityError, Keyring

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


class CountingTokenKek:
    """A KEK that counts its opens, standing for one in an HSM (where each open is a round trip)."""
    provider = "pkcs11"

    def __init__(self):
        from kms.keyproviders.environment import EnvironmentKek
        self._kek, self.opens = EnvironmentKek(os.urandom(32)), 0

    def encrypt(self, nonce, plaintext, ad):
        return self._kek.encrypt(nonce, plaintext, ad)

    def decrypt(self, nonce, ciphertext, ad):
        self.opens += 1
        return self._kek.decrypt(nonce, ciphertext, ad)


def test_the_hsm_dek_cache_is_bounded_in_age_and_size_and_keyed_by_what_was_authenticated(monkeypatch):
    import time as time_module
    token_kek = CountingTokenKek()
    keyring = Keyring({1: token_kek}, 1, os.urandom(32), dek_cache=DekCache(ttl_s=60, size=2))
    wrapped, kek_version = keyring.wrap_dek(b"d" * 32, OWNER, REF_HASH, 1)
    assert keyring.unwrap_dek(wrapped, OWNER, REF_HASH, 1, kek_version) == b"d" * 32
    assert keyring.unwrap_dek(wrapped, OWNER, REF_HASH, 1, kek_version) == b"d" * 32
    assert token_kek.opens == 1  # the second came from the cache
    tampered = wrapped[:-1] + bytes([wrapped[-1] ^ 1])
    with pytest.raises(IntegrityError):  # a changed blob is a miss, opened, and refused
        keyring.unwrap_dek(tampered, OWNER, REF_HASH, 1, kek_version)
    with pytest.raises(IntegrityError):  # the same blob at another address too
        keyring.unwrap_dek(wrapped, OWNER, REF_HASH, 2, kek_version)
    for version in (3, 4):  # two more entries: the first is evicted (size 2)
        keyring.unwrap_dek(keyring.wrap_dek(b"e" * 32, OWNER, REF_HASH, version)[0], OWNER, REF_HASH, version, 1)
    opens = token_kek.opens
    keyring.unwrap_dek(wrapped, OWNER, REF_HASH, 1, kek_version)
    assert token_kek.opens == opens + 1
    later = time_module.monotonic() + 61
    monkeypatch.setattr(time_module, "monotonic", lambda: later)
    keyring.unwrap_dek(wrapped, OWNER, REF_HASH, 1, kek_version)
    assert token_kek.opens == opens + 2  # expired after its 60 s


def test_environment_keks_are_never_cached():
    keyring = Keyring({1: os.urandom(32)}, 1, os.urandom(32), dek_cache=DekCache(ttl_s=60, size=10))
    wrapped, _ = keyring.wrap_dek(b"d" * 32, OWNER, REF_HASH, 1)
    keyring.unwrap_dek(wrapped, OWNER, REF_HASH, 1, 1)
    assert keyring._dek_cache.get((wrapped, OWNER, REF_HASH, 1, 1)) is None
