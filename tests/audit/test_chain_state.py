"""Nobody can quietly stop or re-seal the audit chain: verify writes nothing; a chain started once
is never started again over its unchained rows; a tampering found stays flagged (in the database
and in the head file) across restarts until an operator acknowledges it, audited; a garbled head
file is one line and an exit code; sealing that is held up says so, naming what holds it."""
import json
import re

import psycopg2
import pytest

from kms.audit.sealer import Sealer
from kms.config import load_settings
from tests.conftest import bearer, metric, tamper


def chain_snapshot(db) -> list:
    with db.cursor() as cur:
        cur.execute("SELECT seq, chain_pos, chain_hash FROM audit_events ORDER BY seq")
        return cur.fetchall()


def head_of(output: str) -> str:
    return re.search(r"head (\d+:[0-9a-f]{64})", output).group(1)


def test_verify_writes_nothing(client, auth, runner, db):
    auth.new_client()
    assert runner.invoke(args=["kms", "audit", "seal"]).exit_code == 0
    auth.new_client()  # pending, unsealed
    before = chain_snapshot(db)
    result = runner.invoke(args=["kms", "audit", "verify"])
    assert result.exit_code == 0, result.output
    assert "events not sealed yet" in result.output
    assert chain_snapshot(db) == before  # no row sealed, none added (no audit.verify event either)


def test_a_young_chain_wiped_is_not_sealed_again(client, auth, runner, db):
    """The reported attack: every chain column of a young database cleared, then `audit seal`."""
    auth.new_client()
    assert runner.invoke(args=["kms", "audit", "seal"]).exit_code == 0
    tamper(db, "UPDATE audit_events SET chain_pos = NULL, chain_hash = NULL, chain_format = NULL")
    tamper(db, "DELETE FROM audit_events WHERE action = 'client.signup'")
    sealed = runner.invoke(args=["kms", "audit", "seal"])
    assert sealed.exit_code == 4 and "started before and is empty now" in sealed.output, sealed.output
    verified = runner.invoke(args=["kms", "audit", "verify"])
    assert verified.exit_code == 1 and "started before and is empty now" in verified.output


def test_the_state_row_put_back_or_forged_is_caught(client, auth, runner, db):
    auth.new_client()
    with db.cursor() as cur:
        cur.execute("SELECT started, revision, row_mac FROM audit_chain_state")
        before_start = cur.fetchone()
    assert runner.invoke(args=["kms", "audit", "seal"]).exit_code == 0
    tamper(db, "UPDATE audit_events SET chain_pos = NULL, chain_hash = NULL, chain_format = NULL")
    tamper(db, "UPDATE audit_chain_state SET started = %s, revision = %s, row_mac = %s", before_start)
    sealed = runner.invoke(args=["kms", "audit", "seal"])  # the copy from before the chain started
    assert sealed.exit_code == 4 and "put back" in sealed.output, sealed.output
    tamper(db, "UPDATE audit_chain_state SET row_mac = '\\x00'")
    assert runner.invoke(args=["kms", "audit", "verify"]).exit_code == 1


@pytest.mark.own_app(AUDIT_SEAL_INTERVAL="200")
def test_a_tampering_found_stays_flagged_across_restarts_until_acknowledged(make_app, app, tmp_path, db, client,
                                                                            auth):
    """The reported attack: one row deleted and the chain cleared after it. The sealer flags it;
    before, `audit verify` re-sealed the cut chain and printed "intact", and a restart cleared the
    flag. Now: verify fails, seal refuses, a new sealer process is flagged at once, and only
    `audit acknowledge --head` (audited) lets sealing resume, from the head the operator accepts."""
    head_file = tmp_path / "state" / "audit-head"
    app = make_app(AUDIT_HEAD_FILE=str(head_file))
    runner = app.test_cli_runner()
    for name in ("svc-one", "svc-two", "svc-three"):
        runner.invoke(args=["kms", "signup-token", "--name", name])
    first = runner.invoke(args=["kms", "audit", "seal"])
    assert first.exit_code == 0, first.output
    accepted = None
    with db.cursor() as cur:
        cur.execute("SELECT chain_pos, encode(chain_hash, 'hex') FROM audit_events WHERE chain_pos = 2")
        position, mac = cur.fetchone()
        accepted = f"{position}:{mac}"
    tamper(db, "DELETE FROM audit_events WHERE chain_pos = 3")
    tamper(db, "UPDATE audit_events SET chain_pos = NULL, chain_hash = NULL, chain_format = NULL WHERE chain_pos > 3")
    kms = app.extensions["kms"]
    sealer = Sealer(kms)
    with kms.pool.connection() as conn:
        sealer.seal_once(conn)
    assert sealer.tampered is not None
    assert "tampered: " in head_file.read_text()
    verified = runner.invoke(args=["kms", "audit", "verify"])
    assert verified.exit_code == 1, verified.output
    assert runner.invoke(args=["kms", "audit", "seal"]).exit_code == 4
    # A restart: a new process, the flag read back from the database and the head file.
    restarted = make_app(AUDIT_HEAD_FILE=str(head_file))
    fresh = Sealer(restarted.extensions["kms"])
    with restarted.extensions["kms"].pool.connection() as conn:
        fresh.seal_once(conn)
    assert fresh.tampered is not None
    with db.cursor() as cur:
        cur.execute("SELECT tampered IS NOT NULL FROM audit_chain_state")
        assert cur.fetchone()[0]
    wrong = runner.invoke(args=["kms", "audit", "acknowledge", "--head", "2:" + "0" * 64])
    assert wrong.exit_code == 4
    acknowledged = runner.invoke(args=["kms", "audit", "acknowledge", "--head", accepted])
    assert acknowledged.exit_code == 0, acknowledged.output
    with restarted.extensions["kms"].pool.connection() as conn:
        fresh.seal_once(conn)
    assert fresh.tampered is None
    assert "tampered" not in head_file.read_text()
    after = runner.invoke(args=["kms", "audit", "verify"])
    assert after.exit_code == 0, after.output
    with db.cursor() as cur:
        cur.execute("SELECT target FROM audit_events WHERE action = 'audit.acknowledge'")
        assert cur.fetchall() == [(accepted,)]


