"""A KEK that never leaves a PKCS#11 token (an HSM, or SoftHSM): `KEK_2=pkcs11:token=kms;object=kek-2`.

DEKs are sealed and opened inside the token with CKM_AES_GCM, our nonce and our associated data,
so the stored format is the one software AES-GCM makes. The key must be a secret AES-256 key that
is sensitive and not extractable; start-up checks that, and a canary seal and open.

Sessions: the module is loaded and logged in to once per process (PKCS11_PIN or PKCS11_PIN_FILE);
each thread opens its own session (a PKCS#11 session is not for concurrent use), and a forked
child starts over (C_Initialize again: a module's state does not survive fork). Calls into the
module take turns under one lock per process: python-pkcs11 initialises it with no locking
arguments, which by the PKCS#11 standard lets a module assume one thread at a time (SoftHSM2
crashed under eight threads without the lock). When the token
goes away (an HSM restart), operations raise KekUnavailable (503) and the next one opens fresh
sessions, so the service heals when the token is back.
"""
import os
import threading

from cryptography.exceptions import InvalidTag

from kms.config import Pkcs11Uri
from kms.keyproviders.base import Kek, KekUnavailable

GCM_TAG_BITS = 128


class Pkcs11Module:
    """One loaded PKCS#11 library per process, logged in once, a session per thread."""

    def __init__(self, path: str, pin: str):
        import pkcs11  # python-pkcs11: only deployments with an HSM need it loaded
        self._pkcs11 = pkcs11
        self._path = path
        self._pin = pin
        self._lock = threading.Lock()
        self.calls = threading.RLock()  # one call into the module at a time (see the docstring)
        self._generation = 0
        self._tokens: dict = {}
        self._logged_in: set = set()
        self._local = threading.local()
        self.lib = pkcs11.lib(path)
        os.register_at_fork(after_in_child=self._after_fork)

    def __repr__(self):
        return f"Pkcs11Module({self._path!r})"

    def _after_fork(self):
        self._lock = threading.Lock()
        self.calls = threading.RLock()
        self._local = threading.local()
        self._tokens.clear()
        self._logged_in.clear()
        self._generation += 1
        self.lib.reinitialize()

    def session(self, token_label: str):
        """This thread's session on the token (opened, and the token logged in to, on first use).
        Call with `calls` held."""
        sessions = getattr(self._local, "sessions", None)
        if sessions is None or self._local.generation != self._generation:
            sessions = self._local.sessions = {}
            self._local.generation = self._generation
        session = sessions.get(token_label)
        if session is None:
            session = sessions[token_label] = self._open(token_label)
        return session

    def _open(self, token_label: str):
        with self._lock:
            token = self._tokens.get(token_label)
            if token is None:
                token = self._tokens[token_label] = self.lib.get_token(token_label=token_label)
            if token_label not in self._logged_in:
                try:
                    session = token.open(rw=True, user_pin=self._pin)  # logs the whole process in
                except self._pkcs11.UserAlreadyLoggedIn:
                    session = token.open(rw=True)
                self._logged_in.add(token_label)
                return session
        return token.open(rw=True)

    def forget_sessions(self):
        """After the token went away: every thread opens new sessions, and logs in again."""
        with self.calls, self._lock:
            self._tokens.clear()
            self._logged_in.clear()
            self._generation += 1
        try:
            self.lib.reinitialize()
        except self._pkcs11.PKCS11Error:
            pass


class Pkcs11Kek(Kek):
    provider = "pkcs11"

    def __init__(self, module: Pkcs11Module, uri: Pkcs11Uri):
        self.module = module
        self.uri = uri
        self._local = threading.local()

    def __repr__(self):
        return f"Pkcs11Kek({self.uri})"

    def describe(self) -> str:
        return f"pkcs11 {self.uri}"

    def _key(self):
        session = self.module.session(self.uri.token)
        cached = getattr(self._local, "key", None)
        if cached is not None and cached[0] is session:
            return cached[1]
        pkcs11 = self.module._pkcs11
        key = session.get_key(object_class=pkcs11.ObjectClass.SECRET_KEY, key_type=pkcs11.KeyType.AES,
                              label=self.uri.object)
        self._local.key = (session, key)
        return key

    def _run(self, operation, nonce: bytes, data: bytes, associated_data: bytes) -> bytes:
        """Seal or open in the token. A failure that is not the ciphertext's opens fresh sessions
        (after an HSM restart the old ones are void) and tries once more before it is a 503."""
        pkcs11 = self.module._pkcs11
        params = pkcs11.GCMParams(nonce, associated_data, GCM_TAG_BITS)
        for attempt in (1, 2):
            try:
                with self.module.calls:
                    key = self._key()
                    return getattr(key, operation)(data, mechanism=pkcs11.Mechanism.AES_GCM, mechanism_param=params)
            except pkcs11.PKCS11Error as error:
                if operation == "decrypt" and self._answers():
                    raise InvalidTag() from None  # the token is fine: the ciphertext is not
                self.module.forget_sessions()
                if attempt == 2:
                    raise KekUnavailable(f"the PKCS#11 token for {self.uri} does not answer "
                                         f"({type(error).__name__})") from None

    def _answers(self) -> bool:
        """Whether the token still works (tokens answer a failed tag check with a general error)."""
        try:
            with self.module.calls:
                self._key().encrypt(b"probe", mechanism=self.module._pkcs11.Mechanism.AES_GCM,
                                    mechanism_param=self.module._pkcs11.GCMParams(os.urandom(12), b"", GCM_TAG_BITS))
            return True
        except self.module._pkcs11.PKCS11Error:
            return False

    def encrypt(self, nonce: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
        return self._run("encrypt", nonce, plaintext, associated_data)

    def decrypt(self, nonce: bytes, ciphertext: bytes, associated_data: bytes) -> bytes:
        return self._run("decrypt", nonce, ciphertext, associated_data)

    def problems(self) -> list[str]:
        """What is wrong with the key for a KEK (empty when nothing is)."""
        attribute = self.module._pkcs11.Attribute
        found = []
        with self.module.calls:
            key = self._key()
            if key[attribute.EXTRACTABLE]:
                found.append("is extractable (CKA_EXTRACTABLE must be false)")
            if not key[attribute.SENSITIVE]:
                found.append("is not sensitive (CKA_SENSITIVE must be true)")
            if key[attribute.VALUE_LEN] != 32:
                found.append("is not a 256-bit AES key")
        return found


def generate_key(module: Pkcs11Module, uri: Pkcs11Uri):
    """A new AES-256 key in the token under the URI's label: stored, sensitive, never extractable.
    Refuses when an object with that label exists."""
    pkcs11 = module._pkcs11
    attribute = pkcs11.Attribute
    with module.calls:
        session = module.session(uri.token)
        if list(session.get_objects({attribute.LABEL: uri.object})):
            raise ValueError(f"the token already holds an object labelled {uri.object!r}; not overwritten")
        session.generate_key(pkcs11.KeyType.AES, 256, label=uri.object, store=True,
                             template={attribute.EXTRACTABLE: False, attribute.SENSITIVE: True,
                                       attribute.ENCRYPT: True, attribute.DECRYPT: True, attribute.TOKEN: True})
