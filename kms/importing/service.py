"""A running deployment of the original Go KMS moved into this one: its clients (name, role,
bcrypt hash) and every version of every key (state kept, DEK re-wrapped under our active KEK with
our associated data, under our row MACs), read from its database with its secrets.

The original's secrets are given to the import only; of them this KMS keeps the KEY_REF_SECRET
alone, wrapped under our KEK, because the original kept no key reference, only its HMAC: an
imported key is found by that HMAC until its owner first names it (kms/keys/imported.py).
Imported clients log in with their old password, checked once against the bcrypt hash, which the
first success replaces (kms/auth/passwords.py).

Idempotent and resumable: each client and each key is imported in a transaction of its own and
recorded (imported_clients, imported_keys) by its identity in the source, so a second run, or a
run after an interrupted one, imports only what is not there yet. A row that does not open is
named and skipped, and everything else imported. Secrets that open none of the source's rows are
refused before anything is written.
"""
import hmac
import re
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field

from kms import db
from kms.audit.service import record
from kms.auth.service import hash_clientname, insert_imported_client
from kms.context import Context
from kms.config import kek_variable
from kms.crypto import IntegrityError, KekMissing, keyed_hash
from kms.errors import IntegrityFailure
from kms.importing import original
from kms.importing.original import OriginalSecrets, Unreadable
from kms.keys.imported import (ImportedVersion, imported_ref_hash, insert_imported_key, open_source_secret,
                               seal_source_secret)
from kms.rules import CLIENTNAME_PATTERN, MAX_VERSION

PROBE_ROWS = 20  # rows of each table the secrets must open before anything is written
ROLES = ("client", "admin")


class ImportRefused(Exception):
    """Nothing was imported: the run cannot start (the message says why and what to do)."""


class SecretsDoNotFit(ImportRefused):
    """The given secrets do not open the source's rows."""


@dataclass(frozen=True)
class Refusal:
    what: str
    why: str
    unreadable: bool  # it did not open (exit code 4); else it cannot live here as it is


@dataclass
class ImportReport:
    dry_run: bool
    source_clients: int = 0
    source_keys: int = 0
    source_versions: int = 0
    clients: int = 0
    keys: int = 0
    versions: int = 0
    clients_before: int = 0
    keys_before: int = 0
    key_ref_secret: str = "unchecked"  # unchecked, checked, replaced
    refused: list = field(default_factory=list)

    def refuse(self, what: str, why: str, unreadable: bool = False):
        self.refused.append(Refusal(what, why, unreadable))


@contextmanager
def _one_import_at_a_time(conn):
    with conn.cursor() as cur:
        cur.execute(db.sql.try_import_lock)
        if not cur.fetchone().locked:
            raise ImportRefused("another `kms import-seed` is running against this KMS; wait for it to finish")
    try:
        yield
    finally:
        with conn.cursor() as cur:
            cur.execute(db.sql.import_unlock)


def import_seed(ctx: Context, source, secrets: OriginalSecrets, *, dry_run: bool = False,
                check_reference: tuple[str, str] | None = None, progress=None) -> ImportReport:
    """Import everything of the original's database `source` (original.connect) that is not here
    yet. `check_reference`: (clientname, reference) of one key known to exist, to prove the
    KEY_REF_SECRET given, which no stored row can (the original keeps only hashes)."""
    report = ImportReport(dry_run=dry_run)
    with _one_import_at_a_time(ctx.conn):
        try:
            if not original.is_original_schema(source):
                raise ImportRefused("the --from database does not hold the original KMS's tables (clients, keys)")
            client_rows = original.read_clients(source)
            counts = original.count_keys(source)
            report.source_clients, report.source_keys, report.source_versions = \
                len(client_rows), counts.keys, counts.versions
            misfits = original.misfits(secrets, client_rows[:PROBE_ROWS], original.sample_key_rows(source, PROBE_ROWS))
            if misfits:
                raise SecretsDoNotFit(f"the secrets in --seed-env do not fit the --from database: {'; '.join(misfits)} "
                                      f"(of the first {PROBE_ROWS} rows of each table); nothing was imported")
            if check_reference is not None:
                _check_reference(source, secrets, client_rows, *check_reference)
                report.key_ref_secret = "checked"
            source_id = _register_source(ctx, secrets, report, proven=check_reference is not None)
            owners = _import_clients(ctx, source_id, secrets, client_rows, report)
            _import_keys(ctx, source, source_id, secrets, owners, report, progress)
        finally:
            if not source.closed:
                source.rollback()  # the read-only snapshot ends
    return report


