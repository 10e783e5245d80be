"""Keys that never leave the KMS: encrypt, decrypt, reencrypt and generate-data-key on the server.

Each request is a batch (a single request is a batch of one): its items are checked one by one,
the key is read once (token, key row and the wrapped DEKs it needs, in one statement), each item
gets its result or its error, in order, and one audit event stands for the batch: the key, the
versions touched, the item count and the failures, never a plaintext, ciphertext or context value.

Ciphertexts are kms.ciphertext's format. Whatever is wrong with a ciphertext (not base64url, not
ours, altered, another key's, another context) the caller gets one answer, `decryption_failed`, after
the same work; a retired version is the exception the contract names (410), as its DEK is gone.

A key may be another client's, named `{owner}:{ref}`, when that client granted the caller the
operation (kms.grants): the statement reads the owner and the grant beside the key, `_read_key`
refuses what the grant does not allow exactly as a key that does not exist (404), and an item whose
context lacks a pair of the grant's `contextSubset` gets 403. The audit record names the grant.
"""
import binascii
import functools
import json
import os
import re
import uuid
from dataclasses import dataclass, field
from typing import NamedTuple

import psycopg2
import pybase64
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kms import ciphertext, crypto, db
from kms.access import TOKEN_NOT_LIVE
from kms.audit.service import new_event
from kms.context import Context
from kms.errors import ApiError, BadRequest, Forbidden, Gone, NotFound, Unauthorized
from kms.keys.address import NO_SUCH_KEY, KeyAddress, KnownGrant, check_shared, owner_moved, resolve
from kms.keys.service import KEY_READ, SHARED_READ, check_key_read, claimed_alone, rotate_if_due, unwrap_version
from kms.rules import KEY_ADDRESS_PATTERN, KEY_ADDRESS_PROBLEM

DECRYPTION_FAILED = ("The ciphertext cannot be decrypted with this key and context (altered, of another key, or "
                     "another context).")
VERSION_RETIRED = "The ciphertext's key version was retired: its DEK is gone."
_REFERENCE = re.compile(KEY_ADDRESS_PATTERN.removesuffix("$") + r"\Z")

# What each operation's items may carry.
FIELDS = {
    "encrypt": frozenset({"plaintext", "context"}),
    "decrypt": frozenset({"ciphertext", "context"}),
    "reencrypt": frozenset({"ciphertext", "context", "toKeyReference", "toContext"}),
    "generate_data_key": frozenset({"context", "plaintext"}),
}


def _failed() -> BadRequest:
    return BadRequest(DECRYPTION_FAILED, code="decryption_failed")


def _invalid(field_name: str, problem: str, code: str = "validation_failed") -> BadRequest:
    return BadRequest(f"{field_name}: {problem}", code=code, fields={field_name: [problem]})


# Items

@dataclass
class Item:
    """One item of a batch as checked: what it carries, and its result or error once known."""
    context: dict
    plaintext: bytes | None = None
    blob: bytes | None = None
    version: int | None = None
    to_reference: str | None = None
    to_context: dict | None = None
    want_plaintext: bool = True
    error: ApiError | None = None
    result: dict | None = None


def _context(value, field_name: str, settings) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _invalid(field_name, "Must be an object of strings.")
    if len(value) > settings.operation_max_context_pairs:
        raise _invalid(field_name, f"At most {settings.operation_max_context_pairs} pairs.", "context_too_large")
    size = 0
    for key, text in value.items():
        if type(text) is not str:
            raise _invalid(field_name, "Every value must be a string.")
        size += (len(key) if key.isascii() else len(key.encode())) + (len(text) if text.isascii() else len(text.encode()))
    if size > settings.operation_max_context_bytes:
        raise _invalid(field_name, f"At most {settings.operation_max_context_bytes} bytes of keys and values "
                                   "together (UTF-8).", "context_too_large")
    return value


# base64 by pybase64 (SIMD): decoding and encoding 1 KiB took the standard library about 8 us, a
# seventh of a batch's time per item; pybase64 takes 1.5 us.

