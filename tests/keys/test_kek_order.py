"""KEK changes in any order (kms/keys/kek_holders.py), in-process: a server lacking the KEK a DEK is
wrapped under answers 503 kek_unavailable and records no success; a row naming a KEK version no
server ever held is an integrity failure of that row alone; new DEKs go under the newest KEK every
live server holds; `kek rewrap` refuses while a live server lacks its target. The same with real
server processes: tests/serving/test_kek_order.py."""
import json
import socket

from kms import db as kms_db
from kms.config import generate_secret
from kms.keys.kek_holders import LIVE_FOR_S, held_check_values, refresh
from tests.conftest import AuthActions, HttpClient, bearer, serve_in_thread, stop_server


def served(app, action):
    """Run `action(http)` against a live server for `app`."""
    server, base_url = serve_in_thread(app, threads=2)
    try:
        with HttpClient(base_url) as http:
            return action(http)
    finally:
        stop_server(server)


def audit_outcomes(db, action: str) -> list[str]:
    with db.cursor() as cur:
        cur.execute("SELECT outcome FROM audit_events WHERE action = %s ORDER BY seq", (action,))
        return [row[0] for row in cur.fetchall()]


def kek_of(db, reference_count: int = None) -> list[int]:
    with db.cursor() as cur:
        cur.execute("SELECT kek_version FROM key_versions ORDER BY key_id, version")
        return [row[0] for row in cur.fetchall()]


def test_a_server_lacking_the_kek_of_a_dek_answers_503_kek_unavailable_and_records_no_success(
        make_app, db, captured_logs):
    with_kek_2 = make_app(KEK_2=generate_secret())
    token = served(with_kek_2, lambda http: _generate(http, AuthActions(http).new_client(), "k"))
    assert kek_of(db) == [2]
    lacking = make_app()  # KEK 1 only: an older configuration, still running

    def look_ups(http):
        answers = [http.get("/keys/k", headers=bearer(token)), http.get("/keys/k/1", headers=bearer(token))]
        made = http.post("/keys/actions/generate", json={"keyReference": "other"}, headers=bearer(token))
        return answers, made, http.get("/keys/other", headers=bearer(token))
    answers, made, other = served(lacking, look_ups)
    for answer in answers:
        assert answer.status_code == 503 and answer.json()["error"] == "kek_unavailable", answer.text
        assert int(answer.headers["Retry-After"]) >= 1
        assert "dek" not in answer.json()
    assert made.status_code == 200 and other.status_code == 200  # the rest is served
    assert audit_outcomes(db, "key.lookup") == ["kek_unavailable", "kek_unavailable", "success"]
    lines = [json.loads(line) for line in captured_logs.getvalue().splitlines()]
    assert any(line.get("kekVersion") == 2 and "does not hold" in line["msg"] for line in lines)
    metrics = lacking.extensions["kms"].metrics.render().decode()
    assert 'kms_kek_unavailable_total{kek_version="2"} 2.0' in metrics
    assert "kms_integrity_failures_total" not in metrics.replace("# HELP kms_integrity_failures_total", "") \
        .replace("# TYPE kms_integrity_failures_total", "")


def _generate(http, token: str, reference: str) -> str:
    answer = http.post("/keys/actions/generate", json={"keyReference": reference}, headers=bearer(token))
    assert answer.status_code == 200, answer.text
    return token


def test_a_row_naming_a_kek_version_no_server_ever_held_fails_alone_and_is_reported(
        app, client, auth, db, runner, another_app):
    token = auth.new_client()
    for reference in ("damaged", "fine"):
        _generate(client, token, reference)
    with db.cursor() as cur:
        cur.execute("UPDATE key_versions SET kek_version = 99 WHERE key_id = (SELECT min(key_id) FROM key_versions)")
    damaged = client.get("/keys/damaged", headers=bearer(token))
    assert damaged.status_code == 500 and damaged.json()["error"] == "integrity_error"
    assert client.get("/keys/fine", headers=bearer(token)).status_code == 200
    assert audit_outcomes(db, "key.lookup") == ["integrity_error", "success"]
    assert audit_outcomes(db, "integrity.failure") == ["detected"]

    status = runner.invoke(args=["kms", "kek", "status"])
    assert status.exit_code == 0, status.output
    assert "KEK version 99: 1 wrapped DEK versions [not configured, and no server of this deployment ever held it" \
        in status.output
    rewrap = another_app(KEK_2=generate_secret()).test_cli_runner().invoke(args=["kms", "kek", "rewrap"])
    assert rewrap.exit_code == 4, rewrap.output
    assert "1 DEK versions under KEK version 99 skipped: no server of this deployment ever held" in rewrap.output
    assert "re-wrapped 1 DEK versions under KEK version 2" in rewrap.output
    assert "Traceback" not in rewrap.output


