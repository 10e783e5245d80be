"""An untrusted database (kms.rows): someone who can write it, but holds none of our secrets, gains
no authority and changes nothing served (the audit chain: tests/audit/test_chain.py). Each test performs the attack with direct SQL, as a stolen DBA
credential would, and checks that the row is not obeyed and that the operator is told."""
import base64
import datetime
import os
import uuid

import psycopg2
import pytest
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from kms import db as kms_db
from kms.errors import IntegrityFailure
from kms.keys.service import LookUpRow
from kms.rows import AUDIT_CHAIN_STATE, CLIENTS, KEYS, SESSIONS, SIGNUP_TOKENS, TABLES
from tests.conftest import ADMIN_NAME, ADMIN_PASSWORD, CLIENT_PASSWORD, bearer, tamper

ATTACKER_PASSWORD = "Attacker-passw0rd!"


def integrity_events(db):
    with db.cursor() as cur:
        cur.execute("SELECT target FROM audit_events WHERE action = 'integrity.failure' AND outcome = 'detected'")
        return [row[0] for row in cur.fetchall()]


def assert_reported(db, client, table, captured_logs=None):
    assert any(target.startswith(f"{table}:") for target in integrity_events(db)), integrity_events(db)
    metrics = client.get("/metrics").text
    assert f'kms_integrity_failures_total{{table="{table}"}}' in metrics
    if captured_logs is not None:
        assert "stored row failed its integrity check" in captured_logs.getvalue()


# Authority

@pytest.mark.own_app
def test_a_client_made_admin_in_the_database_gets_nothing(client, auth, db, captured_logs):
    token = auth.new_client("plain-svc")
    tamper(db, "UPDATE clients SET role = 'admin' WHERE role = 'client'")
    response = client.get("/clients", headers=bearer(token))
    assert response.status_code == 401 and response.json()["error"] == "unauthorized"
    assert client.get("/keys", headers=bearer(token)).status_code == 401  # not obeyed anywhere
    assert client.post("/auth/login", json={"clientname": "plain-svc", "password": CLIENT_PASSWORD}
                       ).status_code == 401
    assert_reported(db, client, "clients", captured_logs)
    assert "plain-svc" not in captured_logs.getvalue() and CLIENT_PASSWORD not in captured_logs.getvalue()


@pytest.mark.own_app
def test_a_password_hash_written_by_the_attacker_lets_nobody_in(client, auth, db):
    auth.new_client("victim-svc")
    forged = Argon2id(salt=os.urandom(16), length=32, iterations=2, lanes=1,
                      memory_cost=19 * 1024).derive_phc_encoded(ATTACKER_PASSWORD.encode())
    tamper(db, "UPDATE clients SET password_hash = %s WHERE role = 'client'", (forged,))
    response = client.post("/auth/login", json={"clientname": "victim-svc", "password": ATTACKER_PASSWORD})
    assert response.status_code == 401 and response.json()["error"] == "unauthorized"
    assert_reported(db, client, "clients")


@pytest.mark.own_app
def test_a_revoked_session_revived_in_the_database_stays_dead(client, auth, db):
    token = auth.new_client()
    assert client.post("/auth/logout", headers=bearer(token)).status_code == 204
    tamper(db, "UPDATE sessions SET revoked_at = NULL")
    assert client.get("/keys", headers=bearer(token)).status_code == 401
    assert client.get("/keys/anything", headers=bearer(token)).status_code == 401  # the look-up path too
    assert_reported(db, client, "sessions")


def test_a_disabled_client_re_enabled_in_the_database_stays_disabled(client, auth, db):
    token = auth.new_client("disabled-svc")
    client_id = auth.client_id("disabled-svc")
    assert client.post(f"/clients/{client_id}/actions/disable", headers=bearer(auth.admin_token)).status_code == 204
    tamper(db, "UPDATE clients SET status = 'active' WHERE id = %s", (client_id,))
    assert client.get("/keys", headers=bearer(token)).status_code == 401
    assert client.post("/auth/login", json={"clientname": "disabled-svc", "password": CLIENT_PASSWORD}
                       ).status_code == 401
    # ... and putting back the whole row as it was before the disable does not revive old tokens:
    # the client's session epoch moved on, and the saved row is of the old epoch.


