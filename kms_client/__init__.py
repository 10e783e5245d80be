"""Python SDK for the KMS: log in, encrypt and decrypt on the server, or fetch and cache DEKs and
encrypt locally, in one ciphertext format either side reads.

    from kms_client import Client
    kms = Client()                                  # KMS_BASE_URL (required), KMS_USER, KMS_PASS
    blob = kms.encrypt("invoices-db", b"secret", {"invoice": "42"})      # the server encrypts
    kms.decrypt("invoices-db", blob, {"invoice": "42"})
    kms.encrypt("invoices-db", b"secret", {"invoice": "42"}, local=True)  # a fetched DEK, here

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

from kms_client import ciphertext, stream

RETRIED_ON_RESET = frozenset({"GET"})  # methods sent again once when the connection is reset
__all__ = ["Client", "DataKey", "Key", "KeyBundle", "KmsError", "KmsUnreachable", "BlobError"]

# The earlier SDK's blobs, still read: magic | version (4 bytes, big endian) | nonce (12) | ciphertext+tag,
# with the first 8 bytes and aad as associated data.
BLOB_MAGIC = b"KMS1"


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

    def generate_key(self, reference: str, exportable: bool = True) -> Key | None:
        """The new key's DEK; None for a key made with exportable=False (its DEK never leaves the KMS)."""
        body = {"keyReference": reference}
        if not exportable:
            body["exportable"] = False
        answer = self._call("POST", "/keys/actions/generate", body)
        return _key(answer) if "dek" in answer else None

    def rotate_key(self, reference: str) -> Key | None:
        self._forget(reference)
        answer = self._call("POST", f"/keys/{_segment(reference)}/actions/rotate")
        return _key(answer) if "dek" in answer else None

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


    def set_exportable(self, reference: str, exportable: bool = False) -> dict:
        """Stop the key's DEK from ever being returned again (there is no way back)."""
        self._forget(reference)
        return self._call("POST", f"/keys/{_segment(reference)}/actions/set-exportable", {"exportable": exportable})

    # Grants: sharing a key with another client. A grantee names a shared key "{owner}:{reference}"
    # in every call above that takes a reference.

    def grant(self, reference: str, grantee: str, operations, *, expires_at: str | None = None,
              context_subset: dict | None = None) -> dict:
        """Let `grantee` use this client's key for `operations` (fetch, encrypt, decrypt, reencrypt,
        generate-data-key), until `expires_at` (RFC 3339) and only with a context holding
        `context_subset`, if given. Returns the grant (its `id` revokes it)."""
        body = {"grantee": grantee, "operations": list(operations)}
        if expires_at is not None:
            body["expiresAt"] = expires_at
        if context_subset:
            body["contextSubset"] = context_subset
        return self._call("POST", f"/keys/{_segment(reference)}/grants", body)

    def list_grants(self, reference: str | None = None) -> list[dict]:
        """The live grants on one of this client's keys; without a reference, those made to this
        client (with each key's owner and reference)."""
        return self._call("GET", "/grants" if reference is None else f"/keys/{_segment(reference)}/grants")["grants"]

    def revoke_grant(self, reference: str, grant_id: str) -> None:
        """End a grant on one of this client's keys: it allows nothing from now on."""
        self._call("DELETE", f"/keys/{_segment(reference)}/grants/{_segment(str(grant_id))}")

    def grant_uses(self, reference: str, grant_id: str, *, after: int = 0, limit: int = 100) -> list[dict]:
        """The audit events naming a grant on one of this client's keys: its creation, each use, its end."""
        query = urllib.parse.urlencode({"after": after, "limit": limit})
        return self._call("GET", f"/keys/{_segment(reference)}/grants/{_segment(str(grant_id))}/uses?{query}")["uses"]

    # Keys that never leave the KMS: the server encrypts and decrypts

    def _operation(self, reference: str, action: str, body: dict):
        return self._call("POST", f"/keys/{_segment(reference)}/actions/{action}", body)

    def _batches(self, reference: str, action: str, items: list[dict], batch_size: int) -> list:
        """Each item's answer, in order, sending at most `batch_size` (the server's
        OPERATION_MAX_BATCH, 100 by default) per request: a dict, or a KmsError for that item."""
        answers: list = []
        for start in range(0, len(items), batch_size):
            body = self._operation(reference, action, {"items": items[start:start + batch_size]})
            for result in body["results"]:
                if "error" in result:
                    answers.append(KmsError(result.get("status", 400), result["error"], result.get("message", "")))
                else:
                    answers.append(result)
        return answers

    def encrypt(self, reference: str, plaintext: bytes, context: dict | None = None, *, local: bool = False,
                aad: bytes | None = None) -> bytes:
        """A ciphertext of `plaintext` under the key's current version, bound to `context` (a flat
        str -> str mapping, needed again to decrypt). The server encrypts, so the DEK never leaves
        it; `local=True` fetches the DEK (exportable keys only, cached until `expiresAt`) and
        encrypts here instead, in the same format. `aad` (bytes, the earlier SDK's) is bound as
        the context {"aad": base64url(aad)}."""
        context = _with_aad(context, aad)
        if local:
            key = self.get_key(reference).encrypt_with
            return ciphertext.seal(key.dek, key.version, plaintext, context)
        body = self._operation(reference, "encrypt", _item(plaintext=_b64(plaintext), context=context))
        return _unb64(body["ciphertext"])

    def decrypt(self, reference: str, blob: bytes, context: dict | None = None, *, local: bool = False,
                aad: bytes | None = None) -> bytes:
        """The plaintext of a ciphertext of this key made with the same context (by the server or
        by `encrypt(local=True)`). A blob of the earlier SDK's format ("KMS1") is read locally,
        with `aad` as it was bound. BlobError for anything that fails to decrypt."""
        if len(blob) >= 4 and blob[:4] == BLOB_MAGIC:
            return self._decrypt_legacy(reference, blob, aad or b"")
        context = _with_aad(context, aad)
        if local:
            try:
                key = self.get_key(reference, ciphertext.version_of(blob)).decrypt_with
                return ciphertext.open_sealed(key.dek, blob, context)
            except (ciphertext.Unreadable, KmsError) as error:
                if isinstance(error, KmsError) and error.status not in (404,):
                    raise
                raise BlobError(DECRYPTION_FAILED) from None
        try:
            body = self._operation(reference, "decrypt", _item(ciphertext=_b64(blob), context=context))
        except KmsError as error:
            if error.code == "decryption_failed":
                raise BlobError(DECRYPTION_FAILED) from None
            raise
        return _unb64(body["plaintext"])

    def reencrypt(self, reference: str, blob: bytes, context: dict | None = None, *, to_reference: str | None = None,
                  to_context: dict | None = None) -> bytes:
        """The same plaintext under the current version of this key (or of `to_reference`), bound
        to `to_context` (default: the same context); the plaintext never leaves the server."""
        body = self._operation(reference, "reencrypt", _item(ciphertext=_b64(blob), context=context,
                                                             toKeyReference=to_reference, toContext=to_context))
        return _unb64(body["ciphertext"])

    def generate_data_key(self, reference: str, context: dict | None = None, *, plaintext: bool = True) -> "DataKey":
        """A fresh 32-byte data key, encrypted under the key (bound to `context`), with its
        plaintext unless `plaintext=False`: for encrypting large data locally (envelope encryption)."""
        body = self._operation(reference, "generate-data-key", _item(context=context, plaintext=plaintext))
        return _data_key(body)

    def encrypt_batch(self, reference: str, items, *, batch_size: int = 100) -> list:
        """Items are plaintexts, or (plaintext, context) pairs; answers a ciphertext or a KmsError per item."""
        bodies = [_item(plaintext=_b64(plain), context=context) for plain, context in _pairs(items)]
        return [answer if isinstance(answer, KmsError) else _unb64(answer["ciphertext"])
                for answer in self._batches(reference, "encrypt", bodies, batch_size)]

    def decrypt_batch(self, reference: str, items, *, batch_size: int = 100) -> list:
        """Items are ciphertexts, or (ciphertext, context) pairs; answers a plaintext or a KmsError per item."""
        bodies = [_item(ciphertext=_b64(blob), context=context) for blob, context in _pairs(items)]
        return [answer if isinstance(answer, KmsError) else _unb64(answer["plaintext"])
                for answer in self._batches(reference, "decrypt", bodies, batch_size)]

    def reencrypt_batch(self, reference: str, items, *, to_reference: str | None = None,
                        to_context: dict | None = None, batch_size: int = 100) -> list:
        """Items are ciphertexts, or (ciphertext, context) pairs; answers a ciphertext or a KmsError per item."""
        bodies = [_item(ciphertext=_b64(blob), context=context, toKeyReference=to_reference, toContext=to_context)
                  for blob, context in _pairs(items)]
        return [answer if isinstance(answer, KmsError) else _unb64(answer["ciphertext"])
                for answer in self._batches(reference, "reencrypt", bodies, batch_size)]

    def generate_data_key_batch(self, reference: str, contexts, *, plaintext: bool = True,
                                batch_size: int = 100) -> list:
        """One data key per context given (None for none); a DataKey or a KmsError per item."""
        bodies = [_item(context=context, plaintext=plaintext) for context in contexts]
        return [answer if isinstance(answer, KmsError) else _data_key(answer)
                for answer in self._batches(reference, "generate-data-key", bodies, batch_size)]

    # Files of any size: one data key from the KMS, the data encrypted here in chunks (kms_client.stream)

    def encrypt_stream(self, reference: str, source, sink, context: dict | None = None) -> int:
        """Encrypt a binary file-like `source` into `sink`; returns the plaintext's size."""
        data_key = self.generate_data_key(reference, context)
        return stream.encrypt_stream(source, sink, data_key.plaintext, data_key.ciphertext)

    def decrypt_stream(self, reference: str, source, sink, context: dict | None = None) -> int:
        """Reverse encrypt_stream; BlobError (after writing what authenticated) if the stream fails."""
        try:
            fixed, chunk_bytes, prefix, wrapped_key = stream.read_header(source)
            data_key = self.decrypt(reference, wrapped_key, context)
            return stream.decrypt_chunks(source, sink, data_key, fixed, chunk_bytes, prefix)
        except stream.StreamError as error:
            raise BlobError(str(error)) from None

    def reencrypt_stream(self, reference: str, source, sink, context: dict | None = None, *,
                         to_reference: str | None = None, to_context: dict | None = None):
        """Move a stream's data key to the current version of this key (or of `to_reference`);
        the chunks are copied through unchanged, never decrypted."""
        try:
            fixed, chunk_bytes, prefix, wrapped_key = stream.read_header(source)
        except stream.StreamError as error:
            raise BlobError(str(error)) from None
        try:
            moved = self.reencrypt(reference, wrapped_key, context, to_reference=to_reference, to_context=to_context)
        except KmsError as error:
            if error.code == "decryption_failed":
                raise BlobError(DECRYPTION_FAILED) from None
            raise
        sink.write(fixed + struct.pack(">H", len(moved)) + moved)
        stream.copy_chunks(source, sink)

    # The earlier SDK's blobs: read, never written

    def _decrypt_legacy(self, reference: str, blob: bytes, aad: bytes) -> bytes:
        if len(blob) < 8 + 12 + 16:
            raise BlobError("not a KMS blob")
        header, nonce, sealed = blob[:8], blob[8:20], blob[20:]
        version = struct.unpack(">I", header[4:])[0]
        key = self.get_key(reference, version).decrypt_with
        try:
            return AESGCM(key.dek).decrypt(nonce, sealed, header + aad)
        except InvalidTag:
            raise BlobError(DECRYPTION_FAILED) from None


@dataclass(frozen=True, repr=False)
class DataKey:
    plaintext: bytes | None  # None when asked for without it
    ciphertext: bytes  # the KMS's ciphertext of it: keep this, decrypt it with Client.decrypt
    version: int

    def __repr__(self):  # never print key material
        return f"DataKey(version={self.version})"


DECRYPTION_FAILED = "the ciphertext was altered, or the key or context differs"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _item(**fields) -> dict:
    return {name: value for name, value in fields.items() if value is not None}


def _with_aad(context: dict | None, aad: bytes | None) -> dict | None:
    if aad is None or aad == b"":
        return context
    if context:
        raise ValueError("give context or aad, not both")
    return {"aad": _b64(aad)}


def _pairs(items):
    for item in items:
        if isinstance(item, tuple):
            yield item[0], item[1]
        else:
            yield item, None


def _data_key(body: dict) -> DataKey:
    return DataKey(plaintext=_unb64(body["plaintext"]) if "plaintext" in body else None,
                   ciphertext=_unb64(body["ciphertext"]), version=body["version"])
