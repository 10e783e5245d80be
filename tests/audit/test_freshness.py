"""Rollback: a database writer without our secrets puts back a row the KMS itself wrote earlier,
MAC and all (a demotion, a disable, a retire, a delete, a logout or a used signup token undone).
Each test saves the row with SQL, lets the KMS change it, writes the saved copy back, and shows
the copy refused: by the process that made the change, by a process that only learned of it from
the audit trail, after a restart, by the sealer when nobody reads the row, and by `audit verify`."""
import uuid

import pytest

from kms.audit.freshness import catch_up
from kms.audit.sealer import Sealer
from tests.conftest import ADMIN_NAME, ADMIN_PASSWORD, CLIENT_PASSWORD, bearer, tamper

CLIENT_COLUMNS = "role, status, session_epoch, name_hash, revision, row_mac"
KEY_COLUMNS = "current_version, retired_below, deleted_at, destroy_after, revision, row_mac"


def saved(db, table: str, columns: str, where: str, params) -> tuple:
    with db.cursor() as cur:
        cur.execute(f"SELECT {columns} FROM {table} WHERE {where}", params)
        return cur.fetchone()


def put_back(db, table: str, columns: str, where: str, params, values: tuple):
    assignments = ", ".join(f"{column.strip()} = %s" for column in columns.split(","))
    tamper(db, f"UPDATE {table} SET {assignments} WHERE {where}", (*values, *params))


def client_id(client, auth, name: str) -> str:
    listed = client.get("/clients", headers=bearer(auth.admin_token)).json()["clients"]
    return next(entry["id"] for entry in listed if entry["clientname"] == name)


def integrity_events(db, outcome="rolled_back") -> list:
    with db.cursor() as cur:
        cur.execute("SELECT target FROM audit_events WHERE action = 'integrity.failure' AND outcome = %s", (outcome,))
        return [row[0] for row in cur.fetchall()]


def test_a_demotion_undone_in_the_database_is_refused(client, auth, db):
    auth.new_client("second-admin")
    second = client_id(client, auth, "second-admin")
    assert client.post(f"/clients/{second}/role", json={"role": "admin"},
                       headers=bearer(auth.admin_token)).status_code == 204
    old_token = auth.login("second-admin", CLIENT_PASSWORD)
    assert client.get("/clients", headers=bearer(old_token)).status_code == 200
    as_admin = saved(db, "clients", CLIENT_COLUMNS, "id = %s", (second,))
    assert client.post(f"/clients/{second}/role", json={"role": "client"},
                       headers=bearer(auth.admin_token)).status_code == 204
    put_back(db, "clients", CLIENT_COLUMNS, "id = %s", (second,), as_admin)
    assert client.get("/clients", headers=bearer(old_token)).status_code == 401  # was 200
    login = client.post("/auth/login", json={"clientname": "second-admin", "password": CLIENT_PASSWORD})
    assert login.status_code == 401  # no fresh admin token either
    assert integrity_events(db) and all(target == f"clients:{second}" for target in integrity_events(db))


def test_a_disable_undone_in_the_database_is_refused(client, auth, db):
    token = auth.new_client("disabled-svc")
    target = client_id(client, auth, "disabled-svc")
    active = saved(db, "clients", CLIENT_COLUMNS, "id = %s", (target,))
    assert client.post(f"/clients/{target}/actions/disable", headers=bearer(auth.admin_token)).status_code == 204
    assert client.get("/keys", headers=bearer(token)).status_code == 401
    put_back(db, "clients", CLIENT_COLUMNS, "id = %s", (target,), active)
    assert client.get("/keys", headers=bearer(token)).status_code == 401  # the old token stays dead


def _retired_key(client, token, db):
    client.post("/keys/actions/generate", json={"keyReference": "r"}, headers=bearer(token))
    client.post("/keys/r/actions/rotate", headers=bearer(token))
    with db.cursor() as cur:
        cur.execute("SELECT id FROM keys ORDER BY id DESC LIMIT 1")
        key_id = cur.fetchone()[0]
    key_row = saved(db, "keys", KEY_COLUMNS, "id = %s", (key_id,))
    version_row = saved(db, "key_versions", "state, kek_version, wrapped_dek", "key_id = %s AND version = 1", (key_id,))
    assert client.post("/keys/r/actions/retire", json={"belowVersion": 2}, headers=bearer(token)).status_code == 200
    assert client.get("/keys/r/1", headers=bearer(token)).status_code == 410
    return key_id, key_row, version_row


