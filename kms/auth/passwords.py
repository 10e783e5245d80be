"""Password hashing with Argon2id (PHC strings), under bounded concurrency, and the password policy.

Hashing is deliberately expensive: a login flood must queue here, briefly, or be turned away,
instead of starving key requests of CPU and server threads.
"""
import os
import threading
from contextlib import contextmanager

from cryptography.exceptions import InvalidKey
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from kms.errors import Throttled

# OWASP's minimum for Argon2id: 19 MiB, 2 iterations, 1 lane. The PHC string records them, so
# raising them later still verifies old hashes.
MEMORY_KIB = 19 * 1024
ITERATIONS = 2
LANES = 1


class PasswordHasher:
    """Argon2id with two bounds. At most `concurrency` hashes run at once (default: one core fewer
    than the machine has, so hashing never takes every core), and at most `admitted` logins or
    signups are in progress (see admission()); a further one is refused at once with 429 instead
    of holding a server thread that key requests need. Measured: without the second bound, a login
    flood took every waitress thread and cut key look-ups to 7 % of their throughput.

    An admitted login waits up to `wait_s` for a hashing slot, so a short burst (the original Go
    SDK logs in before nearly every call, from every goroutine at once, and never retries a 429)
    queues and succeeds; only a flood that outlasts the wait gets 429."""

    def __init__(self, concurrency: int | None = None, admitted: int | None = None, wait_s: float = 2.0):
        self.wait_s = wait_s
        self.concurrency = concurrency or max(1, (os.cpu_count() or 2) - 1)
        self._hashing = threading.BoundedSemaphore(self.concurrency)
        self._admitted = threading.BoundedSemaphore(admitted or 4 * self.concurrency)
        # Verified against when a client does not exist, so unknown names cost the same time.
        self._dummy = self._derive(os.urandom(32))

    @staticmethod
    def _derive(password: bytes) -> str:
        kdf = Argon2id(salt=os.urandom(16), length=32, iterations=ITERATIONS, lanes=LANES, memory_cost=MEMORY_KIB)
        return kdf.derive_phc_encoded(password)

    @contextmanager
    def admission(self):
        """Hold a place in the line for hashing for a whole login or signup, taken before any
        other work, so a refused request costs next to nothing."""
        if not self._admitted.acquire(blocking=False):
            raise Throttled(1, "Too many logins in progress; retry in a second.")
        try:
            yield
        finally:
            self._admitted.release()

    @contextmanager
    def _slot(self):
        if not self._hashing.acquire(timeout=self.wait_s):
            raise Throttled(1, "Too many logins in progress; retry in a second.")
        try:
            yield
        finally:
            self._hashing.release()

    def hash(self, password: str) -> str:
        with self._slot():
            return self._derive(password.encode())

    def verify(self, password: str, phc: str | None) -> bool:
        """Constant work whether or not the client exists: pass phc=None for an unknown client."""
        with self._slot():
            try:
                Argon2id.verify_phc_encoded(password.encode(), phc or self._dummy)
            except (InvalidKey, ValueError):
                return False
            return phc is not None
