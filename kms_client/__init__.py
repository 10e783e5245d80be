"""Python SDK for the KMS: log in, fetch and cache DEKs, and encrypt/decrypt with them.

    from kms_client import Client
    kms = Client()                                  # KMS_BASE_URL (required), KMS_USER, KMS_PASS
    blob = kms.encrypt("invoices-db", b"secret", aad=b"invoice:42")
    kms.decrypt("invoices-db", blob, aad=b"invoice:42")

Only the standard library and `cryptography`. DEKs are cached in memory until the server's
`expiresAt`, in a bounded cache; the token until it expires. A 401 logs in again once; 429 and
503 are retried with backoff, honouring Retry-After. A GET whose connection is reset or closed
before its answer (a server restarting, a proxy dropping an idle connection) is sent once more;
other methods are not (a delete whose first try went through answers 404 the second time).
"""
import base64
import json
import os
import ssl
import struct
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["Client", "Key", "KeyBundle", "KmsError", "KmsUnreachable", "BlobError"]

RETRIED_ON_RESET = frozenset({"GET"})  # methods sent again once when the connection is reset
BLOB_MAGIC = b"KMS1"  # blob: magic | version (4 bytes, big endian) | nonce (12) | ciphertext+tag


class KmsError(Exception):
    """An error answer from the KMS (its code and message; never a secret) or a bad blob."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class KmsUnreachable(KmsError):
    """No answer from the KMS: refused, timed out, a name that does not resolve, TLS failing.
    Its status is 0: no HTTP answer came."""

    def __init__(self, base_url: str, reason: str):
        super().__init__(0, "unreachable", f"no answer from {base_url} ({reason})")

    def __str__(self):
        return self.message


class BlobError(KmsError):
    """A blob that is not one of ours, or that fails authentication (altered, other key or aad)."""

    def __init__(self, message: str):
        super().__init__(400, "bad_blob", message)

    def __str__(self):
        return self.message


@dataclass(frozen=True, repr=False)
class Key:
    dek: bytes
    version: int
    expires_at: float  # epoch seconds: cache no longer than this

    def __repr__(self):  # never print key material
        return f"Key(version={self.version})"


@dataclass(frozen=True)
class KeyBundle:
    decrypt_with: Key
    encrypt_with: Key


def _key(body: dict) -> Key:
    dek = body["dek"]
    return Key(dek=base64.urlsafe_b64decode(dek + "=" * (-len(dek) % 4)), version=body["version"],
               expires_at=datetime.fromisoformat(body["expiresAt"].replace("Z", "+00:00")).timestamp())


def _now() -> float:
    """Wall-clock seconds: expiry times from the KMS are wall-clock times."""
    return time.time()


def _was_reset(reason) -> bool:
    """A connection reset, or closed with no answer (http.client.RemoteDisconnected is a
    ConnectionResetError), or broken while the request was written."""
    return isinstance(reason, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError))


def _segment(reference: str) -> str:
    return urllib.parse.quote(reference, safe="")


class Client:
    def __init__(self, base_url: str | None = None, clientname: str | None = None, password: str | None = None,
                 verify: bool | str = True, cache_size: int = 1024, retries: int = 3, timeout: float = 10.0):
        base_url = base_url or os.environ.get("KMS_BASE_URL")
        if not base_url:  # no silent default: a client talking to the wrong KMS would only fail later
            raise ValueError("no KMS address: pass base_url or set KMS_BASE_URL (such as https://kms.internal)")
        try:
            parts = urllib.parse.urlsplit(base_url)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError:  # a malformed IPv6 address or port
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{base_url!r} is not a KMS address: give http(s)://host[:port], such as "
                             "https://kms.internal")
        self.base_url = base_url.rstrip("/")
        self.clientname = clientname or os.environ.get("KMS_USER")
        self._password = password or os.environ.get("KMS_PASS")
        self.retries, self.timeout = retries, timeout
        if verify is False:
            self._ssl = ssl._create_unverified_context()  # noqa: S323 - the caller asked for it
        else:
            self._ssl = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
        self._token: str | None = None
        self._token_expires = 0.0
        self._cache: OrderedDict = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def __repr__(self):
        return f"Client(base_url={self.base_url!r}, clientname={self.clientname!r})"

    # HTTP

    def _send(self, method: str, path: str, body: dict | None, token: str | None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base_url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        attempt, resent = 0, False
        while True:
            try:
                with urllib.request.urlopen(request, timeout=self.timeout, context=self._ssl) as response:
                    text, status = response.read(), response.status
                try:
                    return json.loads(text) if text else None
                except ValueError:
                    raise KmsError(status, "error", f"the answer from {self.base_url} is not JSON: is it the KMS?") from None
            except urllib.error.HTTPError as error:
                payload = error.read()
                error.close()
                if error.code in (429, 503) and attempt < self.retries:
                    retry_after = error.headers.get("Retry-After", "")
                    time.sleep(min(float(retry_after) if retry_after.isdigit() else 0.2 * 2 ** attempt, 10))
                    attempt += 1
                    continue
                try:
                    answer = json.loads(payload)
                    raise KmsError(error.code, answer.get("error", "error"), answer.get("message", "")) from None
                except ValueError:
                    raise KmsError(error.code, "error", "unexpected answer") from None
            except (urllib.error.URLError, OSError) as error:  # HTTPError, above, is one too
                reason = getattr(error, "reason", None) or error
                if method in RETRIED_ON_RESET and not resent and _was_reset(reason):
                    resent = True  # the only try that does not count as one of `retries`
                    continue
                raise KmsUnreachable(self.base_url, str(reason)) from None

    def _token_for_request(self) -> str:
        with self._lock:
            if self._token is None or _now() > self._token_expires - 30:
                if not (self.clientname and self._password):
                    raise KmsError(401, "unauthorized", "no credentials: set KMS_USER and KMS_PASS")
                body = self._send("POST", "/auth/login", {"clientname": self.clientname, "password": self._password},
                                  None)
                self._adopt_token(body)
            return self._token

    def _adopt_token(self, body: dict):
        self._token = body["token"]
        self._token_expires = datetime.fromisoformat(body["expiresAt"].replace("Z", "+00:00")).timestamp()

    def _call(self, method: str, path: str, body: dict | None = None):
        try:
            return self._send(method, path, body, self._token_for_request())
        except KmsError as error:
            if error.status != 401:
                raise
            with self._lock:
                self._token = None  # revoked or expired: log in again, once
            return self._send(method, path, body, self._token_for_request())

    # Authentication

    def signup(self, signup_token: str, password: str) -> None:
        """Register with a signup token; the client is then logged in."""
        self._adopt_token(self._send("POST", "/auth/signup", {"token": signup_token, "password": password}, None))
        self._password = password

    def logout(self) -> None:
        if self._token:
            self._send("POST", "/auth/logout", None, self._token)
        self._token = None

    def use_password(self, password: str) -> None:
        """The password for the next login (the command line reads it only once the KMS answers)."""
        self._password = password

    def login(self) -> None:
        """Log in now (otherwise the first call does): a wrong password shows here."""
        with self._lock:
            self._token = None
        self._token_for_request()

    def ping(self) -> None:
        """Raise KmsUnreachable unless the KMS answers its liveness probe (needs no credentials)."""
        self._send("GET", "/healthz", None, None)

    # Keys

    def _remember(self, cache_key, value):
        with self._lock:
            self._cache[cache_key] = value
            self._cache.move_to_end(cache_key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def _forget(self, reference: str):
        with self._lock:
            for cache_key in [k for k in self._cache if k[0] == reference]:
                del self._cache[cache_key]

    def get_key(self, reference: str, version: int | None = None) -> KeyBundle:
        cache_key = (reference, version)
        with self._lock:
            cached = self._cache.get(cache_key)
        if cached and cached.encrypt_with.expires_at > _now():
            return cached
        path = f"/keys/{_segment(reference)}" + ("" if version is None else f"/{int(version)}")
        body = self._call("GET", path)
        bundle = KeyBundle(decrypt_with=_key(body["decryptWith"]), encrypt_with=_key(body["encryptWith"]))
        self._remember(cache_key, bundle)
        return bundle

    def generate_key(self, reference: str) -> Key:
        return _key(self._call("POST", "/keys/actions/generate", {"keyReference": reference}))

    def rotate_key(self, reference: str) -> Key:
        self._forget(reference)
        return _key(self._call("POST", f"/keys/{_segment(reference)}/actions/rotate"))

    def delete_key(self, reference: str) -> None:
        self._forget(reference)
        self._call("DELETE", f"/keys/{_segment(reference)}/actions/delete")

    def list_keys(self) -> list[dict]:
        """Metadata of this client's keys (reference, current version, state, rotation period)."""
        return self._call("GET", "/keys")["keys"]

    def key_versions(self, reference: str) -> list[dict]:
        """Every version of a key and its state (in-use, deprecated, retired)."""
        return self._call("GET", f"/keys/{_segment(reference)}/versions")["versions"]

    def retire_versions(self, reference: str, below_version: int) -> dict:
        """Retire every version below `below_version`: never served again."""
        self._forget(reference)
        return self._call("POST", f"/keys/{_segment(reference)}/actions/retire", {"belowVersion": below_version})

    def restore_key(self, reference: str) -> dict:
        """Cancel a pending deletion."""
        return self._call("POST", f"/keys/{_segment(reference)}/actions/restore")

    def set_rotation_period(self, reference: str, period_ms: int | None) -> dict:
        """Rotate the key by itself once its current version is older than `period_ms`; None stops it."""
        return self._call("POST", f"/keys/{_segment(reference)}/actions/set-rotation-period",
                          {"rotationPeriod": period_ms})

    # Encryption with the key's DEK

    def encrypt(self, reference: str, plaintext: bytes, aad: bytes = b"") -> bytes:
        """AES-256-GCM under the key's current DEK; the blob records the version it used."""
        key = self.get_key(reference).encrypt_with
        header = BLOB_MAGIC + struct.pack(">I", key.version)
        nonce = os.urandom(12)
        return header + nonce + AESGCM(key.dek).encrypt(nonce, plaintext, header + aad)

    def decrypt(self, reference: str, blob: bytes, aad: bytes = b"") -> bytes:
        if len(blob) < 8 + 12 + 16 or blob[:4] != BLOB_MAGIC:
            raise BlobError("not a KMS blob")
        header, nonce, ciphertext = blob[:8], blob[8:20], blob[20:]
        version = struct.unpack(">I", header[4:])[0]
        key = self.get_key(reference, version).decrypt_with
        try:
            return AESGCM(key.dek).decrypt(nonce, ciphertext, header + aad)
        except InvalidTag:
            raise BlobError("the blob was altered, or the key or aad differs") from None