def test_an_old_client_row_put_back_does_not_revive_its_tokens(client, auth, db):
    token = auth.new_client("epoch-svc")
    client_id = auth.client_id("epoch-svc")
    saved = tamper(db, "SELECT status, session_epoch, row_mac FROM clients WHERE id = %s", (client_id,))[0]
    client.post(f"/clients/{client_id}/actions/disable", headers=bearer(auth.admin_token))
    client.post(f"/clients/{client_id}/actions/enable", headers=bearer(auth.admin_token))
    assert client.get("/keys", headers=bearer(token)).status_code == 401  # disable ended the session
    tamper(db, "UPDATE sessions SET epoch = %s", (saved[1],))  # the session's epoch is under its MAC anyway
    assert client.get("/keys", headers=bearer(token)).status_code == 401


@pytest.mark.own_app
def test_a_signup_token_forged_re_roled_or_un_used_in_the_database_is_refused(client, auth, db):
    token = auth.signup_token("target-svc")
    tamper(db, "UPDATE signup_tokens SET role = 'admin'")
    assert client.post("/auth/signup", json={"token": token, "password": CLIENT_PASSWORD}).status_code == 401
    tamper(db, "UPDATE signup_tokens SET role = 'client'")  # put back: the row's MAC matches again
    assert client.post("/auth/signup", json={"token": token, "password": CLIENT_PASSWORD}).status_code == 200
    tamper(db, "UPDATE signup_tokens SET used_at = NULL")
    second = client.post("/auth/signup", json={"token": token, "password": CLIENT_PASSWORD})
    assert second.status_code == 401
    assert_reported(db, client, "signup_tokens")


# What is served

@pytest.fixture
def owner(auth, client):
    token = auth.new_client("key-owner")
    assert client.post("/keys/actions/generate", json={"keyReference": "k"}, headers=bearer(token)).status_code == 200
    for _ in range(2):
        assert client.post("/keys/k/actions/rotate", headers=bearer(token)).status_code == 200
    return token


@pytest.mark.own_app
def test_moving_the_current_version_back_is_an_integrity_error(client, db, owner):
    tamper(db, "UPDATE keys SET current_version = 1")
    response = client.get("/keys/k", headers=bearer(owner))
    assert response.status_code == 500 and response.json()["error"] == "integrity_error"
    assert client.post("/keys/k/actions/rotate", headers=bearer(owner)).status_code == 500
    assert_reported(db, client, "keys")


def test_version_states_written_in_the_database_change_nothing_served(client, db, owner):
    tamper(db, "UPDATE key_versions SET state = 'deprecated'")
    tamper(db, "UPDATE key_versions SET state = 'in-use' WHERE version = 1")
    body = client.get("/keys/k", headers=bearer(owner)).json()
    assert body["encryptWith"]["version"] == 3 and body["decryptWith"]["version"] == 3


def test_a_retired_versions_saved_row_put_back_stays_retired(client, db, owner):
    saved = tamper(db, "SELECT kek_version, wrapped_dek FROM key_versions WHERE version = 1")[0]
    assert client.post("/keys/k/actions/retire", json={"belowVersion": 2}, headers=bearer(owner)).status_code == 200
    tamper(db, "UPDATE key_versions SET state = 'deprecated', kek_version = %s, wrapped_dek = %s WHERE version = 1",
        saved)
    assert client.get("/keys/k/1", headers=bearer(owner)).status_code == 410


def test_an_older_key_row_put_back_is_an_integrity_error(client, db, owner):
    saved = tamper(db, "SELECT current_version, row_mac FROM keys")[0]  # version 3 is current
    assert client.post("/keys/k/actions/rotate", headers=bearer(owner)).status_code == 200
    tamper(db, "UPDATE keys SET current_version = %s, row_mac = %s", saved)
    tamper(db, "UPDATE key_versions SET state = 'deprecated'")
    tamper(db, "UPDATE key_versions SET state = 'in-use' WHERE version = 3")
    response = client.get("/keys/k", headers=bearer(owner))
    assert response.status_code == 500 and response.json()["error"] == "integrity_error"


def test_a_deleted_key_undeleted_in_the_database_is_not_served(client, db, owner):
    # (the default KEY_DELETION_WAIT keeps the row until it is destroyed)
    assert client.delete("/keys/k/actions/delete", headers=bearer(owner)).status_code == 204
    tamper(db, "UPDATE keys SET deleted_at = NULL, destroy_after = NULL")
    assert client.get("/keys/k", headers=bearer(owner)).status_code == 500


