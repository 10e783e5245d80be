"""The DEKs the server-side operations unwrapped, kept for a short while in the process, so that a
request for a key used recently needs one statement (the token, the key row and the audit record
at once) rather than a read before its work and a write after it.

An entry is found by owner and hashed reference, and holds the key row's id and current version
as last read, with the DEKs of the versions used. Nothing in it is believed on its own: the
statement checks that the key row still has that id, still serves every version used and (for
encryption) still has that current version, and writes the audit record only if so; otherwise the
request is worked out again from a fresh read (kms.operations.service). A DEK never changes for a
given key row and version, so an entry can be stale but never wrong. It holds DEKs in plaintext in
the process's memory for at most OPERATION_KEY_CACHE (docs/SECURITY.md).
"""
import time
from dataclasses import dataclass, field

from kms.expiring import ExpiringMap


@dataclass
class CachedKey:
    key_id: int
    current: int
    deks: dict = field(default_factory=dict)  # version -> (AESGCM, key id)


class OperationKeys:
    def __init__(self, ttl_s: float, size: int = 10_000):
        self.ttl_s = ttl_s
        self._entries = ExpiringMap(size)

    def __repr__(self):  # it holds key material
        return f"OperationKeys(ttl_s={self.ttl_s})"

    def get(self, address: tuple) -> CachedKey | None:
        if not self.ttl_s:
            return None
        return self._entries.get(address, time.monotonic())

    def put(self, address: tuple, key_id: int, current: int, deks: dict):
        """What a request read and unwrapped, merged into what is kept for the same key row."""
        if not self.ttl_s:
            return
        kept = self._entries.get(address, time.monotonic())
        if kept is None or kept.key_id != key_id:
            kept = CachedKey(key_id, current)
        kept.current = current
        kept.deks.update(deks)
        self._entries.put(address, kept, time.monotonic() + self.ttl_s)
