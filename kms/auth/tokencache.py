"""Bearer tokens whose signature was already verified, until they expire.

Verifying a JWT costs more CPU than the rest of a key lookup; a service sends the same token
many times. Only the signature check is remembered: every request still checks the token's
session row in the database, so logout and revocation still take effect at once.
"""
import hashlib
import threading
import time
from collections import OrderedDict


class VerifiedTokenCache:
    def __init__(self, size: int = 4096):
        self._size = size
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _key(token: str) -> bytes:
        return hashlib.sha256(token.encode()).digest()  # tokens themselves are not kept

    def get(self, token: str):
        key = self._key(token)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            claims, expires_at = entry
            if expires_at <= time.time():
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return claims

    def put(self, token: str, claims, expires_at: float):
        key = self._key(token)
        with self._lock:
            self._entries[key] = (claims, expires_at)
            self._entries.move_to_end(key)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)