def test_a_key_moved_to_another_owner_is_not_served(client, auth, db, owner):
    thief = auth.new_client("thief-svc")
    thief_id = auth.client_id("thief-svc")
    tamper(db, "UPDATE keys SET client_id = %s", (thief_id,))
    assert client.get("/keys/k", headers=bearer(thief)).status_code == 404  # the reference's hash names its owner



# Upgrading

def test_upgrading_computes_the_macs_of_existing_rows_once(new_database, base_env, monkeypatch):
    """A database written before row MACs existed (schema 3) keeps working after the upgrade, and
    the upgrade refuses to run without the secrets that make the MACs."""
    from kms.app import create_app
    url = new_database()
    files = kms_db.migration_files()
    monkeypatch.setattr(kms_db, "migration_files", lambda: [f for f in files if f[0] <= 3])
    kms_db.migrate(url)
    old = _write_schema_3_client(url, base_env, "old-svc")
    monkeypatch.setattr(kms_db, "migration_files", lambda: files)
    with pytest.raises(kms_db.MigrationNeedsSecrets):
        kms_db.migrate(url)  # no secrets, rows to MAC: refused, nothing applied
    app = create_app({**base_env, "DATABASE_URL": url})
    try:
        from tests.conftest import HttpClient, serve_in_thread, stop_server
        server, base_url = serve_in_thread(app, threads=2)
        try:
            with HttpClient(base_url) as http:
                login = http.post("/auth/login", json={"clientname": "old-svc", "password": CLIENT_PASSWORD})
                assert login.status_code == 200, login.text
                assert http.get("/keys", headers=bearer(login.json()["token"])).status_code == 200
                admin = http.post("/auth/login", json={"clientname": ADMIN_NAME, "password": ADMIN_PASSWORD})
                assert admin.status_code == 200
        finally:
            stop_server(server)
    finally:
        app.extensions["kms"].close()
    conn = psycopg2.connect(url)
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM clients WHERE row_mac IS NULL")
        assert cur.fetchone()[0] == 0
        cur.execute("SELECT id FROM clients WHERE id = %s", (old,))
        assert cur.fetchone() == (old,)
    conn.close()


def _write_schema_3_client(url, env, clientname):
    """A client as the code before row MACs stored it."""
    from kms import crypto
    from kms.auth.passwords import PasswordHasher

    def key(name):
        value = env[name]
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))

    client_id = uuid.uuid4()
    keyring = crypto.Keyring({1: key("KEK")}, 1, key("DB_SECRET"))
    name_hash = crypto.keyed_hash(key("USERNAME_SECRET"), b"kms-clientname-v1", clientname.encode())
    conn = psycopg2.connect(url)
    with conn, conn.cursor() as cur:
        cur.execute("INSERT INTO clients (id, name_hash, name_enc, password_hash, role) VALUES (%s, %s, %s, %s, %s)",
                    (client_id, name_hash, keyring.encrypt_field(clientname, b"client-name", client_id.bytes),
                     PasswordHasher(admitted=1).hash(CLIENT_PASSWORD), "client"))
    conn.close()
    return client_id


# Each table's MAC'd columns are declared once (kms.rows); the tests below hold the declarations
# against the schema and against every query that reads a row to check it.

# The queries whose rows the services check, the table each row is of, and the prefix its columns
# carry there (a join names them apart).
CHECKED_READS = [
    ("authenticate", SESSIONS, "session_"),
    ("authenticate", CLIENTS, "client_"),
    ("login_check", CLIENTS, "client_"),
    ("lock_client", CLIENTS, ""),
    ("lock_usable_signup_token", SIGNUP_TOKENS, ""),
    ("lock_key", KEYS, ""),
    ("lock_key_if_free", KEYS, ""),
    ("lock_owner_keys", KEYS, ""),
    ("lock_imported_key", KEYS, ""),
]
# The reads of migration 007's backfill: the MAC'd columns, without a MAC yet.
BACKFILL_READS = [("clients_for_row_macs", CLIENTS), ("sessions_for_row_macs", SESSIONS),
                  ("signup_tokens_for_row_macs", SIGNUP_TOKENS), ("keys_for_row_macs", KEYS),
                  ("audit_chain_state_for_row_macs", AUDIT_CHAIN_STATE)]