def test_a_retire_undone_in_the_database_is_refused(client, auth, db):
    token = auth.new_client()
    key_id, key_row, version_row = _retired_key(client, token, db)
    put_back(db, "keys", KEY_COLUMNS, "id = %s", (key_id,), key_row)
    put_back(db, "key_versions", "state, kek_version, wrapped_dek", "key_id = %s AND version = 1", (key_id,),
             version_row)
    answer = client.get("/keys/r/1", headers=bearer(token))
    assert answer.status_code == 500 and answer.json()["error"] == "integrity_error"  # not 200 with the DEK
    assert "dek" not in answer.text.lower().replace("integrity", "")
    assert f"keys:{key_id}" in integrity_events(db)


def test_a_delete_undone_in_the_database_is_refused(client, auth, db):
    token = auth.new_client()
    client.post("/keys/actions/generate", json={"keyReference": "gone"}, headers=bearer(token))
    with db.cursor() as cur:
        cur.execute("SELECT id FROM keys ORDER BY id DESC LIMIT 1")
        key_id = cur.fetchone()[0]
    live = saved(db, "keys", KEY_COLUMNS, "id = %s", (key_id,))
    assert client.delete("/keys/gone/actions/delete", headers=bearer(token)).status_code == 204
    assert client.get("/keys/gone", headers=bearer(token)).status_code == 404
    put_back(db, "keys", KEY_COLUMNS, "id = %s", (key_id,), live)
    assert client.get("/keys/gone", headers=bearer(token)).status_code == 500  # was 200


def test_a_logout_undone_in_the_database_is_refused(client, auth, db):
    token = auth.new_client()
    with db.cursor() as cur:
        cur.execute("SELECT jti FROM sessions ORDER BY expires_at DESC LIMIT 1")
        jti = cur.fetchone()[0]
    live = saved(db, "sessions", "revoked_at, revision, row_mac", "jti = %s", (jti,))
    assert client.post("/auth/logout", headers=bearer(token)).status_code in (200, 204)
    put_back(db, "sessions", "revoked_at, revision, row_mac", "jti = %s", (jti,), live)
    assert client.get("/keys", headers=bearer(token)).status_code == 401


def test_a_used_signup_token_put_back_signs_nobody_up(client, auth, db):
    name = f"svc-{uuid.uuid4().hex[:8]}"
    token = auth.signup_token(name)
    with db.cursor() as cur:
        cur.execute("SELECT id FROM signup_tokens ORDER BY created_at DESC LIMIT 1")
        token_id = cur.fetchone()[0]
    unused = saved(db, "signup_tokens", "used_at, revision, row_mac", "id = %s", (token_id,))
    assert client.post("/auth/signup", json={"token": token, "password": CLIENT_PASSWORD}).status_code == 200
    target = client_id(client, auth, name)
    assert client.delete(f"/clients/{target}", headers=bearer(auth.admin_token)).status_code == 204  # name free
    put_back(db, "signup_tokens", "used_at, revision, row_mac", "id = %s", (token_id,), unused)
    assert client.post("/auth/signup", json={"token": token, "password": CLIENT_PASSWORD}).status_code == 401


def test_a_process_that_did_not_make_the_change_learns_it_from_the_audit_trail(client, auth, db, another_app):
    """A second server process (another host, or a restart) knows nothing of the change in memory:
    it reads it from the audit events (MAC-checked) at start and every seal interval."""
    token = auth.new_client()
    key_id, key_row, version_row = _retired_key(client, token, db)
    put_back(db, "keys", KEY_COLUMNS, "id = %s", (key_id,), key_row)
    put_back(db, "key_versions", "state, kek_version, wrapped_dek", "key_id = %s AND version = 1", (key_id,),
             version_row)
    other = another_app()
    kms = other.extensions["kms"]
    assert kms.revisions.newest("keys", key_id) is None
    with kms.pool.connection() as conn:
        catch_up(kms, conn)
    assert kms.revisions.newest("keys", key_id) == key_row[4] + 1
    answer = other.test_client().get("/keys/r/1", headers=bearer(token))
    assert answer.status_code == 500 and answer.json["error"] == "integrity_error"


def test_audit_events_forged_in_the_database_teach_nothing(client, auth, db, another_app):
    """A writer cannot raise a row's newest revision out of reach (to deny its next change), nor
    lower one: an event without our MAC is not believed."""
    token = auth.new_client()
    client.post("/keys/actions/generate", json={"keyReference": "k"}, headers=bearer(token))
    with db.cursor() as cur:
        cur.execute("SELECT id FROM keys ORDER BY id DESC LIMIT 1")
        key_id = cur.fetchone()[0]
    tamper(db, "INSERT INTO audit_events (event_id, at, actor, action, outcome, changes, row_mac) "
               "VALUES (gen_random_uuid(), now(), 'kms', 'key.rotate', 'success', %s, '\\x00')", (f"keys:{key_id}@99",))
    kms = another_app().extensions["kms"]
    with kms.pool.connection() as conn:
        catch_up(kms, conn)
    assert kms.revisions.newest("keys", key_id) is None
    assert client.get("/keys/k", headers=bearer(token)).status_code == 200


