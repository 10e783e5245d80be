"""The audit trail: every security event, in the same transaction as its change, chained and
verifiable, and never a secret."""
import base64
import threading
import uuid

import psycopg2
import pytest

from kms.audit.service import record, seal_pending, verify_chain
from kms.config import generate_secret
from kms.context import Context
from kms.db import connect, transaction
from tests.conftest import ADMIN_NAME, ADMIN_PASSWORD, CLIENT_PASSWORD, WRONG_PASSWORD, AuthActions, bearer, tamper

RAW_REF = "ref-zq9-quartz-ledger"


def events(db, **where):
    clause = " AND ".join(f"{k} = %({k})s" for k in where) or "true"
    with db.cursor() as cur:
        cur.execute(f"SELECT actor, action, target, version, outcome, request_id, source_ip FROM audit_events "
                    f"WHERE {clause} ORDER BY seq", where)
        return cur.fetchall()


def actions(db):
    return [row[1] for row in events(db)]


def ok(response, status=200):
    assert response.status_code == status, (response.request.method, response.request.path_url, response.text)
    return response


def cli_ok(result):
    assert result.exit_code == 0, result.output
    return result


def full_workflow(client, auth, runner, db, another_app):
    """Touch every kind of event once, each step checked to have done what it should; returns
    the secrets seen on the way."""
    seen = {"passwords": [ADMIN_PASSWORD, CLIENT_PASSWORD], "tokens": [], "deks": [], "refs": [RAW_REF]}
    seen["tokens"].append(auth.admin_token)
    signup_token = auth.signup_token("audited-svc")
    seen["tokens"].append(signup_token)
    token = ok(client.post("/auth/signup", json={"token": signup_token, "password": CLIENT_PASSWORD})).json()["token"]
    seen["tokens"].append(token)
    h = bearer(token)
    seen["deks"].append(ok(client.post("/keys/actions/generate", json={"keyReference": RAW_REF}, headers=h)).json()["dek"])
    seen["deks"].append(ok(client.post(f"/keys/{RAW_REF}/actions/rotate", headers=h)).json()["dek"])
    seen["deks"].append(ok(client.get(f"/keys/{RAW_REF}/1", headers=h)).json()["decryptWith"]["dek"])
    ok(client.post(f"/keys/{RAW_REF}/actions/set-rotation-period", json={"rotationPeriod": 60_000}, headers=h))
    with db.cursor() as cur:
        cur.execute("UPDATE key_versions SET created_at = now() - interval '2 minutes'")
    auto = ok(client.get(f"/keys/{RAW_REF}", headers=h)).json()["encryptWith"]
    assert auto["version"] == 3  # auto-rotated
    seen["deks"].append(auto["dek"])
    ok(client.post(f"/keys/{RAW_REF}/actions/retire", json={"belowVersion": 2}, headers=h))
    ok(client.delete(f"/keys/{RAW_REF}/actions/delete", headers=h), 204)
    ok(client.post(f"/keys/{RAW_REF}/actions/restore", headers=h))
    ok(client.delete(f"/keys/{RAW_REF}/actions/delete", headers=h), 204)
    with db.cursor() as cur:
        cur.execute("UPDATE keys SET destroy_after = now()")
    assert ", destroyed 1 keys" in cli_ok(runner.invoke(args=["kms", "keys", "rotate-due"])).output
    seen["deks"].append(ok(client.post("/keys/actions/generate", json={"keyReference": "rewrap-me"}, headers=h))
                        .json()["dek"])
    ok(client.post("/auth/logout", headers=h), 204)
    assert client.post("/auth/login", json={"clientname": "audited-svc", "password": "Wrong-passw0rd!"}) \
        .status_code == 401
    client_id = auth.client_id("audited-svc")
    admin = bearer(auth.admin_token)
    ok(client.post(f"/clients/{client_id}/role", json={"role": "admin"}, headers=admin), 204)
    ok(client.post(f"/clients/{client_id}/actions/disable", headers=admin), 204)
    ok(client.post(f"/clients/{client_id}/actions/enable", headers=admin), 204)
    ok(client.delete(f"/clients/{client_id}", headers=admin), 204)
    cli_token = cli_ok(runner.invoke(args=["kms", "signup-token", "--name", "cli-svc"])).stdout.strip().splitlines()[-1]
    seen["tokens"].append(cli_token)
    # a second KEK, and the DEK still under the first moved to it
    with_new_kek = another_app(KEK_2=generate_secret())
    rewrapped = cli_ok(with_new_kek.test_cli_runner().invoke(args=["kms", "kek", "rewrap"]))
    assert rewrapped.output.startswith("re-wrapped 1 DEK versions under KEK version 2")
    return seen