def _check_reference(source, secrets: OriginalSecrets, client_rows: list, clientname: str, reference: str):
    owner = None
    for row in client_rows:
        try:
            if original.open_client(secrets, row).name == clientname:
                owner = row.id
                break
        except Unreadable:
            continue
    if owner is None:
        raise ImportRefused("--check-reference: the source has no client of that name")
    if not original.has_key_named(source, owner, original.hash_to_b64(secrets.key_ref_secret, reference)):
        raise SecretsDoNotFit("KEY_REF_SECRET in --seed-env is not the source's: that client has no key under its "
                              "hash of the reference given to --check-reference; nothing was imported")


def source_fingerprint(kms, secrets: OriginalSecrets) -> bytes:
    """Which deployment of the original: a keyed hash of its USERNAME_SECRET, which its rows prove."""
    return keyed_hash(kms.settings.key_ref_secret, b"kms-import-source-v1", secrets.username_secret)


def _register_source(ctx: Context, secrets: OriginalSecrets, report: ImportReport, *, proven: bool) -> int | None:
    """The source's row (None in a dry run of a first import), its KEY_REF_SECRET kept wrapped.
    A second run must give the same KEY_REF_SECRET, unless --check-reference proves the new one
    (the first was wrong: no imported key was ever found with it, so nothing depends on it)."""
    kms = ctx.kms
    fingerprint = source_fingerprint(kms, secrets)
    with db.transaction(ctx.conn) as cur:
        cur.execute(db.sql.import_source_by_fingerprint, {"fingerprint": fingerprint})
        source = cur.fetchone()
        if source is None:
            if report.dry_run:
                return None
            wrapped, kek_version = seal_source_secret(kms, fingerprint, secrets.key_ref_secret)
            cur.execute(db.sql.insert_import_source, {"fingerprint": fingerprint, "kek_version": kek_version,
                                                      "key_ref_secret": wrapped})
            return cur.fetchone().id
        try:
            kept = open_source_secret(kms, source)
        except KekMissing as missing:
            raise ImportRefused(f"this deployment's kept secret is wrapped under KEK version {missing.version}, which "
                                f"is not configured here: set {kek_variable(missing.version)} and run again") from None
        except IntegrityError:
            raise IntegrityFailure("import_sources", source.id) from None
        if not hmac.compare_digest(kept, secrets.key_ref_secret):
            if not proven:
                raise SecretsDoNotFit("KEY_REF_SECRET in --seed-env is not the one given when this deployment was "
                                      "imported first; if that one was wrong, prove this one with --check-reference "
                                      "CLIENTNAME:REFERENCE; nothing was imported")
            report.key_ref_secret = "replaced"
            if not report.dry_run:
                wrapped, kek_version = seal_source_secret(kms, fingerprint, secrets.key_ref_secret)
                cur.execute(db.sql.replace_import_source_secret, {"id": source.id, "kek_version": kek_version,
                                                                  "key_ref_secret": wrapped})
        return source.id


def _why_not_here(client: original.OriginalClient) -> str | None:
    """What keeps an original client from living here as it is."""
    if not re.fullmatch(CLIENTNAME_PATTERN, client.name):
        return "its name is not 4-64 characters of A-Z a-z 0-9 - (the original also allowed other letters)"
    if client.role not in ROLES:
        return "its role is neither client nor admin"
    return None


def _import_clients(ctx: Context, source_id: int | None, secrets: OriginalSecrets, client_rows: list,
                    report: ImportReport) -> dict:
    """Returns the source's client ids -> ours (None: imported once, deleted here since), for
    every client that is here now (or would be, in a dry run)."""
    kms = ctx.kms
    owners, names = {}, set()  # names: of this run's clients, as compared here (dry runs insert none)
    with db.transaction(ctx.conn) as cur:
        cur.execute(db.sql.imported_clients_of_source, {"source_id": source_id})
        imported = {row.original_id: row.client_id for row in cur.fetchall()}
    for row in client_rows:
        if row.id in imported:
            owners[row.id] = imported[row.id]
            report.clients_before += 1
            continue
        what = f"client #{row.id}"
        try:
            client = original.open_client(secrets, row)
        except Unreadable as unreadable:
            report.refuse(what, str(unreadable), unreadable=True)
            continue
        what = f"client #{row.id} ({client.name})"
        problem = _why_not_here(client)
        if problem:
            report.refuse(what, problem)
            continue
        client_id = uuid.uuid4()
        with db.transaction(ctx.conn) as cur:
            if report.dry_run:
                cur.execute(db.sql.client_exists, {"name_hash": hash_clientname(kms, client.name)})
                taken = cur.fetchone() is not None or client.name.lower() in names
            else:
                taken = not insert_imported_client(cur, kms, client_id, client.name, client.password_hash,
                                                   client.role)
            if taken:
                report.refuse(what, "a client of that name is here already (names compare without regard to case "
                                    "here)")
                continue
            if not report.dry_run:
                cur.execute(db.sql.record_imported_client, {"source_id": source_id, "original_id": row.id,
                                                            "client_id": client_id})
                record(cur, ctx, "client.import", target=str(client_id))
        owners[row.id] = client_id
        names.add(client.name.lower())
        report.clients += 1
    return owners