@pytest.mark.own_app
def test_the_sealer_reports_a_row_put_back_that_nobody_reads(app, client, auth, db, runner):
    token = auth.new_client()
    key_id, key_row, version_row = _retired_key(client, token, db)
    put_back(db, "keys", KEY_COLUMNS, "id = %s", (key_id,), key_row)
    sealer = Sealer(app.extensions["kms"])
    app.extensions["kms"].revisions.forget_all()  # as a sealer process of its own knows nothing yet
    with app.extensions["kms"].pool.connection() as conn:
        sealer.seal_once(conn)
    assert f"keys:{key_id}" in integrity_events(db)
    result = runner.invoke(args=["kms", "audit", "verify"])
    assert result.exit_code == 1 and f"keys row {key_id} is at revision" in result.output, result.output


def test_a_change_no_audit_event_records_is_never_committed(app):
    """The binding is enforced where rows are written: a transaction that changed a MAC'd row past
    its first revision and recorded no event rolls back."""
    from kms import db as kms_db
    from kms.rows import KEYS
    kms = app.extensions["kms"]
    with kms.pool.connection() as conn:
        with pytest.raises(kms_db.UnrecordedChange):
            with kms_db.transaction(conn) as cur:
                cur.execute("SELECT 1")
                KEYS.sign(cur, kms, id=1, client_id=uuid.uuid4(), ref_hash=b"x", current_version=2, retired_below=1,
                          deleted=False, rotation_period_ms=None, exportable=True, revision=2)


def test_admin_login_still_works_after_its_own_changes(client, auth):
    """The master admin's row changes (a password rehash, a role change of another admin) leave
    it usable: revisions only refuse older copies."""
    assert client.post("/auth/login", json={"clientname": ADMIN_NAME, "password": ADMIN_PASSWORD}).status_code == 200


def test_a_change_rolled_back_is_not_learned(client, auth, db, app):
    """A rotation whose transaction fails (here: its audit record refused by a trigger, as a lost
    connection or a failover would fail it) leaves the key as it was, and the key keeps working."""
    token = auth.new_client()
    client.post("/keys/actions/generate", json={"keyReference": "k"}, headers=bearer(token))
    with db.cursor() as cur:
        cur.execute("CREATE FUNCTION refuse_rotate() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                    "IF NEW.action = 'key.rotate' THEN RAISE EXCEPTION 'refused'; END IF; RETURN NEW; END $$")
        cur.execute("CREATE TRIGGER refuse_rotate BEFORE INSERT ON audit_events FOR EACH ROW "
                    "EXECUTE FUNCTION refuse_rotate()")
    try:
        assert client.post("/keys/k/actions/rotate", headers=bearer(token)).status_code == 500
    finally:
        with db.cursor() as cur:
            cur.execute("DROP TRIGGER refuse_rotate ON audit_events")
            cur.execute("DROP FUNCTION refuse_rotate()")
    assert client.get("/keys/k", headers=bearer(token)).status_code == 200
    assert client.post("/keys/k/actions/rotate", headers=bearer(token)).status_code == 200


def test_look_ups_racing_rotations_are_never_taken_for_put_backs(client, auth, app):
    """A look-up whose statement began before a rotation committed reads the key row one revision
    behind what its process learned when the rotation committed: an answer from just before the
    rotation, not a row put back. Many of each, at once: never a 500."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import requests
    token = auth.new_client()
    client.post("/keys/actions/generate", json={"keyReference": "busy"}, headers=bearer(token))
    base = app.config["TEST_SERVER_URL"]
    stop = threading.Event()

    def rotate():
        with requests.Session() as session:
            while not stop.is_set():
                assert session.post(base + "/keys/busy/actions/rotate", headers=bearer(token), timeout=30).status_code == 200

    def look_up(_):
        with requests.Session() as session:
            return [session.get(base + "/keys/busy", headers=bearer(token), timeout=30).status_code for _ in range(40)]

    rotator = threading.Thread(target=rotate)
    rotator.start()
    try:
        with ThreadPoolExecutor(6) as pool:
            statuses = [status for batch in pool.map(look_up, range(6)) for status in batch]
    finally:
        stop.set()
        rotator.join()
    assert set(statuses) == {200}
