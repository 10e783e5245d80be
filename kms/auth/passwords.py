"""Password hashing with Argon2id (PHC strings), under bounded concurrency.

Hashing is deliberately expensive. A semaphore sized to the cores bounds how many hashes run at
once, so a login flood queues here instead of starving key requests of CPU.
"""
import os
import threading

from cryptography.exceptions import InvalidKey
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

# OWASP's minimum for Argon2id: 19 MiB, 2 iterations, 1 lane. The PHC string records them, so
# raising them later still verifies old hashes.
MEMORY_KIB = 19 * 1024
ITERATIONS = 2
LANES = 1


class PasswordHasher:
    def __init__(self, concurrency: int | None = None):
        self._slots = threading.BoundedSemaphore(concurrency or os.cpu_count() or 2)
        # Verified against when a client does not exist, so unknown names cost the same time.
        self._dummy = self._derive(os.urandom(32))

    @staticmethod
    def _derive(password: bytes) -> str:
        kdf = Argon2id(salt=os.urandom(16), length=32, iterations=ITERATIONS, lanes=LANES, memory_cost=MEMORY_KIB)
        return kdf.derive_phc_encoded(password)

    def hash(self, password: str) -> str:
        with self._slots:
            return self._derive(password.encode())

    def verify(self, password: str, phc: str | None) -> bool:
        """Constant work whether or not the client exists: pass phc=None for an unknown client."""
        with self._slots:
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
