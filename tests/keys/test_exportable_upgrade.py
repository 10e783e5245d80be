"""Upgrading to the schema where a key's exportability is under its row MAC (migration 009): the
key rows already stored are MAC'd anew, each only once its MAC over the earlier declaration checks
out, so a row tampered with before the upgrade stays refused after it."""
import base64
import uuid
from types import SimpleNamespace

import psycopg2
import pytest

from kms import crypto
from kms import db as kms_db
from kms.app import create_app
from kms.errors import IntegrityFailure
from kms.rows import KEYS, KEYS_BEFORE_EXPORTABLE, Revisions


def secret(env, name):
    value = env[name]
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


def test_upgrading_re_macs_the_stored_key_rows_and_only_those_that_check_out(new_database, base_env, monkeypatch):
    url = new_database()
    files = kms_db.migration_files()
    monkeypatch.setattr(kms_db, "migration_files", lambda: [f for f in files if f[0] < 9])
    kms_db.migrate(url)
    keys = SimpleNamespace(keyring=crypto.Keyring({1: secret(base_env, "KEK")}, 1, secret(base_env, "DB_SECRET")),
                           revisions=Revisions())
    owner = uuid.uuid4()
    conn = psycopg2.connect(url)
    rows = {}
    with conn, conn.cursor() as cur:  # keys as the code before 009 stored them
        cur.execute("INSERT INTO clients (id, name_hash, name_enc, password_hash, role) VALUES (%s, %s, '\\x00', 'x', "
                    "'client')", (str(owner), owner.bytes))
        for name, current in (("good", 3), ("tampered", 2)):
            ref_hash = crypto.keyed_hash(b"k" * 32, name.encode())
            cur.execute("INSERT INTO keys (client_id, ref_hash, ref_enc, current_version, retired_below) "
                        "VALUES (%s, %s, '\\x00', %s, 1) RETURNING id", (str(owner), ref_hash, current))
            key_id = cur.fetchone()[0]
            columns = {"id": key_id, "client_id": owner, "ref_hash": ref_hash, "current_version": current,
                       "retired_below": 1, "deleted": False, "rotation_period_ms": None, "revision": 1}
            cur.execute("UPDATE keys SET row_mac = %s WHERE id = %s", (KEYS_BEFORE_EXPORTABLE.mac(keys, **columns), key_id))
            rows[name] = columns
        cur.execute("UPDATE keys SET current_version = 5 WHERE id = %s", (rows["tampered"]["id"],))  # no new MAC
    monkeypatch.setattr(kms_db, "migration_files", lambda: files)
    with pytest.raises(kms_db.MigrationNeedsSecrets):
        kms_db.migrate(url)  # the step needs the secrets: refused, nothing applied
    app = create_app({**base_env, "DATABASE_URL": url})  # starting the server migrates, with the step
    app.extensions["kms"].close()
    with conn.cursor() as cur:
        cur.execute("SELECT id, client_id, ref_hash, current_version, retired_below, deleted_at IS NOT NULL AS deleted, "
                    "rotation_period_ms, exportable, revision, row_mac FROM keys ORDER BY id")
        good, tampered = cur.fetchall()
    conn.close()

    def check(row):
        names = ("id", "client_id", "ref_hash", "current_version", "retired_below", "deleted", "rotation_period_ms",
                 "exportable", "revision", "row_mac")
        KEYS.check(keys, SimpleNamespace(**dict(zip(names, row))))

    check(good)  # MAC'd anew, exportable (as every key was before)
    assert good[7] is True
    with pytest.raises(IntegrityFailure):
        check(tampered)
    assert bytes(tampered[9]) == bytes(KEYS_BEFORE_EXPORTABLE.mac(keys, **rows["tampered"]))  # left as it was


def test_upgrading_from_before_revisions_macs_key_rows_over_every_column_once(new_database, base_env, monkeypatch):
    """From schema 6 (before revisions): migration 007 MACs the key rows anew over the declaration
    of today (exportable true, revision 1), and 009's step finds them MAC'd already."""
    url = new_database()
    files = kms_db.migration_files()
    monkeypatch.setattr(kms_db, "migration_files", lambda: [f for f in files if f[0] <= 6])
    kms_db.migrate(url)
    keys = SimpleNamespace(keyring=crypto.Keyring({1: secret(base_env, "KEK")}, 1, secret(base_env, "DB_SECRET")),
                           revisions=Revisions())
    owner = uuid.uuid4()
    conn = psycopg2.connect(url)
    with conn, conn.cursor() as cur:
        cur.execute("INSERT INTO clients (id, name_hash, name_enc, password_hash, role) VALUES (%s, %s, '\\x00', 'x', "
                    "'client')", (str(owner), owner.bytes))
        cur.execute("INSERT INTO keys (client_id, ref_hash, ref_enc, current_version, retired_below) "
                    "VALUES (%s, %s, '\\x00', 2, 1)", (str(owner), crypto.keyed_hash(b"k" * 32, b"old")))
    monkeypatch.setattr(kms_db, "migration_files", lambda: files)
    app = create_app({**base_env, "DATABASE_URL": url})
    app.extensions["kms"].close()
    with conn.cursor() as cur:
        cur.execute("SELECT id, client_id, ref_hash, current_version, retired_below, deleted_at IS NOT NULL AS deleted, "
                    "rotation_period_ms, exportable, revision, row_mac FROM keys")
        (row,) = cur.fetchall()
    conn.close()
    names = ("id", "client_id", "ref_hash", "current_version", "retired_below", "deleted", "rotation_period_ms",
             "exportable", "revision", "row_mac")
    stored = dict(zip(names, row))
    assert stored["exportable"] is True and stored["revision"] == 1
    KEYS.check(keys, SimpleNamespace(**stored))