def test_every_security_event_is_recorded_with_its_outcome(client, auth, runner, db, another_app):
    full_workflow(client, auth, runner, db, another_app)
    for _ in range(5):
        assert client.post("/auth/login", json={"clientname": ADMIN_NAME, "password": "Wrong-passw0rd!"}) \
            .status_code == 401
    assert client.post("/auth/login", json={"clientname": ADMIN_NAME, "password": ADMIN_PASSWORD}).status_code == 429
    assert runner.invoke(args=["kms", "audit", "seal"]).exit_code == 0  # writes the counted refusals too
    recorded = {(row[1], row[4]) for row in events(db)}
    succeeded = {
        "client.create", "login", "signup_token.issue", "signup_token.use", "client.signup", "key.generate",
        "key.rotate", "key.lookup", "key.set_rotation_period", "key.auto_rotate", "key.retire", "key.delete",
        "key.restore", "key.destroy", "logout", "client.role_change", "client.disable", "client.enable",
        "client.delete", "kek.rewrap"}
    assert {(action, "success") for action in succeeded} <= recorded, \
        {(action, "success") for action in succeeded} - recorded
    assert ("login", "denied") in recorded and ("login", "throttled") in recorded


def test_events_name_actor_hashed_target_version_request_and_source(client, auth, db):
    token = auth.new_client()
    response = client.post("/keys/actions/generate", json={"keyReference": RAW_REF}, headers=bearer(token))
    actor, action, target, version, outcome, request_id, source_ip = events(db, action="key.generate")[0]
    assert uuid.UUID(actor) and outcome == "success" and version == 1
    assert str(request_id) == response.headers["X-Request-ID"]
    assert source_ip == "127.0.0.1"
    assert len(target) == 64 and RAW_REF not in target


def test_cli_actions_are_recorded_with_actor_cli(runner, db):
    runner.invoke(args=["kms", "signup-token", "--name", "cli-svc"])
    assert events(db, action="signup_token.issue")[0][0] == "cli"


def test_key_lookups_are_audited_including_misses_and_retired_versions(client, auth, db, runner):
    token = auth.new_client()
    client.post("/keys/actions/generate", json={"keyReference": "k"}, headers=bearer(token))
    client.post("/keys/k/actions/rotate", headers=bearer(token))
    client.post("/keys/k/actions/retire", json={"belowVersion": 2}, headers=bearer(token))
    assert client.get("/keys/k", headers=bearer(token)).status_code == 200
    assert client.get("/keys/missing", headers=bearer(token)).status_code == 404
    assert client.get("/keys/k/9", headers=bearer(token)).status_code == 404
    assert client.get("/keys/k/1", headers=bearer(token)).status_code == 410
    lookups = events(db, action="key.lookup")
    assert [(row[3], row[4]) for row in lookups] == [(None, "success"), (None, "not_found"), (9, "not_found"),
                                                      (1, "gone")]
    assert lookups[0][2] == lookups[2][2] == lookups[3][2] != lookups[1][2]  # hashed references
    result = runner.invoke(args=["kms", "audit", "verify"])  # every outcome's MAC checks out
    assert result.exit_code == 0, result.output