def _b64(text: str) -> bytes:
    """base64url, padded or not, strictly: binascii.Error (or UnicodeEncodeError) on any other character."""
    raw = text.encode("ascii").rstrip(b"=")
    if b"+" in raw or b"/" in raw:  # which altchars= accepts as well as - and _
        raise binascii.Error("not the URL-safe alphabet")
    return pybase64.b64decode(raw + b"=" * (-len(raw) % 4), altchars=b"-_", validate=True)


def _b64url(raw: bytes) -> str:
    """kms.crypto.b64url, faster."""
    return pybase64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _parse(operation: str, raw, settings) -> Item:
    if not isinstance(raw, dict):
        return Item({}, error=BadRequest("Each item must be a JSON object.", code="validation_failed"))
    try:
        unknown = raw.keys() - FIELDS[operation]
        if unknown:
            name = sorted(unknown)[0]
            raise _invalid(name, "Unknown field.")
        item = Item(_context(raw.get("context"), "context", settings))
        if operation == "encrypt":
            text = raw.get("plaintext")
            if not isinstance(text, str):
                raise _invalid("plaintext", "Missing data for required field." if text is None else "Not a string.")
            if len(text) > (settings.operation_max_plaintext_bytes + 2) // 3 * 4 + 2:
                raise _invalid("plaintext", f"At most {settings.operation_max_plaintext_bytes} bytes.",
                               "plaintext_too_large")
            try:
                item.plaintext = _b64(text)
            except (binascii.Error, ValueError):
                raise _invalid("plaintext", "Not base64url (RFC 4648).") from None
            if len(item.plaintext) > settings.operation_max_plaintext_bytes:
                raise _invalid("plaintext", f"At most {settings.operation_max_plaintext_bytes} bytes.",
                               "plaintext_too_large")
        elif operation == "generate_data_key":
            want = raw.get("plaintext", True)
            if not isinstance(want, bool):
                raise _invalid("plaintext", "Not a boolean.")
            item.want_plaintext = want
        else:
            text = raw.get("ciphertext")
            if not isinstance(text, str):
                raise _invalid("ciphertext", "Missing data for required field." if text is None else "Not a string.")
            if operation == "reencrypt":
                to_reference = raw.get("toKeyReference")
                if to_reference is not None and not (isinstance(to_reference, str) and _REFERENCE.match(to_reference)):
                    raise _invalid("toKeyReference", KEY_ADDRESS_PROBLEM)
                item.to_reference = to_reference
                to_context = raw.get("toContext")
                item.to_context = item.context if to_context is None else _context(to_context, "toContext", settings)
            # Anything wrong with the ciphertext itself is the one generic answer.
            max_length = (settings.operation_max_plaintext_bytes + ciphertext.OVERHEAD + 2) // 3 * 4 + 2
            try:
                if len(text) > max_length:
                    raise ciphertext.DecryptionFailed()
                item.blob = _b64(text)
                item.version = ciphertext.header_version(item.blob)
            except (binascii.Error, ValueError, ciphertext.DecryptionFailed):
                item.error = _failed()
        return item
    except ApiError as error:
        return Item({}, error=error)


def parse_items(ctx: Context, operation: str, body: dict) -> tuple[list[Item], bool]:
    """(items, batch): a body is one item, or `{"items": [...]}`."""
    settings = ctx.kms.settings
    if "items" not in body:
        return [_parse(operation, body, settings)], False
    if len(body) > 1:
        raise BadRequest("A batch carries its items alone: put every other field in each item.",
                         code="validation_failed", fields={"items": ["Not with other fields."]})
    items = body["items"]
    if not isinstance(items, list) or not items:
        raise BadRequest("items: a non-empty list of objects.", code="validation_failed",
                         fields={"items": ["A non-empty list."]})
    if len(items) > settings.operation_max_batch:
        raise BadRequest(f"At most {settings.operation_max_batch} items in one request.", code="too_many_items",
                         fields={"items": [f"At most {settings.operation_max_batch} items."]})
    return [_parse(operation, raw, settings) for raw in items], True


# The key

# The columns of use_key (sql/queries/keys.sql), in its order.
KeyRead = NamedTuple("KeyRead", [*KEY_READ, ("versions", list | None), ("kek_versions", list | None),
                                 ("wrapped_deks", list | None), *SHARED_READ, ("grant_expired", bool | None)])