@pytest.mark.parametrize("content", ["", "garbage\n", "12:zz\n", "1:" + "a" * 64 + "\nnonsense\n"])
def test_a_garbled_head_file_is_one_line_and_counts_as_tampering(make_app, tmp_path, content):
    head_file = tmp_path / "audit-head"
    head_file.write_text(content)
    app = make_app(AUDIT_HEAD_FILE=str(head_file))
    runner = app.test_cli_runner()
    for command in ("verify", "seal"):
        result = runner.invoke(args=["kms", "audit", command])
        assert result.exit_code == 4, result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
        assert "AUDIT_HEAD_FILE" in result.output
    sealer = Sealer(app.extensions["kms"])
    with app.extensions["kms"].pool.connection() as conn:
        sealer.seal_once(conn)  # no exception: flagged, not crashing
    assert sealer.tampered is not None


def test_the_head_file_is_on_by_default(base_env):
    unset = {name: value for name, value in base_env.items() if name != "AUDIT_HEAD_FILE"}
    assert load_settings(unset).audit_head_file == "kms-state/audit-head"
    assert load_settings({**unset, "AUDIT_HEAD_FILE": ""}).audit_head_file == "kms-state/audit-head"
    assert load_settings({**unset, "AUDIT_HEAD_FILE": "off"}).audit_head_file is None


@pytest.mark.own_app(AUDIT_SEAL_INTERVAL="100")
def stalled_lines(captured_logs) -> list[dict]:
    lines = [json.loads(line) for line in captured_logs.getvalue().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("msg") == "audit sealing stalled"]


def test_sealing_held_up_is_logged_with_what_holds_it(app, client, auth, db, captured_logs):
    """Holding the sealer's lock, or an open transaction with an id (in any database), stops
    sealing: the sealer says so every interval, naming the holder's pid."""
    kms = app.extensions["kms"]
    auth.new_client()
    holder = psycopg2.connect(kms.settings.database_url)
    holder.autocommit = True
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(7100002)")
            cur.execute("SELECT pg_backend_pid()")
            holder_pid = cur.fetchone()[0]
        with db.cursor() as cur:  # the unsealed events old enough to count as stalled
            cur.execute("SET session_replication_role = replica")
            cur.execute("UPDATE audit_events SET at = at - interval '1 hour' WHERE chain_pos IS NULL")
        sealer = Sealer(kms)
        with kms.pool.connection() as conn:
            sealer.seal_once(conn)
        stalled = stalled_lines(captured_logs)
        assert stalled and stalled[-1]["lockHolderPid"] == holder_pid
        assert metric(app.config["TEST_SERVER_URL"], "kms_audit_sealing_stalled") == 1.0
    finally:
        holder.close()
    idle = psycopg2.connect(kms.settings.database_url.rsplit("/", 1)[0] + "/postgres")  # another database
    try:
        with idle.cursor() as cur:
            cur.execute("SELECT pg_current_xact_id(), pg_backend_pid()")  # holds a transaction id, idle
            idle_pid = cur.fetchone()[1]
        auth.new_client()
        with db.cursor() as cur:
            cur.execute("SET session_replication_role = replica")
            cur.execute("UPDATE audit_events SET at = at - interval '1 hour' WHERE chain_pos IS NULL")
        with kms.pool.connection() as conn:
            sealer.seal_once(conn)
        stalled = stalled_lines(captured_logs)
        assert stalled[-1]["oldestTransactionPid"] == idle_pid
        assert stalled[-1]["oldestTransactionDatabase"] == "postgres"
    finally:
        idle.close()


@pytest.mark.own_app(AUDIT_FAIL_CLOSED_AFTER="1000", AUDIT_SEAL_INTERVAL="100")
def test_fail_closed_refuses_audited_work_while_sealing_is_that_far_behind(app, client, auth, db):
    from kms.audit.freshness import ChangeFollower
    kms = app.extensions["kms"]
    token = auth.new_client()
    with db.cursor() as cur:
        cur.execute("SET session_replication_role = replica")
        cur.execute("UPDATE audit_events SET at = at - interval '1 hour' WHERE chain_pos IS NULL")
    follower = ChangeFollower(kms, kms.pool.connection)
    with kms.pool.connection() as conn:
        follower._watch_backlog(conn)
    refused = client.get("/keys", headers=bearer(token))
    assert refused.status_code == 503 and refused.headers["Retry-After"]
    assert client.get("/healthz").status_code == 200  # probes still answer
    app.test_cli_runner().invoke(args=["kms", "audit", "seal"])
    with kms.pool.connection() as conn:
        follower._watch_backlog(conn)
    assert client.get("/keys", headers=bearer(token)).status_code == 200