def test_a_row_under_a_kek_known_but_not_configured_is_skipped_by_rewrap_with_exit_1(make_app, db):
    kek_2, kek_3 = generate_secret(), generate_secret()
    with_kek_2 = make_app(KEK_2=kek_2)
    served(with_kek_2, lambda http: _generate(http, AuthActions(http).new_client(), "k"))
    rewrapping = make_app(KEK_3=kek_3)  # KEK_2 not configured here; KEK_3 the target
    result = rewrapping.test_cli_runner().invoke(args=["kms", "kek", "rewrap"])
    assert result.exit_code == 1, result.output
    assert "1 DEK versions under KEK version 2 skipped: KEK_2 is not configured here" in result.output
    assert kek_of(db) == [2]


def publish_holder(db, versions: dict, live: bool = True, pid: int = 4242):
    """A row as a server process that holds `versions` (version -> check value) would publish."""
    with db.cursor() as cur:
        cur.execute("INSERT INTO kek_holders (process_id, host, pid, worker_pid, kek_versions, check_values, live_until)"
                    " VALUES (gen_random_uuid(), %s, %s, %s, %s, %s, now() + %s * interval '1 second')",
                    ("node-b", pid, pid, sorted(versions), [versions[v] for v in sorted(versions)],
                     LIVE_FOR_S if live else -1))


def test_new_deks_go_under_the_newest_kek_every_live_server_holds_and_rewrap_waits_for_them(make_app, db):
    kek_2 = generate_secret()
    app = make_app(KEK_2=kek_2)
    kms = app.extensions["kms"]
    mine = held_check_values(kms.keyring)
    publish_holder(db, {1: mine[1]})  # a live server that lacks KEK_2
    publish_holder(db, {1: mine[1], 2: b"another key's check value"}, pid=4343)  # one with another KEK_2
    publish_holder(db, {1: mine[1], 2: mine[2]}, live=False, pid=4444)  # a dead one: ignored either way

    with kms.pool.connection() as conn, kms_db.transaction(conn) as cur:
        refresh(cur, kms.keyring, mine)
    assert kms.keyring.kek_wrap == 1
    served(app, lambda http: _generate(http, AuthActions(http).new_client(), "k"))
    assert kek_of(db) == [1]  # not under KEK_2, which node-b could not open

    refused = app.test_cli_runner().invoke(args=["kms", "kek", "rewrap"])
    assert refused.exit_code == 3, refused.output
    assert "2 live server process(es) do not hold KEK version 2 (KEK_2): node-b pid 4242; node-b pid 4343" \
        in refused.output
    assert "4444" not in refused.output and kek_of(db) == [1]

    with db.cursor() as cur:  # both restarted with KEK_2 (their old rows gone), or died long enough ago
        cur.execute("UPDATE kek_holders SET live_until = now() - interval '1 second'")
    with kms.pool.connection() as conn, kms_db.transaction(conn) as cur:
        refresh(cur, kms.keyring, mine)
    assert kms.keyring.kek_wrap == 2
    done = app.test_cli_runner().invoke(args=["kms", "kek", "rewrap"])
    assert done.exit_code == 0 and "re-wrapped 1 DEK versions under KEK version 2" in done.output
    assert kek_of(db) == [2]


def test_kek_status_names_the_live_servers_and_what_they_hold(make_app, db):
    app = make_app(KEK_2=generate_secret())
    mine = held_check_values(app.extensions["kms"].keyring)
    publish_holder(db, {1: mine[1]})
    output = app.test_cli_runner().invoke(args=["kms", "kek", "status"]).output
    assert "new DEK versions are wrapped under KEK version 1" in output
    assert "live server node-b pid 4242: KEK versions 1" in output
    assert socket.gethostname()  # (the host a real server publishes: tests/serving/test_kek_order.py)


def test_a_dek_that_fails_authentication_is_reported_as_an_integrity_failure_unlike_a_missing_kek(make_app, db):
    app = make_app()

    def two_keys(http):
        token = AuthActions(http).new_client()
        for reference in ("a", "b"):
            _generate(http, token, reference)
        return token
    token = served(app, two_keys)
    with db.cursor() as cur:  # b's wrapped DEK copied into a's row
        cur.execute("UPDATE key_versions SET wrapped_dek = (SELECT wrapped_dek FROM key_versions WHERE key_id = "
                    "(SELECT max(key_id) FROM key_versions)) WHERE key_id = (SELECT min(key_id) FROM key_versions)")
    answer = served(app, lambda http: http.get("/keys/a", headers=bearer(token)))
    assert answer.status_code == 500 and answer.json()["error"] == "integrity_error"
    assert 'kms_integrity_failures_total{table="key_versions"} 1.0' in app.extensions["kms"].metrics.render().decode()
    assert audit_outcomes(db, "integrity.failure") == ["detected"]