@dataclass
class UsedKey:
    """A key as one request uses it: what its row said, and the DEKs unwrapped (or kept) so far."""
    reference: str
    owner_id: uuid.UUID
    ref_hash: bytes
    key_id: int
    current: int
    retired_below: int = 1
    rotation_due: bool = False
    wrapped: dict = field(default_factory=dict)  # version -> (KEK version, wrapped DEK), as read
    deks: dict = field(default_factory=dict)  # version -> (AESGCM, key id)
    touched: set = field(default_factory=set)
    grant: KnownGrant | None = None  # the grant the caller uses this key by, if not its own

    @property
    def target(self) -> str:
        return self.ref_hash.hex()

    @property
    def address(self) -> tuple:
        return self.owner_id, self.ref_hash


_NO_AUDIT = {"audit": False, "operation": None, "event_id": None, "at": None, "actor": None, "action": None, "version": None,
             "outcome": None, "request_id": None, "source_ip": None, "detail": None, "row_mac": None,
             "expect_key_id": None, "lowest_version": None, "highest_version": None, "expect_current": None}


def _select(ctx: Context, address: KeyAddress, versions: list[int], audit: dict = _NO_AUDIT) -> KeyRead:
    params = {"jti": ctx.claims.jti_text, "client_id": ctx.claims.client_id_text, "ref_hash": address.ref_hash,
              "versions": versions, "read_deks": not audit["audit"], **audit, **address.statement_parameters(ctx)}
    with ctx.conn.cursor(cursor_factory=psycopg2.extensions.cursor) as cur:  # one statement, its own transaction
        db.execute_prepared(cur, "use_key", params, prefix=_durability(ctx))
        row = cur.fetchone()
    if row is None:
        raise Unauthorized(TOKEN_NOT_LIVE)
    return KeyRead._make(row)


def _durability(ctx: Context) -> str:
    """Audit records of operations are written as those of look-ups: without waiting for the disk
    flush (and a synchronous standby) unless AUDIT_KEY_LOOKUPS_DURABLE (docs/SECURITY.md)."""
    return "" if ctx.kms.settings.audit_key_lookups_durable else db.sql.relax_commit_durability + "; "


def _read_key(ctx: Context, name: str, versions: list[int], operation: str) -> UsedKey:
    """The key `name` names for the caller (its own, or `{owner}:{ref}` granted it for `operation`)
    with the wrapped DEKs of its current version and of `versions`; 401 for a token no longer
    live, 404 for no such key (deleted keys, and keys the caller holds no such grant on, included)."""
    address = resolve(ctx, name)
    row = _select(ctx, address, versions)
    check_key_read(ctx, row, *address.address)
    if owner_moved(ctx, address, row):
        address = resolve(ctx, name)
        row = _select(ctx, address, versions)
        check_key_read(ctx, row, *address.address)
    if address.shared:
        address = check_shared(ctx, address, row, operation)
        if row.key_id is None or not _grant_allows(address.grant, operation, row.o_status, row.grant_expired):
            raise NotFound(NO_SUCH_KEY)
    elif row.key_id is None and claimed_alone(ctx, address.owner_id, address.reference, address.ref_hash):
        row = _select(ctx, address, versions)  # an imported key's first use
        check_key_read(ctx, row, *address.address)
    if row.key_id is None:
        raise NotFound(NO_SUCH_KEY)
    wrapped = {version: (kek, bytes(blob)) for version, kek, blob in
               zip(row.versions or (), row.kek_versions or (), row.wrapped_deks or ())}
    return UsedKey(name, address.owner_id, address.ref_hash, row.key_id, row.key_current_version,
                   row.key_retired_below, bool(row.rotation_due), wrapped, grant=address.grant)


def _grant_allows(grant: KnownGrant | None, operation: str, owner_status: str | None, expired: bool | None) -> bool:
    return grant is not None and GRANTED_AS[operation] in grant.operations and owner_status == "active" \
        and not expired


def _outside_grant(key: UsedKey, items: list[Item], which: str = "context"):
    """Items whose context lacks a pair of the grant's contextSubset: 403 each."""
    subset = key.grant and key.grant.context_subset
    if not subset:
        return
    for item in items:
        context = getattr(item, "to_context" if which == "toContext" else "context")
        if item.error is None and any(context.get(name) != value for name, value in subset.items()):
            item.error = Forbidden(f"The grant allows this key only with a {which} holding its contextSubset.",
                                   code="context_not_granted")