def test_a_rolled_back_change_leaves_no_event(client, auth, db, monkeypatch):
    token = auth.new_client()
    client.post("/keys/actions/generate", json={"keyReference": "k"}, headers=bearer(token))
    client.post("/keys/k/actions/rotate", headers=bearer(token))
    import kms.keys.service as keys_service

    def fail(*_args, **_kwargs):
        raise RuntimeError("simulated failure after the change and its record were written")
    monkeypatch.setattr(keys_service, "_metadata", fail)
    response = client.post("/keys/k/actions/retire", json={"belowVersion": 2}, headers=bearer(token))
    assert response.status_code == 500 and "simulated" not in response.text
    assert events(db, action="key.retire") == []
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM key_versions WHERE state = 'retired'")
        assert cur.fetchone()[0] == 0


def test_audit_endpoint_pages_events_for_admins_only(client, auth):
    token = auth.new_client()
    assert client.get("/audit", headers=bearer(token)).status_code == 403
    first = client.get("/audit?limit=2", headers=bearer(auth.admin_token)).json()["events"]
    assert len(first) == 2 and first[0]["seq"] < first[1]["seq"]
    assert set(first[0]) == {"seq", "at", "actor", "action", "target", "version", "outcome", "requestId", "sourceIp", "repeats", "detail"}
    rest = client.get(f"/audit?after={first[-1]['seq']}", headers=bearer(auth.admin_token)).json()["events"]
    assert rest and rest[0]["seq"] > first[-1]["seq"]
    assert client.get("/audit?limit=0", headers=bearer(auth.admin_token)).status_code == 400


def test_verify_passes_on_an_intact_chain(client, auth, runner):
    auth.new_client()
    assert runner.invoke(args=["kms", "audit", "seal"]).exit_code == 0
    auth.new_client()  # some events sealed, some pending: verify checks those too, writing nothing
    result = runner.invoke(args=["kms", "audit", "verify"])
    assert result.exit_code == 0, result.output
    assert "audit chain intact" in result.output


@pytest.mark.parametrize("statement,bad_seq", [
    ("UPDATE audit_events SET outcome = 'denied' WHERE seq = 3", 3),  # the altered row
    ("UPDATE audit_events SET actor = 'cli' WHERE seq = 3", 3),
    ("DELETE FROM audit_events WHERE seq = 3", 4),  # the row after the deleted one
    ("UPDATE audit_events SET chain_pos = chain_pos + 1000 WHERE seq = 3", 4),  # position 3 missing there
])
def test_verify_names_the_first_bad_row_after_tampering(client, auth, runner, db, statement, bad_seq):
    for _ in range(3):
        auth.new_client()
    assert runner.invoke(args=["kms", "audit", "seal"]).exit_code == 0
    tamper(db, statement)
    result = runner.invoke(args=["kms", "audit", "verify"])
    assert result.exit_code == 1
    assert f"BROKEN at seq {bad_seq}:" in result.output, result.output
    assert result.output.count("BROKEN at seq") == 1


def test_verify_catches_a_row_inserted_out_of_band(client, auth, runner, db):
    auth.new_client()
    runner.invoke(args=["kms", "audit", "seal"])
    with db.cursor() as cur:
        cur.execute("""INSERT INTO audit_events (event_id, at, actor, action, outcome, row_mac)
                       VALUES (gen_random_uuid(), now(), 'cli', 'client.create', 'success', '\\x00')
                       RETURNING seq""")
        forged = cur.fetchone()[0]
    result = runner.invoke(args=["kms", "audit", "verify"])
    assert result.exit_code == 1 and f"BROKEN at seq {forged}:" in result.output


