"""Password hashing with Argon2id (PHC strings), under bounded concurrency, and the password policy.

Hashing is deliberately expensive: a login flood must queue here, briefly, or be turned away,
instead of starving key requests of CPU and server threads.

Clients imported from the original KMS (`kms import-seed`) arrive with its bcrypt hashes; each is
checked once, at the client's first login, and replaced by an Argon2id hash (verify_login).
"""
import multiprocessing
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import bcrypt
from cryptography.exceptions import InvalidKey
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from kms.errors import Throttled

# OWASP's minimum for Argon2id: 19 MiB, 2 iterations, 1 lane. The PHC string records them, so
# raising them later still verifies old hashes.
MEMORY_KIB = 19 * 1024
ITERATIONS = 2
LANES = 1

# The original hashed passwords with bcrypt at cost 10 (its pkg/hashing/hashing.go, HashPassword;
# golang.org/x/crypto/bcrypt writes the $2a$ prefix). The dummy below is checked wherever no bcrypt
# hash is, while imported ones remain: a cost-10 hash of random bytes nobody kept; what it
# answers is never used, only the time it takes.
BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")
BCRYPT_DUMMY = b"$2a$10$GLvfYAvmZ2VB4Gxe6MaRBe3vpyNJUlYCqp5gBwAxFJ7qupuYEs7zO"
BCRYPT_KEY_BYTES = 72  # bcrypt's key schedule reads no further; Go's x/crypto/bcrypt ignores the rest as well

FLOOD_MESSAGE = "Too many logins in progress; retry in a second."
FLOOD_RETRY_AFTER_S = 1
HASHING_NICENESS = 10


class HashGate:
    """What bounds hashing on the whole host: `concurrency` hashes at once (default: one core fewer
    than the machine has, so hashing never takes every core) and when a login was last refused.
    Made with shared=True in a server's parent before it forks its workers, so that N workers
    still run at most `concurrency` hashes, not N times as many."""

    def __init__(self, concurrency: int | None = None, *, shared: bool):
        self.concurrency = concurrency or max(1, (os.cpu_count() or 2) - 1)
        if shared:
            context = multiprocessing.get_context("fork")
            self.hashing = context.BoundedSemaphore(self.concurrency)
            self._last_refusal = context.RawValue("d", float("-inf"))  # a race here only blurs a timestamp
        else:
            self.hashing = threading.BoundedSemaphore(self.concurrency)
            self._last_refusal = _Cell(float("-inf"))

    def refused(self):
        self._last_refusal.value = time.monotonic()  # CLOCK_MONOTONIC: one clock for the whole host

    def seconds_since_refusal(self) -> float:
        return time.monotonic() - self._last_refusal.value


class _Cell:
    def __init__(self, value):
        self.value = value