def _dek(ctx: Context, key: UsedKey, version: int) -> tuple[AESGCM, bytes]:
    """The AEAD and key id of a version the key row says is served (the caller checked)."""
    found = key.deks.get(version)
    if found is None:
        kek_version, wrapped = key.wrapped.get(version, (None, None))
        dek = unwrap_version(ctx, key.key_id, key.owner_id, key.ref_hash, version, kek_version, wrapped)
        found = key.deks[version] = (AESGCM(dek), ciphertext.key_id(dek))
    return found


def _current(ctx: Context, key: UsedKey) -> tuple[int, AESGCM, bytes]:
    """The version to encrypt under: the current one, rotated first when its period has passed."""
    if key.rotation_due:
        key.rotation_due = False
        rotated = rotate_if_due(ctx, key.key_id)
        if rotated is not None:
            key.current = rotated.version
            key.deks[rotated.version] = (AESGCM(rotated.dek), ciphertext.key_id(rotated.dek))
    aead, dek_id = _dek(ctx, key, key.current)
    key.touched.add(key.current)
    return key.current, aead, dek_id


def _open(ctx: Context, key: UsedKey, item: Item) -> bytes | None:
    """The item's plaintext, or None with item.error set."""
    version = item.version
    if version <= key.current:  # versions a ciphertext names that do not exist are not recorded
        key.touched.add(version)
    if version < key.retired_below:
        item.error = Gone(VERSION_RETIRED, code="version_retired")
        return None
    if version > key.current:  # no such version: a ciphertext of another key, or altered
        # The same work as a real attempt: one AES-GCM open under a DEK of this key.
        aead, dek_id = _dek(ctx, key, key.current)
    else:
        aead, dek_id = _dek(ctx, key, version)
    try:
        plaintext = ciphertext.open_sealed(b"", item.blob, item.context, aead=aead, dek_id=dek_id)
    except ciphertext.DecryptionFailed:
        item.error = _failed()
        return None
    if version > key.current:
        item.error = _failed()
        return None
    return plaintext


def _seal(version: int, aead: AESGCM, dek_id: bytes, plaintext: bytes, context: dict) -> str:
    return _b64url(ciphertext.seal(b"", version, plaintext, context, aead=aead, dek_id=dek_id))


# The operations: each works out a batch's items with a key already read (or kept), and returns the
# other keys it encrypted under, by reference (reencrypt's toKeyReference), with their items.

def encrypt(ctx: Context, key: UsedKey, items: list[Item]) -> dict:
    version, aead, dek_id = _current(ctx, key)
    for item in items:
        if item.error is None:
            item.result = {"ciphertext": _seal(version, aead, dek_id, item.plaintext, item.context), "version": version}
    return {}


def decrypt(ctx: Context, key: UsedKey, items: list[Item]) -> dict:
    for item in items:
        if item.error is None:
            plaintext = _open(ctx, key, item)
            if plaintext is not None:
                item.result = {"plaintext": _b64url(plaintext), "version": item.version}
    return {}


def reencrypt(ctx: Context, key: UsedKey, items: list[Item]) -> dict:
    """Under the current version of this key or of `toKeyReference` (another key of the caller's,
    or one granted it `encrypt`): the plaintext never leaves the server. Out of a shared key, only
    into a key of the same owner unless the grant also gives `decrypt`."""
    targets: dict[str, UsedKey | ApiError] = {key.reference: key}
    into: dict[str, tuple[UsedKey, list[Item]]] = {}
    for item in items:
        if item.error is not None:
            continue
        plaintext = _open(ctx, key, item)
        if plaintext is None:
            continue
        name = item.to_reference or key.reference
        target = targets.get(name)
        if target is None:
            try:
                target = targets[name] = _read_key(ctx, name, [], "encrypt")
            except NotFound as error:
                target = targets[name] = error
        if isinstance(target, ApiError):
            item.error = target
            continue
        if key.grant is not None and target.owner_id != key.owner_id and "decrypt" not in key.grant.operations:
            # Out of a shared key into one its owner does not hold, the grantee could decrypt it
            # there: that is `decrypt`, which this grant does not give (as no grant: 404).
            item.error = NotFound(NO_SUCH_KEY)
            continue
        _outside_grant(target, [item], "toContext")  # into a shared key, this one too
        if item.error is not None:
            continue
        version, aead, dek_id = _current(ctx, target)
        item.result = {"ciphertext": _seal(version, aead, dek_id, plaintext, item.to_context), "version": version}
        if target is not key:
            into.setdefault(name, (target, []))[1].append(item)
    return into


