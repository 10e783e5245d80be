"""Each table's MAC'd columns are declared once (kms.rows); these tests hold the declarations
against the schema and against every query that reads a row to check it."""
import datetime
import uuid

import pytest

from kms import db
from kms.errors import IntegrityFailure
from kms.keys.service import LookUpRow
from kms.rows import CLIENTS, KEYS, SESSIONS, SIGNUP_TOKENS, TABLES

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
# The reads of migration 004's backfill: the MAC'd columns, without a MAC yet.
BACKFILL_READS = [("clients_for_row_macs", CLIENTS), ("sessions_for_row_macs", SESSIONS),
                  ("signup_tokens_for_row_macs", SIGNUP_TOKENS), ("keys_for_row_macs", KEYS)]
PARAMETERS = {"jti": uuid.uuid4(), "client_id": uuid.uuid4(), "name_hash": b"x", "client": "x",
              "window": datetime.timedelta(minutes=1), "token_hash": b"x", "ref_hash": b"x", "deleted": False,
              "key_id": 1, "candidates": [b"x"]}


@pytest.fixture
def cursor(app):
    with app.extensions["kms"].pool.connection() as conn, db.transaction(conn) as cur:
        yield cur
        cur.execute("ROLLBACK")  # nothing these reads locked outlives the test
        cur.begin_pending = True  # (and the block's COMMIT has nothing left to commit)


def columns_read(cur, query: str) -> set[str]:
    cur.execute(getattr(db.sql, query), PARAMETERS)
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
              "row_mac": b"x", "audit": False}
    cursor.execute(db.sql.lookup_key, params)
    assert tuple(column.name for column in cursor.description) == LookUpRow._fields  # as the hot path reads it
    read = {column.name for column in cursor.description}
    assert {"session_expires_at", "session_epoch", "session_row_mac"} <= read
    assert {"client_name_hash", "client_password_hash", "client_role", "client_row_mac"} <= read
    assert {"key_id", "key_current_version", "key_retired_below", "key_rotation_period_ms", "key_row_mac"} <= read


def test_a_row_with_one_maced_column_changed_is_refused(app):
    """The declaration is what the MAC covers: change any one column and the check refuses."""
    kms = app.extensions["kms"]
    values = {"id": uuid.uuid4(), "name_hash": b"n", "password_hash": "p", "role": "client", "status": "active",
              "session_epoch": 0}
    mac = CLIENTS.mac(kms, **values)

    class Row:
        def __init__(self, **columns):
            self.__dict__.update(columns)

    CLIENTS.check(kms, Row(**values, row_mac=mac))
    for column, other in (("name_hash", b"m"), ("password_hash", "q"), ("role", "admin"), ("status", "disabled"),
                          ("session_epoch", 1)):
        with pytest.raises(IntegrityFailure) as refused:
            CLIENTS.check(kms, Row(**{**values, column: other}, row_mac=mac))
        assert refused.value.table == "clients"