PARAMETERS = {"jti": uuid.uuid4(), "client_id": uuid.uuid4(), "name_hash": b"x", "client": "x",
              "window": datetime.timedelta(minutes=1), "token_hash": b"x", "ref_hash": b"x", "deleted": False,
              "key_id": 1, "candidates": [b"x"]}


@pytest.fixture
def cursor(app):
    with app.extensions["kms"].pool.connection() as conn, kms_db.transaction(conn) as cur:
        yield cur
        cur.execute("ROLLBACK")  # nothing these reads locked outlives the test
        cur.begin_pending = True  # (and the block's COMMIT has nothing left to commit)


def columns_read(cur, query: str) -> set[str]:
    cur.execute(getattr(kms_db.sql, query), PARAMETERS)
    return {column.name for column in cur.description}


@pytest.mark.parametrize("table", TABLES, ids=lambda table: table.name)
def test_every_maced_column_is_a_column_of_its_table_or_declared_as_an_expression(cursor, table):
    cursor.execute("SELECT column_name FROM information_schema.columns WHERE table_name = %s", (table.name,))
    stored = {row.column_name for row in cursor.fetchall()}
    assert "row_mac" in stored
    for column in table.columns:
        assert column in stored or column in table.derived, column
    for column, expression in table.derived.items():
        assert expression.split()[0] in stored  # `revoked_at IS NOT NULL`: read off a stored column


@pytest.mark.parametrize("query,table,prefix", CHECKED_READS, ids=lambda value: getattr(value, "name", value))
def test_each_checked_read_selects_every_maced_column_by_its_declared_name(cursor, query, table, prefix):
    wanted = {prefix + column for column in (*table.columns, "row_mac")}
    assert wanted <= columns_read(cursor, query)


@pytest.mark.parametrize("query,table", BACKFILL_READS, ids=lambda value: getattr(value, "name", value))
def test_the_backfill_reads_exactly_the_maced_columns(cursor, query, table):
    assert columns_read(cursor, query) == set(table.columns)


def test_the_look_up_statement_reads_what_its_checks_name(cursor):
    """The hot path's statement returns each checked row's columns under prefixed names; the
    ones it does not return are pinned by its WHERE clause (kms.keys.service._check_look_up)."""
    params = {"jti": str(uuid.uuid4()), "client_id": str(uuid.uuid4()), "ref_hash": b"x", "version": None,
              "event_id": uuid.uuid4(), "at": "2026-01-01T00:00:00+00:00", "request_id": None, "source_ip": None,
              "row_mac": b"x", "audit": False, "keks": [1], "detail": None, "owner_id": str(uuid.uuid4()),
              "shared": True, "owner_name_hash": b"o", "grant_id": None}
    cursor.execute(kms_db.sql.lookup_key, params)
    assert tuple(column.name for column in cursor.description) == LookUpRow._fields  # as the hot path reads it
    read = {column.name for column in cursor.description}
    assert {"session_expires_at", "session_epoch", "session_row_mac"} <= read
    assert {"client_name_hash", "client_password_hash", "client_role", "client_row_mac"} <= read
    assert {"key_id", "key_current_version", "key_retired_below", "key_rotation_period_ms", "key_row_mac"} <= read
    # a grantee's: the owner's client row and the grant (kms.keys.address.check_shared)
    assert {"o_name_hash", "o_password_hash", "o_role", "o_status", "o_epoch", "o_revision", "o_mac"} <= read
    assert {"grant_id", "g_operations", "g_expires_at", "g_context", "g_revision", "g_mac"} <= read


def test_a_row_with_one_maced_column_changed_is_refused(app):
    """The declaration is what the MAC covers: change any one column and the check refuses."""
    kms = app.extensions["kms"]
    values = {"id": uuid.uuid4(), "name_hash": b"n", "password_hash": "p", "role": "client", "status": "active",
              "session_epoch": 0, "revision": 1}
    mac = CLIENTS.mac(kms, **values)

    class Row:
        def __init__(self, **columns):
            self.__dict__.update(columns)

    CLIENTS.check(kms, Row(**values, row_mac=mac))
    for column, other in (("name_hash", b"m"), ("password_hash", "q"), ("role", "admin"), ("status", "disabled"),
                          ("session_epoch", 1), ("revision", 2)):
        with pytest.raises(IntegrityFailure) as refused:
            CLIENTS.check(kms, Row(**{**values, column: other}, row_mac=mac))
        assert refused.value.table == "clients"