def generate_data_key(ctx: Context, key: UsedKey, items: list[Item]) -> dict:
    """A fresh 32-byte data key per item, sealed under the key's current version (with the item's
    context), with its plaintext unless the item asks for none."""
    version, aead, dek_id = _current(ctx, key)
    for item in items:
        if item.error is None:
            data_key = os.urandom(crypto.DEK_BYTES)
            item.result = {"ciphertext": _seal(version, aead, dek_id, data_key, item.context), "version": version}
            if item.want_plaintext:
                item.result["plaintext"] = _b64url(data_key)
    return {}


OPERATIONS = {"encrypt": encrypt, "decrypt": decrypt, "reencrypt": reencrypt, "generate_data_key": generate_data_key}
ACTIONS = {"encrypt": "key.encrypt", "decrypt": "key.decrypt", "reencrypt": "key.reencrypt",
           "generate_data_key": "key.generate_data_key"}
# What a grant must name for each (kms.keys.address.OPERATIONS).
GRANTED_AS = {"encrypt": "encrypt", "decrypt": "decrypt", "reencrypt": "reencrypt",
              "generate_data_key": "generate-data-key"}
OPENS = frozenset({"decrypt", "reencrypt"})  # the operations that open ciphertexts of the key
SEALS = frozenset({"encrypt", "reencrypt", "generate_data_key"})  # those that encrypt under its current version


def run(ctx: Context, operation: str, reference: str, body: dict) -> dict:
    """The answer to one request: the result of a single item (its error raised as the request's),
    or `{"results": [...]}` for a batch, one result or error per item, in order."""
    items, batch = parse_items(ctx, operation, body)
    if not batch and items[0].error is not None and items[0].error.code != "decryption_failed":
        # A malformed request: nothing to do with the key. (A ciphertext that is not one of ours
        # costs a read and an audit record, as one that fails authentication does.)
        _count(ctx, operation, items)
        raise items[0].error
    if not _run_with_kept_key(ctx, operation, reference, items):
        _run_with_read_key(ctx, operation, reference, items)
    _count(ctx, operation, items)
    if not batch:
        if items[0].error is not None:
            raise items[0].error
        return items[0].result
    return {"results": [item.result if item.error is None else _error_json(item.error) for item in items]}


def _run_with_read_key(ctx: Context, operation: str, reference: str, items: list[Item]):
    """Read the key (and the wrapped DEKs the items name), work the items out, write the audit
    record: two round trips. What was unwrapped is kept for the next request."""
    key = _read_key(ctx, reference, sorted({item.version for item in items if item.error is None
                                            and item.version is not None}), operation)
    _outside_grant(key, items)
    into = OPERATIONS[operation](ctx, key, items)
    _write_audit(ctx, _audit_event(ctx, ACTIONS[operation], key, items))
    for target, moved in into.values():
        _write_audit(ctx, _audit_event(ctx, "key.reencrypt_into", target, moved))
    for used in (key, *(target for target, _ in into.values())):
        ctx.kms.operation_keys.put(used.address, used.key_id, used.current, used.deks)


