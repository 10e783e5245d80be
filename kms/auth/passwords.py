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
    `admitted` (with waiting always allowed, every thread would wait during a flood).

    Fairly: no source address and no client name holds more than `share` of the places at once
    (a further login of theirs is refused at once), and a flood is a source's, not everyone's: a
    source refused within `wait_s` may not wait for a place and is shed before Flask
    (kms.auth.flood), while other sources' logins still queue and get their turn."""

    def __init__(self, concurrency: int | None = None, admitted: int | None = None, wait_s: float = 2.0,
                 gate: HashGate | None = None):
        self.wait_s = wait_s
        # Hashing slots and the flood signal are host-wide when worker processes share a gate;
        # the admission places stay per process, as they guard this process's server threads.
        self._gate = gate or HashGate(concurrency, shared=False)
        self.concurrency = self._gate.concurrency
        self._hashing = self._gate.hashing
        places = admitted or 4 * self.concurrency
        self.places = places
        self.share = max(1, places // 2)
        self._admitted = threading.BoundedSemaphore(places)
        self._waiting = threading.BoundedSemaphore(places)  # places in the line for a place
        self._holders_lock = threading.Lock()
        self._by_source: dict[str, int] = {}
        self._by_name: dict[str, int] = {}
        self._refused_at: dict[str, float] = {}  # source -> when one of its logins was last refused
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
    def admission(self, source: str = "", name: str = ""):
        """Hold a place in the line for hashing for a whole login or signup, taken before any
        other work, so a refused request costs next to nothing. `source`: the caller's address;
        `name`: the client name it logs in as (none for a signup)."""
        self._claim(source, name)
        try:
            if not self._admitted.acquire(blocking=False) and not self._wait_for_place(source):
                self._refused(source)
                raise Throttled(FLOOD_RETRY_AFTER_S, FLOOD_MESSAGE)
            try:
                yield
            except Throttled:  # no hashing slot or client lock in time: this source floods
                self._refused(source)
                raise
            finally:
                self._admitted.release()
        finally:
            self._release(source, name)

    def _claim(self, source: str, name: str):
        with self._holders_lock:
            if self._by_source.get(source, 0) >= self.share or (name and self._by_name.get(name, 0) >= self.share):
                self._note_refusal(source)
                raise Throttled(FLOOD_RETRY_AFTER_S, FLOOD_MESSAGE)
            self._by_source[source] = self._by_source.get(source, 0) + 1
            if name:
                self._by_name[name] = self._by_name.get(name, 0) + 1

    def _release(self, source: str, name: str):
        with self._holders_lock:
            for holders, key in ((self._by_source, source), (self._by_name, name)):
                if key or holders is self._by_source:
                    left = holders.get(key, 1) - 1
                    if left > 0:
                        holders[key] = left
                    else:
                        holders.pop(key, None)

    def _refused(self, source: str):
        with self._holders_lock:
            self._note_refusal(source)

    def _note_refusal(self, source: str):
        now = time.monotonic()
        if len(self._refused_at) >= 10_000:  # forget sources quiet for longer than a flood lasts
            self._refused_at = {key: at for key, at in self._refused_at.items() if now - at < self.wait_s}
        self._refused_at[source] = now
        self._gate.refused()

    def _flooding(self, source: str) -> bool:
        return time.monotonic() - self._refused_at.get(source, float("-inf")) < self.wait_s

    def flooded(self, source: str = "") -> bool:
        """This source floods (one of its logins was refused within `wait_s`) and it holds its
        share of the places, or every place is taken: a login from it now would be refused."""
        if not self._flooding(source):
            return False
        if self._by_source.get(source, 0) >= self.share:
            return True
        if self._admitted.acquire(False):
            self._admitted.release()
            return False
        return True

    def refuse_if_flooded(self, source: str = "") -> bool:
        """flooded(), and if so the refusal counts as one (this source's flood goes on)."""
        if not self.flooded(source):
            return False
        self._refused(source)
        return True

    def _wait_for_place(self, source: str) -> bool:
        if self._flooding(source) or not self._waiting.acquire(False):
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
