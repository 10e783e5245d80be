"""Bearer tokens whose signature was already verified, until they expire.

Verifying a JWT costs more CPU than the rest of a key lookup; a service sends the same token
many times. Only the signature check is remembered: every request still checks the token's
session row in the database, so logout and revocation still take effect at once.
"""
import hashlib
import time

from kms.expiring import ExpiringMap


class VerifiedTokenCache:
    def __init__(self, size: int = 4096):
        self._entries = ExpiringMap(size)

    @staticmethod
    def _key(token: str) -> bytes:
        return hashlib.sha256(token.encode()).digest()  # tokens themselves are not kept

    def get(self, token: str):
        return self._entries.get(self._key(token), time.time())  # a JWT's exp is wall-clock time

    def put(self, token: str, claims, expires_at: float):
        self._entries.put(self._key(token), claims, expires_at)