def _run_with_kept_key(ctx: Context, operation: str, reference: str, items: list[Item]) -> bool:
    """Work the items out with DEKs kept from earlier requests, then send one statement that checks
    the token and the key row and writes the audit record only if the row still is what the work
    assumed (kms.operations.keycache). False, with the items as they were, when that cannot be
    done or the row has moved on: the caller then reads the key and works them out again."""
    address = resolve(ctx, reference)
    owner_id, ref_hash = address.address
    if address.shared and (address.grant is None or GRANTED_AS[operation] not in address.grant.operations):
        return False  # a grant not verified here yet: read it
    kept = ctx.kms.operation_keys.get((owner_id, ref_hash))
    if kept is None:
        return False
    opened = {item.version for item in items if item.error is None and operation in OPENS}
    if any(version not in kept.deks or version > kept.current for version in opened) \
            or (operation in SEALS and kept.current not in kept.deks):
        return False
    if operation == "reencrypt" and any(item.to_reference not in (None, reference) for item in items):
        return False
    key = UsedKey(reference, owner_id, ref_hash, kept.key_id, kept.current, deks=dict(kept.deks), grant=address.grant)
    before = [(item.error, item.result) for item in items]
    _outside_grant(key, items)
    OPERATIONS[operation](ctx, key, items)
    event = _audit_event(ctx, ACTIONS[operation], key, items)
    lowest, highest = min(key.touched, default=key.current), max(key.touched, default=key.current)
    expect_current = key.current if operation in SEALS else None
    row = _select(ctx, address, [], {**event, "audit": True, "operation": GRANTED_AS[operation],
                                     "expect_key_id": key.key_id, "lowest_version": lowest,
                                     "highest_version": highest, "expect_current": expect_current})
    check_key_read(ctx, row, owner_id, ref_hash)
    if address.shared:
        seen = check_shared(ctx, address, row, GRANTED_AS[operation]).grant
        fits = seen is not None and seen.id == address.grant.id and row.o_status == "active" \
            and not row.grant_expired
    else:
        fits = True
    if (fits and row.key_id == key.key_id and not row.superseded and row.key_retired_below <= lowest
            and row.key_current_version >= highest
            and (expect_current is None or (row.key_current_version == expect_current and not row.rotation_due))):
        return True  # the statement wrote the audit record
    for item, (error, result) in zip(items, before):
        item.error, item.result = error, result
    return False


def _error_json(error: ApiError) -> dict:
    answer = {"error": error.code, "message": error.message, "status": error.status}
    if error.fields:
        answer["fields"] = error.fields
    return answer


def _count(ctx: Context, operation: str, items: list[Item]):
    outcomes: dict[str, int] = {}
    for item in items:
        name = "success" if item.error is None else item.error.code
        outcomes[name] = outcomes.get(name, 0) + 1
    ctx.kms.metrics.count_items(operation, outcomes)


# The audit record

def _audit_event(ctx: Context, action: str, key: UsedKey, items: list[Item]) -> dict:
    """One event for the batch: the key, the versions touched, how many items and which errors;
    context keys, never a value."""
    failed = sum(item.error is not None for item in items)
    outcome = "success" if not failed else "failure" if failed == len(items) else "partial"
    errors = None
    if failed:
        counts: dict[str, int] = {}
        for item in items:
            if item.error is not None:
                counts[item.error.code] = counts.get(item.error.code, 0) + 1
        errors = tuple(sorted(counts.items()))
    context_keys = tuple(sorted({name for item in items for name in item.context})[:32])
    grant = None if key.grant is None else str(key.grant.id)  # the owner reads the grant's uses by it (kms.grants)
    version = next(iter(key.touched)) if len(key.touched) == 1 else None
    return new_event(ctx, action, outcome, target=key.target, version=version,
                     detail=_detail_json(len(items), failed, tuple(sorted(key.touched)), errors, context_keys, grant))


@functools.lru_cache(maxsize=1024)  # requests of one kind repeat the same detail
def _detail_json(items: int, failed: int, versions: tuple, errors: tuple | None, context_keys: tuple,
                 grant: str | None) -> str:
    detail = {"items": items, "failed": failed, "versions": list(versions)}
    if errors:
        detail["errors"] = dict(errors)
    if context_keys:
        detail["contextKeys"] = list(context_keys)
    if grant is not None:
        detail["grant"] = grant
    return json.dumps(detail, separators=(",", ":"), sort_keys=True)


def _write_audit(ctx: Context, event: dict):
    with ctx.conn.cursor(cursor_factory=psycopg2.extensions.cursor) as cur:
        db.execute_prepared(cur, "insert_audit_event", event, prefix=_durability(ctx))


# What grants use (kms.grants): a contextSubset is bounded as a context is.
checked_context = _context
