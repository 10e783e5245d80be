"""The audit chain against someone who can write the database but holds none of our secrets: rows
altered, deleted, inserted, duplicated, renumbered or unchained, and re-sealed. The trigger refuses
what it can; `audit verify` (with the head recorded outside the database) and the sealer catch the
rest. Each test performs the attack with direct SQL, as a stolen DBA credential would."""
import re

import psycopg2
import pytest

from tests.conftest import tamper


@pytest.fixture
def sealed_history(client, auth, runner):
    for _ in range(4):
        auth.new_client()
    result = runner.invoke(args=["kms", "audit", "seal"])
    assert result.exit_code == 0, result.output
    head = result.output.strip().rsplit("head ", 1)[1]
    return head


def test_the_trigger_keeps_the_table_append_only_for_a_plain_writer(db, sealed_history):
    # An unsealed row of the writer's own: sealing it is the one update allowed, changing it while
    # sealing is not. (Not tamper(): this writer has not got past the trigger.)
    with db.cursor() as cur:
        cur.execute("INSERT INTO audit_events (event_id, at, actor, action, outcome, row_mac) "
                    "VALUES (gen_random_uuid(), now(), 'x', 'key.lookup', 'success', '\\x00')")
    seal_with_a_change = ("UPDATE audit_events SET chain_pos = 1000000, chain_hash = '\\x00', chain_format = 2, "
                          "{} WHERE chain_pos IS NULL")
    for statement in ["UPDATE audit_events SET outcome = 'denied' WHERE seq = 2",
                      "UPDATE audit_events SET chain_pos = NULL, chain_hash = NULL, chain_format = NULL",
                      "UPDATE audit_events SET chain_hash = '\\x00' WHERE seq = 2",
                      seal_with_a_change.format("outcome = 'denied'"),
                      seal_with_a_change.format("repeats = 5"),
                      seal_with_a_change.format("row_mac = '\\x01'"),
                      "UPDATE audit_events SET outcome = 'denied' WHERE chain_pos IS NULL",
                      "DELETE FROM audit_events WHERE seq = 2", "DELETE FROM audit_events WHERE chain_pos IS NULL",
                      "TRUNCATE audit_events"]:
        with pytest.raises(psycopg2.errors.RaiseException), db.cursor() as cur:
            cur.execute(statement)
    # ... and the update the sealer makes is still allowed.
    with db.cursor() as cur:
        cur.execute(seal_with_a_change.replace(", {}", ""))
        assert cur.rowcount == 1


def test_unchaining_and_deleting_rows_cannot_be_resealed_behind_a_recorded_head(app, client, auth, runner, db,
                                                                                sealed_history):
    """The reported attack: chain columns cleared, rows deleted, the sealer asked to chain what is
    left. The head recorded outside the database (the server logs and exports it at each seal)
    no longer fits."""
    tamper(db, "UPDATE audit_events SET chain_pos = NULL, chain_hash = NULL, chain_format = NULL")
    tamper(db, "DELETE FROM audit_events WHERE action = 'client.signup'")
    result = runner.invoke(args=["kms", "audit", "verify", "--head", sealed_history])
    assert result.exit_code == 1 and "BROKEN" in result.output, result.output


@pytest.mark.own_app
def test_a_running_sealer_refuses_a_chain_rewritten_under_it(app, client, auth, db, sealed_history):
    from kms.audit.sealer import Sealer
    sealer = Sealer(app.extensions["kms"])
    with app.extensions["kms"].pool.connection() as conn:
        sealer.seal_once(conn)
        assert sealer.head is not None
        tamper(db, "UPDATE audit_events SET chain_pos = NULL, chain_hash = NULL, chain_format = NULL")
        tamper(db, "DELETE FROM audit_events WHERE action = 'login'")
        sealer.seal_once(conn)
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM audit_events WHERE chain_pos IS NOT NULL")
        assert cur.fetchone()[0] == 0  # nothing was re-chained
        cur.execute("SELECT count(*) FROM audit_events WHERE action = 'audit.tamper'")
        assert cur.fetchone()[0] == 1
    assert "kms_audit_chain_tampered 1.0" in client.get("/metrics").text


def test_the_head_file_carries_the_check_across_restarts(make_app, tmp_path, db):
    head_file = tmp_path / "audit-head"
    app = make_app(AUDIT_HEAD_FILE=str(head_file))
    runner = app.test_cli_runner()
    runner.invoke(args=["kms", "create-admin", "--name", "second-admin"], input="Second-admin-passw0rd\n")
    assert runner.invoke(args=["kms", "audit", "seal"]).exit_code == 0
    assert re.fullmatch(r"\d+:[0-9a-f]{64}", head_file.read_text().splitlines()[0])
    tamper(db, "UPDATE audit_events SET chain_pos = NULL, chain_hash = NULL, chain_format = NULL")
    tamper(db, "DELETE FROM audit_events WHERE action = 'client.create'")
    restarted = make_app(AUDIT_HEAD_FILE=str(head_file)).test_cli_runner()
    assert restarted.invoke(args=["kms", "audit", "seal"]).exit_code == 4
    result = restarted.invoke(args=["kms", "audit", "verify"])  # takes the head from the file
    assert result.exit_code == 1 and "BROKEN" in result.output