class PasswordHasher:
    """Argon2id with two bounds. At most `concurrency` hashes run at once (see HashGate), and at most `admitted` logins or
    signups are in progress (see admission()); a further one is refused at once with 429 instead
    of holding a server thread that key requests need (without that bound, a login flood takes
    every server thread and key look-ups with them).

    A short burst (the original Go SDK logs in before nearly every call, from every goroutine at
    once, and never retries a 429) must queue and succeed, but every login that waits holds a
    server thread. So a login that finds every place taken waits (up to `wait_s`, as many waiting
    as there are places) only while logins are not being refused: once one was refused in the last
    `wait_s`, a flood is on, and further ones are refused at once until it has been quiet that
    long. A burst after a quiet spell queues; a sustained flood holds no more threads than
    `admitted` (with waiting always allowed, every thread would wait during a flood)."""

    def __init__(self, concurrency: int | None = None, admitted: int | None = None, wait_s: float = 2.0,
                 gate: HashGate | None = None):
        self.wait_s = wait_s
        # Hashing slots and the flood signal are host-wide when worker processes share a gate;
        # the admission places stay per process, as they guard this process's server threads.
        self._gate = gate or HashGate(concurrency, shared=False)
        self.concurrency = self._gate.concurrency
        self._hashing = self._gate.hashing
        places = admitted or 4 * self.concurrency
        self._admitted = threading.BoundedSemaphore(places)
        self._waiting = threading.BoundedSemaphore(places)  # places in the line for a place
        # Hashes run on threads of their own at a lower CPU priority, so that during a login flood
        # the cores go to key requests first whenever those need them.
        self._hashers = ThreadPoolExecutor(self.concurrency, thread_name_prefix="argon2",
                                           initializer=_lower_this_threads_priority)
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
        if not self._admitted.acquire(blocking=False) and not self._wait_for_place():
            self._gate.refused()
            raise Throttled(FLOOD_RETRY_AFTER_S, FLOOD_MESSAGE)
        try:
            yield
        except Throttled:  # no hashing slot or client lock in time: a flood is on
            self._gate.refused()
            raise
        finally:
            self._admitted.release()

    def flooded(self) -> bool:
        """A flood is on (a login was refused within `wait_s`) and every place is taken: a login
        arriving now would be refused at once."""
        if self._gate.seconds_since_refusal() >= self.wait_s:
            return False
        if self._admitted.acquire(False):
            self._admitted.release()
            return False
        return True

    def refuse_if_flooded(self) -> bool:
        """flooded(), and if so the refusal counts as one (the flood goes on)."""
        if not self.flooded():
            return False
        self._gate.refused()
        return True

    def _wait_for_place(self) -> bool:
        if self._gate.seconds_since_refusal() < self.wait_s or not self._waiting.acquire(False):
            return False
        try:
            return self._admitted.acquire(True, self.wait_s)
        finally:
            self._waiting.release()

    @contextmanager
    def _slot(self):
        if not self._hashing.acquire(True, self.wait_s):  # threading's and multiprocessing's alike
            raise Throttled(FLOOD_RETRY_AFTER_S, FLOOD_MESSAGE)
        try:
            yield
        finally:
            self._hashing.release()

    def hash(self, password: str) -> str:
        with self._slot():
            return self._hashers.submit(self._derive, password.encode()).result()

    def verify(self, password: str, phc: str | None) -> bool:
        """Constant work whether or not the client exists: pass phc=None for an unknown client."""
        with self._slot():
            matched = self._hashers.submit(_verify, password.encode(), phc or self._dummy).result()
            return matched and phc is not None

    def verify_login(self, password: str, stored: str | None, *, imported_remain: bool) -> tuple[bool, str | None]:
        """A login's check: (the password matches, the Argon2id hash to store in place of a bcrypt
        hash it matched, else None). While imported bcrypt hashes remain anywhere (the caller asks
        the database), every check does one bcrypt and one Argon2id computation, whatever it is
        checked against: so a client still holding an imported hash, any other client and an unknown
        name cost the same. Once none remains, it is verify()."""
        if not imported_remain and not is_bcrypt(stored):
            return self.verify(password, stored), None
        with self._slot():
            return self._hashers.submit(self._verify_either, password.encode(), stored).result()

    def _verify_either(self, password: bytes, stored: str | None) -> tuple[bool, str | None]:
        if is_bcrypt(stored):
            matched = _bcrypt_matches(password, stored.encode())
            replacement = self._derive(password)  # the Argon2id work every path does, kept if it matched
            return matched, replacement if matched else None
        matched = _verify(password, stored or self._dummy) and stored is not None
        _bcrypt_matches(password, BCRYPT_DUMMY)
        return matched, None


def _lower_this_threads_priority():
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HASHING_NICENESS)  # Linux: this thread
    except (OSError, AttributeError):
        pass  # elsewhere, hashes run at the process's priority


def is_bcrypt(stored: str | None) -> bool:
    return stored is not None and stored.startswith(BCRYPT_PREFIXES)


def _bcrypt_matches(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password[:BCRYPT_KEY_BYTES], hashed)
    except ValueError:  # not a hash bcrypt can read
        return False


def _verify(password: bytes, phc: str) -> bool:
    try:
        Argon2id.verify_phc_encoded(password, phc)
    except (InvalidKey, ValueError):
        return False
    return True
