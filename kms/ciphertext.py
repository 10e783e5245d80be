"""The one ciphertext format of key operations, on the server and in the SDK alike. Pure: no Flask.

    offset  size  field
    0       1     format (0x01)
    1       16    key id: the first 16 bytes of HMAC-SHA256(DEK, "kms-key-id-v1"), a commitment to
                  the key version's DEK (AES-GCM alone is not key-committing)
    17      4     key version, big endian
    21      12    nonce
    33      n     AES-256-GCM ciphertext of the n-byte plaintext
    33+n    16    GCM tag

Associated data: "kms-ciphertext-v1" || the 21-byte header || the canonical encoding of the
context. The DEK itself belongs to one owner, key and version, so the ciphertext is bound to them
as well as to its context. On the wire it is base64url without padding. kms_client writes and
reads the same bytes (kms_client/envelope.py); a test holds the two together.
"""
import functools
import hashlib
import hmac
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

FORMAT_V1 = 0x01
KEY_ID_BYTES = 16
NONCE_BYTES = 12
TAG_BYTES = 16
_HEADER = struct.Struct(">B16sI")
HEADER_BYTES = _HEADER.size  # 21
OVERHEAD = HEADER_BYTES + NONCE_BYTES + TAG_BYTES  # 49
_AD_PURPOSE = b"kms-ciphertext-v1"
_KEY_ID_PURPOSE = b"kms-key-id-v1"
_COUNT = struct.Struct(">I").pack
MAX_VERSION = 2**31 - 1


class DecryptionFailed(Exception):
    """Not a ciphertext of this key version with this context: whatever was wrong, one answer."""


def key_id(dek: bytes) -> bytes:
    return hmac.new(dek, _KEY_ID_PURPOSE, hashlib.sha256).digest()[:KEY_ID_BYTES]


def canonical_context(context: dict | None) -> bytes:
    """A context (flat str -> str) as bytes that do not depend on the order its pairs came in:
    the count, then each key and value length-prefixed, sorted by key's UTF-8 bytes."""
    if not context:
        return _EMPTY_CONTEXT
    return _canonical_pairs(tuple(context.items()))


_EMPTY_CONTEXT = _COUNT(0)


@functools.lru_cache(maxsize=4096)  # a batch's items mostly share their context
def _canonical_pairs(pairs: tuple) -> bytes:
    encoded = sorted((key.encode(), value.encode()) for key, value in pairs)
    return _COUNT(len(encoded)) + b"".join(_COUNT(len(k)) + k + _COUNT(len(v)) + v for k, v in encoded)


def header_version(blob: bytes) -> int:
    """The key version a ciphertext names (unauthenticated until it is opened); DecryptionFailed
    when it is not one of ours at all."""
    if len(blob) < OVERHEAD or blob[0] != FORMAT_V1:
        raise DecryptionFailed()
    version = _HEADER.unpack_from(blob)[2]
    if not 1 <= version <= MAX_VERSION:
        raise DecryptionFailed()
    return version


def seal(dek: bytes, version: int, plaintext: bytes, context: dict | None = None, aead: AESGCM | None = None,
         dek_id: bytes | None = None) -> bytes:
    """`aead` and `dek_id` may be passed in when many items share one DEK (a batch)."""
    header = _HEADER.pack(FORMAT_V1, dek_id or key_id(dek), version)
    nonce = os.urandom(NONCE_BYTES)
    return header + nonce + (aead or AESGCM(dek)).encrypt(nonce, plaintext,
                                                          _AD_PURPOSE + header + canonical_context(context))


def open_sealed(dek: bytes, blob: bytes, context: dict | None = None, aead: AESGCM | None = None,
                dek_id: bytes | None = None) -> bytes:
    """The plaintext, or DecryptionFailed. The tag is checked even when the key id already shows
    another key, so a wrong key costs what a wrong context or an altered byte costs."""
    header_version(blob)
    header = blob[:HEADER_BYTES]
    same_key = hmac.compare_digest(header[1:1 + KEY_ID_BYTES], dek_id or key_id(dek))
    try:
        plaintext = (aead or AESGCM(dek)).decrypt(blob[HEADER_BYTES:HEADER_BYTES + NONCE_BYTES],
                                                  blob[HEADER_BYTES + NONCE_BYTES:],
                                                  _AD_PURPOSE + header + canonical_context(context))
    except InvalidTag:
        raise DecryptionFailed() from None
    if not same_key:
        raise DecryptionFailed()
    return plaintext