def test_unsealed_rows_behind_the_head_are_never_chained(runner, db, sealed_history):
    """Some rows' chain removed (and one of them deleted): the rest are older than the head."""
    tamper(db, "UPDATE audit_events SET chain_pos = NULL, chain_hash = NULL, chain_format = NULL WHERE seq IN (2, 3)")
    tamper(db, "DELETE FROM audit_events WHERE seq = 2")
    assert runner.invoke(args=["kms", "audit", "seal"]).exit_code == 4
    result = runner.invoke(args=["kms", "audit", "verify"])
    assert result.exit_code == 1 and "BROKEN" in result.output


def test_newest_rows_deleted_are_caught_with_a_recorded_head(runner, db, sealed_history):
    position = int(sealed_history.split(":")[0])
    tamper(db, "DELETE FROM audit_events WHERE chain_pos >= %s", (position - 1,))
    assert runner.invoke(args=["kms", "audit", "verify"]).exit_code == 0  # from inside: a shorter, valid chain
    result = runner.invoke(args=["kms", "audit", "verify", "--head", sealed_history])
    assert result.exit_code == 1 and "before the recorded head" in result.output


def test_a_row_duplicated_verbatim_is_refused_or_caught(runner, db, sealed_history):
    columns = ("event_id, at, actor, action, target, version, outcome, request_id, source_ip, repeats, row_mac, "
               "txid")
    with pytest.raises(psycopg2.errors.UniqueViolation):
        tamper(db, f"INSERT INTO audit_events ({columns}) SELECT {columns} FROM audit_events WHERE seq = 2")
    tamper(db, "DROP INDEX audit_events_event_id")  # a writer who owns the table
    (duplicate,) = tamper(db, f"INSERT INTO audit_events ({columns}) SELECT {columns} FROM audit_events "
                              "WHERE seq = 2 RETURNING seq")[0]
    try:
        result = runner.invoke(args=["kms", "audit", "verify"])
        assert result.exit_code == 1 and "BROKEN" in result.output
    finally:  # the index back for the tests after this one, which share the database
        tamper(db, "DELETE FROM audit_events WHERE seq = %s", (duplicate,))
        tamper(db, "CREATE UNIQUE INDEX audit_events_event_id ON audit_events (event_id)")


def test_renumbered_seq_is_caught(runner, db, sealed_history):
    (renumbered,) = tamper(db, "UPDATE audit_events SET seq = DEFAULT WHERE seq = 3 RETURNING seq")[0]
    result = runner.invoke(args=["kms", "audit", "verify"])
    assert result.exit_code == 1 and f"BROKEN at seq {renumbered}" in result.output


def test_each_seal_records_the_head_outside_the_database(app, client, auth, captured_logs, runner):
    """The log and /metrics carry the head after each seal; `audit verify --head` accepts it."""
    from kms.audit.sealer import Sealer
    auth.new_client()
    sealer = Sealer(app.extensions["kms"])
    with app.extensions["kms"].pool.connection() as conn:
        sealer.seal_once(conn)
    head = sealer.head
    assert head is not None
    metrics = client.get("/metrics").text
    assert f'kms_audit_chain_head_info{{mac="{head.mac.hex()}",position="{head.position}"}} 1.0' in metrics
    assert f"kms_audit_chain_head_position {float(head.position)}" in metrics
    assert head.mac.hex() in captured_logs.getvalue()
    result = runner.invoke(args=["kms", "audit", "verify", "--head", str(head)])
    assert result.exit_code == 0, result.output


def test_the_sealer_chains_transactions_in_the_order_they_began_not_in_the_order_of_their_ids_as_text(app, db):
    """Transaction ids of different lengths (99, 100, 1000): as text "1000" < "99"; the sealer
    must take them in numeric order, or an older transaction's rows would be chained after a newer
    one's and escape the "unsealed row behind the head" check."""
    from kms import db as kms_db
    with db.cursor() as cur:
        cur.execute("SET session_replication_role = replica")
        for txid in (1000, 99, 100):
            cur.execute("INSERT INTO audit_events (event_id, at, actor, action, outcome, row_mac, txid) "
                        "VALUES (gen_random_uuid(), now(), 'test', 'test.order', 'success', '\\x00', %s::text::xid8)",
                        (txid,))
    with app.extensions["kms"].pool.connection() as conn, kms_db.transaction(conn) as cur:
        cur.execute(kms_db.sql.unsealed_audit_events, {"horizon": "2000", "limit": 10})
        order = [int(row.txid) for row in cur.fetchall() if int(row.txid) in (99, 100, 1000)]
    assert order == [99, 100, 1000]
