"""Logins that repeat are cheap: a client that logs in again with the password it last logged in
with, within LOGIN_REPEAT_WINDOW, is answered without a new Argon2 hash.

Some clients log in before every call (the original's Go SDK never keeps a token). Hashing each of
those logins would make a busy client's own logins queue for the hasher, and everyone else's with
them. So each process remembers, per client name, a keyed hash of the credential it last verified
(never the password: an HMAC under a key made at start and never stored), with the client row's
password hash and session epoch at that moment. A login that presents the same credential skips
the hash only if the client row it reads in its own transaction (its MAC checked) still has that
password hash and epoch and is active: a password change, a disable, a delete or a role change
(which moves the epoch) ends the shortcut at once, in every process. A wrong password never
matches, so it always pays the full hash and the throttles, and its timing is unchanged.
"""
import hmac
import os
import threading
import time
from contextlib import contextmanager
from typing import NamedTuple

from kms.expiring import ExpiringMap


class Verified(NamedTuple):
    credential: bytes  # keyed hash of (name, password)
    password_hash: str  # the client row's, when it was verified
    epoch: int


class RecentLogins:
    def __init__(self, window_s: float, size: int = 10_000):
        self.window_s = window_s
        self._key = os.urandom(32)
        self._entries = ExpiringMap(size)
        self._turns_lock = threading.Lock()
        self._turns: dict[bytes, list] = {}  # name -> [its lock, how many hold or wait for it]

    @contextmanager
    def turn(self, name_hash: bytes, patience_s: float):
        """One full login per client name at a time in this process; the others wait (up to
        `patience_s`, then go on regardless), so that a burst of logins of one client (a client
        that logs in from many threads at once) hashes once, and the rest find the credential
        remembered."""
        with self._turns_lock:
            turn = self._turns.setdefault(name_hash, [threading.Lock(), 0])
            turn[1] += 1
        acquired = turn[0].acquire(timeout=patience_s)
        try:
            yield
        finally:
            if acquired:
                turn[0].release()
            with self._turns_lock:
                turn[1] -= 1
                if not turn[1]:
                    del self._turns[name_hash]

    def _credential(self, name_hash: bytes, password: str) -> bytes:
        return hmac.new(self._key, name_hash + b"\x00" + password.encode(), "sha256").digest()

    def remembered(self, name_hash: bytes, password: str) -> Verified | None:
        """What was verified for this name with this very password within the window, if anything."""
        if not self.window_s:
            return None
        entry = self._entries.get(name_hash, time.monotonic())
        if entry is None or not hmac.compare_digest(entry.credential, self._credential(name_hash, password)):
            return None
        return entry

    def remember(self, name_hash: bytes, password: str, password_hash: str, epoch: int):
        if self.window_s:
            self._entries.put(name_hash, Verified(self._credential(name_hash, password), password_hash, epoch),
                              time.monotonic() + self.window_s)

    def forget(self, name_hash: bytes):
        self._entries.put(name_hash, None, 0.0)  # expired at once
