"""Files of any size encrypted locally under one data key from the KMS (`kms-client encrypt`).

The KMS makes a fresh 32-byte data key once per file (generate-data-key) and returns it with its
ciphertext under the caller's key; the file is then encrypted here, in chunks, and only the data
key's ciphertext travels with it. Layout:

    "KMSF" | format (1 byte, 0x01) | chunk size (4 bytes, big endian) | nonce prefix (7 bytes)
           | length of the data key's ciphertext (2 bytes) | the data key's ciphertext (the KMS's format)
    chunk 0 | chunk 1 | ... | last chunk

Each chunk is AES-256-GCM under the data key of `chunk size` bytes of plaintext (the last one of
fewer, maybe none) plus a 16-byte tag, with nonce = prefix || chunk number (4 bytes) || 1 for the
last chunk and 0 otherwise, and the first 16 header bytes as associated data. So a chunk moved,
dropped or repeated fails, and so does a file cut short at a chunk boundary (no chunk says it is
the last); changing the header's fixed part fails every chunk. The data key's ciphertext is not
under the chunks' associated data, so `kms-client reencrypt` can move it to another key version (or
key) without touching the chunks; another file's would open to another data key, and fail.

Plaintext is written out chunk by chunk as each is authenticated: output is whole only when the
command ends without an error (exit code 0).
"""
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"KMSF"
FORMAT_V1 = 0x01
CHUNK_BYTES = 64 * 1024
_FIXED = struct.Struct(">4sBI7s")  # magic, format, chunk size, nonce prefix: the chunks' associated data
_LENGTH = struct.Struct(">H")
TAG_BYTES = 16
MAX_CHUNK = 16 * 1024 * 1024


class StreamError(Exception):
    """The stream is not one of ours, or fails authentication (altered, reordered, truncated)."""


def _nonce(prefix: bytes, number: int, last: bool) -> bytes:
    if number >= 2**32:
        raise StreamError("too many chunks")
    return prefix + number.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


def _read_full(source, size: int) -> bytes:
    parts, left = [], size
    while left:
        part = source.read(left)
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def write_header(sink, wrapped_key: bytes, chunk_bytes: int = CHUNK_BYTES) -> tuple[bytes, bytes]:
    """Write the header; returns (the chunks' associated data, the nonce prefix)."""
    prefix = os.urandom(7)
    fixed = _FIXED.pack(MAGIC, FORMAT_V1, chunk_bytes, prefix)
    sink.write(fixed + _LENGTH.pack(len(wrapped_key)) + wrapped_key)
    return fixed, prefix


def encrypt_stream(source, sink, data_key: bytes, wrapped_key: bytes, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Encrypt everything `source` (a binary file) holds into `sink`; returns the plaintext bytes."""
    fixed, prefix = write_header(sink, wrapped_key, chunk_bytes)
    aead, number, total = AESGCM(data_key), 0, 0
    while True:
        chunk = _read_full(source, chunk_bytes)
        last = len(chunk) < chunk_bytes
        sink.write(aead.encrypt(_nonce(prefix, number, last), chunk, fixed))
        total += len(chunk)
        number += 1
        if last:
            return total


def read_header(source) -> tuple[bytes, int, bytes, bytes]:
    """(the fixed part, chunk size, nonce prefix, the data key's ciphertext) of a stream."""
    fixed = _read_full(source, _FIXED.size)
    if len(fixed) < _FIXED.size:
        raise StreamError("not a KMS stream")
    magic, version, chunk_bytes, prefix = _FIXED.unpack(fixed)
    if magic != MAGIC or version != FORMAT_V1 or not 0 < chunk_bytes <= MAX_CHUNK:
        raise StreamError("not a KMS stream")
    length = _read_full(source, _LENGTH.size)
    if len(length) < _LENGTH.size:
        raise StreamError("the stream is truncated")
    wrapped_key = _read_full(source, _LENGTH.unpack(length)[0])
    if len(wrapped_key) < _LENGTH.unpack(length)[0]:
        raise StreamError("the stream is truncated")
    return fixed, chunk_bytes, prefix, wrapped_key


def decrypt_chunks(source, sink, data_key: bytes, fixed: bytes, chunk_bytes: int, prefix: bytes) -> int:
    """The chunks after a header: each written once it authenticates; StreamError on any fault."""
    aead, number, total = AESGCM(data_key), 0, 0
    while True:
        sealed = _read_full(source, chunk_bytes + TAG_BYTES)
        last = len(sealed) < chunk_bytes + TAG_BYTES
        if last and len(sealed) < TAG_BYTES:
            raise StreamError("the stream is truncated")
        try:
            chunk = aead.decrypt(_nonce(prefix, number, last), sealed, fixed)
        except InvalidTag:
            raise StreamError("the stream was altered or truncated, or the key or context differs") from None
        sink.write(chunk)
        total += len(chunk)
        number += 1
        if last:
            if source.read(1):
                raise StreamError("data after the stream's last chunk")
            return total


def copy_chunks(source, sink, chunk_bytes: int = 1024 * 1024):
    while True:
        part = source.read(chunk_bytes)
        if not part:
            return
        sink.write(part)