def our_versions(versions: list[original.OriginalVersion]) -> tuple[list[ImportedVersion], int]:
    """The versions as this KMS keeps them, and its retired-below line; ValueError saying why a
    key cannot be kept as it is. The original serves every version it has, whatever its state, and
    encrypts with the newest (internal/keys/service.go GetKey, GetLatestKey); it never marks one
    retired itself. Here the newest is in use and the others deprecated; versions marked retired
    stay retired (erased, 410) when every version below them is retired too: this KMS retires
    versions from the oldest up."""
    versions = sorted(versions, key=lambda version: version.version)
    if versions[0].version < 1 or versions[-1].version > MAX_VERSION:
        raise ValueError("a version number outside 1 to 2,147,483,647")
    retired = 0
    while retired < len(versions) and versions[retired].state == "retired":
        retired += 1
    if retired == len(versions):
        raise ValueError("its newest version is marked retired, yet the original encrypts with it")
    if any(version.state == "retired" for version in versions[retired:]):
        raise ValueError("a version is marked retired above one that is not; this KMS retires versions only from "
                         "the oldest up")
    newest = versions[-1].version
    ours = [ImportedVersion(version.version, "retired", None) if index < retired else
            ImportedVersion(version.version, "in-use" if version.version == newest else "deprecated", version.dek)
            for index, version in enumerate(versions)]
    return ours, versions[retired - 1].version + 1 if retired else 1


def _import_keys(ctx: Context, source, source_id: int | None, secrets: OriginalSecrets, owners: dict,
                 report: ImportReport, progress):
    kms = ctx.kms
    with db.transaction(ctx.conn) as cur:
        cur.execute(db.sql.imported_keys_of_source, {"source_id": source_id})
        imported = {bytes(row.imported_ref_hash): row.newest_version for row in cur.fetchall()}
    if progress is not None:
        progress.total = report.source_keys
    for done, key in enumerate(original.read_keys(source), 1):
        _import_key(ctx, kms, key, source_id, secrets, owners, imported, report)
        if progress is not None:
            progress.update(done)


def _import_key(ctx: Context, kms, key: original.OriginalKey, source_id, secrets, owners, imported, report):
    what = key.label
    if key.client_id not in owners:
        report.refuse(what, "its client is not imported (see above, or the source has no such client)")
        return
    owner_id = owners[key.client_id]
    if owner_id is None:
        report.refuse(what, "its client was imported by an earlier run and deleted here since")
        return
    try:
        original_hash = original.raw_url_decode(key.reference_hash)
    except ValueError:
        original_hash = b""
    if len(original_hash) != 32:
        report.refuse(what, "keyReference is not a base64url HMAC-SHA256", unreadable=True)
        return
    ref_hash = imported_ref_hash(kms, owner_id, original_hash)
    newest = max(row.version for row in key.rows)
    if ref_hash in imported:
        if newest > imported[ref_hash]:
            report.refuse(what, f"versions after {imported[ref_hash]} were added in the source after an earlier "
                                "run imported it; not imported again")
        else:
            report.keys_before += 1
        return
    opened, problems = [], []
    for row in key.rows:
        try:
            opened.append(original.open_key_version(secrets, row))
        except Unreadable as unreadable:
            problems.append(f"version {row.version} (row #{row.id}): {unreadable}")
    if problems:
        report.refuse(what, "; ".join(problems), unreadable=True)
        return
    try:
        versions, retired_below = our_versions(opened)
    except ValueError as problem:
        report.refuse(what, str(problem))
        return
    if not report.dry_run:
        with db.transaction(ctx.conn) as cur:
            inserted = insert_imported_key(cur, kms, owner_id, original_hash, versions, retired_below)
            if inserted is None:  # here already, its record gone: leave it as it is
                report.keys_before += 1
                return
            key_id, _ = inserted
            cur.execute(db.sql.record_imported_key, {"imported_ref_hash": ref_hash, "source_id": source_id,
                                                     "newest_version": newest, "key_id": key_id})
            record(cur, ctx, "key.import", target=ref_hash.hex(), version=newest)
    report.keys += 1
    report.versions += len(versions)
