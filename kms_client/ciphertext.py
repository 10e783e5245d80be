"""The KMS's one ciphertext format, as the server writes it (docs/API.md, "Ciphertext format"):
the SDK encrypting locally with a fetched DEK writes the same bytes, so the server decrypts what
the SDK wrote and the SDK what the server wrote.

    format (1 byte, 0x01) | key id (16) | key version (4, big endian) | nonce (12) | AES-256-GCM ciphertext | tag (16)

key id = HMAC-SHA256(DEK, "kms-key-id-v1")[:16]; associated data = "kms-ciphertext-v1" || the
21-byte header || the canonical encoding of the context (a flat str -> str mapping).
"""
import hashlib
import hmac
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

FORMAT_V1 = 0x01
_HEADER = struct.Struct(">B16sI")
HEADER_BYTES = _HEADER.size
NONCE_BYTES, TAG_BYTES = 12, 16
OVERHEAD = HEADER_BYTES + NONCE_BYTES + TAG_BYTES
_COUNT = struct.Struct(">I").pack


class Unreadable(Exception):
    """Not this key version's ciphertext with this context: altered, of another key or context."""


def key_id(dek: bytes) -> bytes:
    return hmac.new(dek, b"kms-key-id-v1", hashlib.sha256).digest()[:16]


def canonical_context(context: dict | None) -> bytes:
    if not context:
        return _COUNT(0)
    pairs = sorted((str(key).encode(), str(value).encode()) for key, value in context.items())
    return _COUNT(len(pairs)) + b"".join(_COUNT(len(k)) + k + _COUNT(len(v)) + v for k, v in pairs)


def is_ciphertext(blob: bytes) -> bool:
    return len(blob) >= OVERHEAD and blob[0] == FORMAT_V1


def version_of(blob: bytes) -> int:
    if not is_ciphertext(blob):
        raise Unreadable()
    return _HEADER.unpack_from(blob)[2]


def seal(dek: bytes, version: int, plaintext: bytes, context: dict | None = None) -> bytes:
    header = _HEADER.pack(FORMAT_V1, key_id(dek), version)
    nonce = os.urandom(NONCE_BYTES)
    return header + nonce + AESGCM(dek).encrypt(nonce, plaintext, b"kms-ciphertext-v1" + header
                                                + canonical_context(context))


def open_sealed(dek: bytes, blob: bytes, context: dict | None = None) -> bytes:
    version_of(blob)
    header = blob[:HEADER_BYTES]
    try:
        plaintext = AESGCM(dek).decrypt(blob[HEADER_BYTES:HEADER_BYTES + NONCE_BYTES], blob[HEADER_BYTES + NONCE_BYTES:],
                                        b"kms-ciphertext-v1" + header + canonical_context(context))
    except InvalidTag:
        raise Unreadable() from None
    if not hmac.compare_digest(header[1:17], key_id(dek)):
        raise Unreadable()
    return plaintext