def test_concurrent_appends_and_sealers_make_one_consistent_chain(app):
    kms = app.extensions["kms"]
    threads, per_thread = 12, 25
    errors = []

    def append(worker):
        conn = connect(kms.settings.database_url)
        try:
            ctx = Context(kms=kms, conn=conn, origin="cli")
            for i in range(per_thread):
                with transaction(conn) as cur:
                    record(cur, ctx, "test.append", target=f"{worker}-{i}")
                if i % 5 == 0:
                    seal_pending(conn, kms)  # sealers race each other and the appenders
        except Exception as error:  # noqa: BLE001
            errors.append(error)
        finally:
            conn.close()

    workers = [threading.Thread(target=append, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == []
    with kms.pool.connection() as conn:
        seal_pending(conn, kms, wait=True)  # what the racing sealers left
        result = verify_chain(conn, kms)
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) AS appended, count(DISTINCT chain_pos) AS positions "
                        "FROM audit_events WHERE action = 'test.append'")
            count, distinct = cur.fetchone()
            cur.execute("SELECT count(*) AS total, max(chain_pos) AS top FROM audit_events")
            total, top = cur.fetchone()
    assert result.ok, result.problem
    assert count == distinct == threads * per_thread
    assert top == total == result.checked


def test_audit_export_writes_json_lines(client, auth, runner):
    import json
    auth.new_client()
    runner.invoke(args=["kms", "audit", "seal"])
    lines = runner.invoke(args=["kms", "audit", "export"]).stdout.strip().splitlines()
    exported = [json.loads(line) for line in lines]
    assert exported and all(e["chainPos"] for e in exported)
    assert [e["seq"] for e in exported] == sorted(e["seq"] for e in exported)


def test_no_secret_reaches_a_log_line_or_an_audit_row(client, auth, runner, db, secrets_env, captured_logs,
                                                     another_app):
    seen = full_workflow(client, auth, runner, db, another_app)
    with db.cursor() as cur:
        cur.execute("SELECT string_agg(t::text, '\n') FROM audit_events t")
        audit_dump = cur.fetchone()[0]
    logs = captured_logs.getvalue()
    assert '"route": "/keys/<ref>"' in logs  # the log was captured, with route templates
    secrets = [*seen["passwords"], *seen["tokens"], *seen["deks"], *seen["refs"], *secrets_env.values()]
    secrets += [base64.urlsafe_b64decode(d + "=" * (-len(d) % 4)).hex() for d in seen["deks"]]
    for secret in secrets:
        assert secret not in logs, secret[:6]
        assert secret not in audit_dump, secret[:6]
    for token in seen["tokens"]:  # not even a token's signature part
        assert token.split(".")[-1] not in logs


# Floods of refusals are counted, not written row by row

def test_a_flood_of_refused_signups_is_one_event_with_a_count(client, app, db):
    """Counted in memory, written as one event per source with `repeats` when the counts are
    written (every AUDIT_REFUSAL_INTERVAL in a server; here at once)."""
    from kms.audit.service import flush_refusals
    from kms.context import Context
    for _ in range(40):
        assert client.post("/auth/signup", json={"token": "kms_st_forged", "password": CLIENT_PASSWORD}
                           ).status_code == 401
    with db.cursor() as cur:  # nothing written per refusal
        cur.execute("SELECT count(*) FROM audit_events WHERE action = 'signup' AND outcome = 'denied'")
        assert cur.fetchone()[0] == 0
    with app.extensions["kms"].pool.connection() as conn:
        assert flush_refusals(Context(kms=app.extensions["kms"], conn=conn)) == 1
    with db.cursor() as cur:
        cur.execute("SELECT repeats, source_ip FROM audit_events WHERE action = 'signup' AND outcome = 'denied'")
        assert cur.fetchall() == [(40, "127.0.0.1")]
    events = client.get("/audit?limit=1000", headers=bearer(AuthActions(client).admin_token)).json()["events"]
    assert [e["repeats"] for e in events if e["action"] == "signup" and e["outcome"] == "denied"] == [40]


def test_refusal_counts_are_kept_when_the_database_is_down_and_written_later(app):
    from kms.audit.service import flush_refusals, record_refusal
    from kms.context import Context
    kms = app.extensions["kms"]
    record_refusal(Context(kms=kms, conn=None, source_ip="10.1.1.1"), "signup", "denied")

    class Broken:
        def cursor(self, **_kwargs):
            raise psycopg2.OperationalError("the database is down")

    with pytest.raises(psycopg2.OperationalError):
        flush_refusals(Context(kms=kms, conn=Broken()))
    with kms.pool.connection() as conn:
        assert flush_refusals(Context(kms=kms, conn=conn)) == 1  # the count was put back, not lost


