"""How a request names a key: a reference of the caller's own (`invoices-db`), or
`{owner}:{reference}` for a key another client granted it operations on (kms.grants).

A key is found by its owner's id and the hashed reference. For a shared key the owner's id comes
from the owner's name; the grantee's statement then reads the owner's client row (active, under
that name) and the grantee's live grant with what their MACs cover, and nothing is believed before
they check out (kms.rows). What this module keeps per process only saves round trips: the owner's
id by name, and the grant last verified for a grantee and key (its id goes into the audit record
the statement writes). The statement checks both; a stale entry costs a second try, never a
wrong answer.
"""
import json
import time
import uuid
from typing import NamedTuple

from kms import crypto, db
from kms.auth.service import hash_clientname
from kms.context import Context
from kms.errors import NotFound, Unauthorized
from kms.expiring import ExpiringMap
from kms.rows import CLIENTS, GRANTS
from kms.rules import GRANT_OPERATIONS as OPERATIONS

NO_SUCH_KEY = "No key with that reference."
REMEMBERED_FOR_S = 60.0


class KnownGrant(NamedTuple):
    """A grant as last verified (its row's MAC checked): grants never change but by revocation,
    so its id stands for the rest."""
    id: uuid.UUID
    operations: tuple[str, ...]
    context_subset: dict | None
    expires_at: object  # datetime | None


class KeyAddress(NamedTuple):
    name: str  # as the request names it: `invoices-db`, or `billing:invoices-db`
    reference: str  # as the owner names it
    owner_id: uuid.UUID
    ref_hash: bytes
    owner_name_hash: bytes | None = None  # set when the caller is a grantee
    grant: KnownGrant | None = None  # the grant this process last verified, for a grantee
    owner_remembered: bool = False  # the owner's id came from this process's memory, not the database

    @property
    def shared(self) -> bool:
        return self.owner_name_hash is not None

    @property
    def address(self) -> tuple:
        return self.owner_id, self.ref_hash

    def statement_parameters(self, ctx: Context) -> dict:
        """What lookup_key and use_key take to find this key (and, shared, the owner and grant)."""
        return {"owner_id": str(self.owner_id), "shared": self.shared, "owner_name_hash": self.owner_name_hash,
                "grant_id": None if self.grant is None else str(self.grant.id)}


class GrantorMemory:
    """For a minute: owner ids by name hash, and each grantee's shared addresses as last resolved
    (with the grant last verified), so that a grantee's request costs what an owner's does."""

    def __init__(self, size: int = 10_000):
        self._owners = ExpiringMap(size)
        self._addresses = ExpiringMap(size)

    def owner(self, name_hash: bytes):
        return self._owners.get(name_hash, time.monotonic())

    def remember_owner(self, name_hash: bytes, owner_id: uuid.UUID):
        self._owners.put(name_hash, owner_id, time.monotonic() + REMEMBERED_FOR_S)

    def address(self, grantee_id: uuid.UUID, name: str) -> KeyAddress | None:
        return self._addresses.get((grantee_id, name), time.monotonic())

    def remember(self, grantee_id: uuid.UUID, address: KeyAddress):
        self._addresses.put((grantee_id, address.name), address._replace(owner_remembered=True),
                            time.monotonic() + REMEMBERED_FOR_S)

    def forget(self, grantee_id: uuid.UUID, address: KeyAddress):
        self._owners.put(address.owner_name_hash, None, time.monotonic())
        self._addresses.put((grantee_id, address.name), None, time.monotonic())


def hash_key_reference(kms, owner_id: uuid.UUID, reference: str) -> bytes:
    return crypto.keyed_hash(kms.settings.key_ref_secret, b"kms-key-reference-v1", owner_id.bytes, reference.encode())


def caller_id(ctx: Context) -> uuid.UUID:
    if ctx.claims is None:
        raise Unauthorized()
    return ctx.claims.client_id


def own_address(ctx: Context, reference: str) -> KeyAddress:
    """A key of the caller's own: `{owner}:` is refused here (404, as for no such key), for the
    routes a grant never opens (rotate, retire, delete, restore, set-*, versions, grants)."""
    if ":" in reference:
        raise NotFound(NO_SUCH_KEY)
    owner_id = caller_id(ctx)
    return KeyAddress(reference, reference, owner_id, hash_key_reference(ctx.kms, owner_id, reference))


def resolve(ctx: Context, name: str) -> KeyAddress:
    """The key `name` names for the caller: its own, or `{owner}:{reference}` of another client
    (404 when no such owner exists; whether a grant exists is the statement's to say)."""
    if ":" not in name:
        return own_address(ctx, name)
    me = caller_id(ctx)
    memory = ctx.kms.grantors
    known = memory.address(me, name)
    if known is not None:
        return known
    owner_name, reference = name.split(":", 1)
    name_hash = hash_clientname(ctx.kms, owner_name)
    owner_id = memory.owner(name_hash)
    remembered = owner_id is not None
    if owner_id is None:
        with db.transaction(ctx.conn) as cur:
            cur.execute(db.sql.client_for_login, {"name_hash": name_hash})  # believed once the statement checks it
            row = cur.fetchone()
        if row is None or row.status != "active":
            raise NotFound(NO_SUCH_KEY)
        owner_id = row.id
        memory.remember_owner(name_hash, owner_id)
    ref_hash = hash_key_reference(ctx.kms, owner_id, reference)
    if owner_id == me:  # the caller's own key, named in full
        return KeyAddress(name, reference, owner_id, ref_hash)
    address = KeyAddress(name, reference, owner_id, ref_hash, name_hash, None, remembered)
    memory.remember(me, address)
    return address


def owner_moved(ctx: Context, address: KeyAddress, row) -> bool:
    """Whether a grantee's statement found no owner under the id this process remembered for the
    name (the owner was deleted and the name taken again): then it is forgotten, and the caller
    resolves the name afresh and asks once more."""
    if not (address.shared and address.owner_remembered and row.o_mac is None):
        return False
    ctx.kms.grantors.forget(caller_id(ctx), address)
    return True


def check_shared(ctx: Context, address: KeyAddress, row, operation: str) -> KeyAddress:
    """For a grantee: believe the owner's client row and the grant the statement read only once
    their MACs check out (a forged or revived grant is refused as no grant, 404, and reported),
    and remember the grant. Returns the address with the grant as read (None: there is none)."""
    if not address.shared:
        return address
    kms = ctx.kms
    me = caller_id(ctx)
    if row.o_mac is None or row.grant_id is None:
        if address.grant is not None:
            address = address._replace(grant=None)
            kms.grantors.remember(me, address)
        return address
    CLIENTS.check_values(kms, (address.owner_id, row.o_name_hash, row.o_password_hash, row.o_role, row.o_status,
                               row.o_epoch, row.o_revision, row.o_mac), refused_with=404)
    operations = " ".join(row.g_operations)
    GRANTS.check_values(kms, (row.grant_id, row.key_id, me, operations, row.g_expires_at, row.g_context, False,
                              row.g_revision, row.g_mac), refused_with=404)
    if address.grant is not None and address.grant.id == row.grant_id:  # grants never change
        return address
    grant = KnownGrant(row.grant_id, tuple(row.g_operations), decode_context(row.g_context), row.g_expires_at)
    address = address._replace(grant=grant)
    kms.grantors.remember(me, address)
    return address


def decode_context(text: str | None) -> dict | None:
    return None if text is None else json.loads(text)