def test_throttled_logins_are_counted_and_the_chain_still_verifies(client, app, db, runner):
    for _ in range(5):
        client.post("/auth/login", json={"clientname": ADMIN_NAME, "password": WRONG_PASSWORD})
    for _ in range(30):  # each on a new connection: a 429's connection is not read for a second
        assert client.post("/auth/login", json={"clientname": ADMIN_NAME, "password": WRONG_PASSWORD},
                           headers={"Connection": "close"}).status_code == 429
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM audit_events WHERE action = 'login' AND outcome = 'throttled'")
        assert cur.fetchone()[0] == 0  # counted in memory
    assert runner.invoke(args=["kms", "audit", "seal"]).exit_code == 0  # writes the counts, then seals
    result = runner.invoke(args=["kms", "audit", "verify"])
    assert result.exit_code == 0, result.output
    with db.cursor() as cur:
        cur.execute("SELECT repeats FROM audit_events WHERE action = 'login' AND outcome = 'throttled' ORDER BY seq")
        assert cur.fetchall() == [(30,)]
        cur.execute("SET session_replication_role = replica")  # a writer who got past the trigger
        cur.execute("UPDATE audit_events SET repeats = 1 WHERE repeats = 30")
    tampered = runner.invoke(args=["kms", "audit", "verify"])
    assert tampered.exit_code == 1 and "MAC" in tampered.output


@pytest.mark.parametrize("attack", ["UPDATE audit_events SET repeats = 1 WHERE action = 'signup' AND outcome = 'denied'",
                                    "DELETE FROM audit_events WHERE action = 'signup' AND outcome = 'denied'"])
def test_refusal_counts_are_under_a_mac_from_the_moment_they_are_written(client, app, db, runner, attack):
    """A flood of bad signup tokens (ours and the original's format), then a superuser past the
    triggers. Until they are written the counts are in the server's memory: no table but the audit
    trail has a row of them to change or delete. Once written they are audit events under a row
    MAC, and a changed or deleted count fails `kms audit verify`."""
    from kms.audit.service import flush_refusals
    for token in ["kms_st_" + "x" * 43, "eyJ2ZXIiOiIxIn0.e30.c2ln"] * 20:
        assert client.post("/auth/signup", json={"token": token, "password": CLIENT_PASSWORD}).status_code == 401
    with db.cursor() as cur:
        cur.execute("SET session_replication_role = replica")
        cur.execute("SELECT table_name FROM information_schema.columns WHERE table_schema = 'public' "
                    "AND column_name IN ('action', 'outcome') GROUP BY table_name HAVING count(*) = 2")
        assert [row[0] for row in cur.fetchall()] == ["audit_events"]
        cur.execute("SELECT count(*) FROM audit_events WHERE action = 'signup'")
        assert cur.fetchone()[0] == 0  # nothing written yet, so nothing to delete
        cur.execute("SET session_replication_role = DEFAULT")
    kms = app.extensions["kms"]
    with kms.pool.connection() as conn:
        assert flush_refusals(Context(kms=kms, conn=conn)) == 1
    cli_ok(runner.invoke(args=["kms", "audit", "verify"]))
    cli_ok(runner.invoke(args=["kms", "audit", "seal"]))  # the count is not the chain's head
    with db.cursor() as cur:
        cur.execute("SELECT repeats FROM audit_events WHERE action = 'signup' AND outcome = 'denied'")
        assert cur.fetchall() == [(40,)]
        cur.execute("SET session_replication_role = replica")
        cur.execute(attack)
        assert cur.rowcount == 1
        cur.execute("SET session_replication_role = DEFAULT")
    tampered = runner.invoke(args=["kms", "audit", "verify"])
    assert tampered.exit_code == 1 and "BROKEN" in tampered.output, tampered.output
