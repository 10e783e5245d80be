"""`kms import-seed`: a deployment of the original Go KMS, built in its format, imported into a
running KMS; its clients then get, through the HTTP API as the original's clients call it, the
same DEK bytes for every reference and version they had."""
import os

import psycopg2
import pytest

from kms.importing import service as importing
from tests.conftest import ADMIN_NAME, bearer
from tests.importing.conftest import CLIENTS
from tests.importing.original_format import raw_url, seal
from tests.test_go_clients import KEY_BUNDLE, GoHttp, go_decode, go_login, raw_url_decode


def rows(db, query, *params):
    with db.cursor() as cur:
        cur.execute(query, params)
        return cur.fetchall()


def count(db, table, where="true"):
    return rows(db, f"SELECT count(*) FROM {table} WHERE {where}")[0][0]


def test_imported_clients_get_the_same_deks_for_every_reference_and_version(populated, import_seed, live_server,
                                                                            db):
    before = populated.checksum()
    first = import_seed()
    assert first.exit_code == 0, first.output
    assert "source: 3 clients, 4 keys (7 versions)" in first.output
    assert "imported 3 clients and 4 keys (7 versions)" in first.output
    again = import_seed()
    assert again.exit_code == 0, again.output
    assert "imported 0 clients and 0 keys (0 versions)" in again.output
    assert "imported by an earlier run: 3 clients, 4 keys" in again.output
    assert populated.checksum() == before  # the source is only read
    assert count(db, "clients", "role = 'client'") == 2 and count(db, "key_versions") == 7

    go = GoHttp(live_server)  # the original's SDK and kms-client, on the wire
    for name, (password, _, keys) in CLIENTS.items():
        token = go_login(go, name, password)  # the old password, checked against the bcrypt hash
        for reference, newest in keys.items():
            for version in range(1, newest + 1):
                status, raw = go.do("GET", f"/keys/{reference}/{version}", None, token)
                assert status == 200, raw
                bundle = go_decode(raw, KEY_BUNDLE)
                assert raw_url_decode(bundle["decryptWith"]["dek"]) == populated.deks[(name, reference, version)]
                assert bundle["decryptWith"]["version"] == version
                assert raw_url_decode(bundle["encryptWith"]["dek"]) == populated.deks[(name, reference, newest)]
                assert bundle["encryptWith"]["version"] == newest
        assert go_login(go, name, password)  # again: now against its Argon2id hash
    assert count(db, "clients", "starts_with(password_hash, '$2')") == 0
    assert count(db, "clients", "starts_with(password_hash, '$argon2id$')") == 4


def test_versions_keep_their_state_and_the_newest_is_the_one_in_use(populated, import_seed, client, auth):
    assert import_seed().exit_code == 0
    token = auth.login("billing-svc", CLIENTS["billing-svc"][0])
    versions = client.get("/keys/invoices-db/versions", headers=bearer(token)).json()["versions"]
    assert [(v["version"], v["state"]) for v in versions] == [(1, "deprecated"), (2, "deprecated"), (3, "in-use")]
    answer = client.get("/keys/invoices-db/1", headers=bearer(token))
    assert answer.headers["X-Key-Deprecated"] == "true"


def test_an_imported_client_keeps_its_role(populated, import_seed, client, auth):
    assert import_seed().exit_code == 0
    admin = auth.login("ops-admin", CLIENTS["ops-admin"][0])
    listed = client.get("/clients", headers=bearer(admin))
    assert listed.status_code == 200
    roles = {c["clientname"]: c["role"] for c in listed.json()["clients"]}
    assert roles == {ADMIN_NAME: "admin", "billing-svc": "client", "Orders-Svc": "client", "ops-admin": "admin"}


def test_a_dry_run_reports_what_it_would_import_and_writes_nothing(populated, import_seed, db):
    events = count(db, "audit_events")
    result = import_seed("--dry-run")
    assert result.exit_code == 0, result.output
    assert "would import 3 clients and 4 keys (7 versions)" in result.output
    assert "dry run: nothing was written" in result.output
    assert count(db, "clients") == 1 and count(db, "keys") == 0 and count(db, "import_sources") == 0
    assert count(db, "audit_events") == events
    assert "imported 3 clients and 4 keys" in import_seed().output


def test_each_imported_client_and_key_is_one_audit_event_without_secrets(populated, import_seed, db, seed_env,
                                                                         captured_logs):
    result = import_seed()
    assert result.exit_code == 0
    events = rows(db, "SELECT actor, action, target, version FROM audit_events WHERE action LIKE '%%.import'")
    assert sorted(action for _, action, _, _ in events) == ["client.import"] * 3 + ["key.import"] * 4
    assert {actor for actor, _, _, _ in events} == {"cli"}
    assert sorted(version for _, action, _, version in events if action == "key.import") == [1, 1, 2, 3]
    everything = result.output + captured_logs.getvalue() + repr(rows(db, "SELECT * FROM audit_events"))
    secrets = [raw_url(value) for value in populated.secrets.values()]
    secrets += [password for password, _, _ in CLIENTS.values()]
    secrets += [raw_url(dek) for dek in populated.deks.values()]
    secrets += [reference for _, _, keys in CLIENTS.values() for reference in keys]
    assert [secret for secret in secrets if secret in everything] == []


def test_of_the_originals_secrets_only_its_key_ref_secret_is_kept_and_wrapped(populated, import_seed, db):
    assert import_seed().exit_code == 0
    assert rows(db, "SELECT kek_version FROM import_sources") == [(1,)]
    tables = rows(db, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    dump = " ".join(row[0] for (table,) in tables for row in rows(db, f'SELECT t::text FROM "{table}" t'))
    for secret in [*populated.secrets.values(), *populated.deks.values()]:
        assert secret.hex() not in dump and raw_url(secret) not in dump


@pytest.mark.parametrize("secret", ["KEK", "DB_SECRET", "USERNAME_SECRET"])
def test_secrets_that_do_not_open_the_sources_rows_are_refused_before_anything_is_written(
        populated, import_seed, db, tmp_path, secret):
    wrong = populated.write_env(tmp_path / "wrong.env", **{secret: os.urandom(32)})
    result = import_seed(env=wrong)
    assert result.exit_code == 2
    assert secret in result.output and "nothing was imported" in result.output
    assert count(db, "clients") == 1 and count(db, "keys") == 0 and count(db, "import_sources") == 0


def test_a_seed_env_without_a_secret_names_it_and_nothing_else(populated, import_seed, tmp_path):
    env = populated.write_env(tmp_path / "original.env")
    env.write_text("".join(line + "\n" for line in env.read_text().splitlines() if not line.startswith("KEK=")))
    result = import_seed(env=env)
    assert result.exit_code == 2
    assert "--seed-env: KEK: not set in the original's .env" in result.output
    assert raw_url(populated.secrets["DB_SECRET"]) not in result.output


def test_a_source_that_is_not_the_originals_database_is_refused(populated, runner, seed_env, base_env):
    result = runner.invoke(args=["kms", "import-seed", "--from", base_env["DATABASE_URL"], "--seed-env",
                                 str(seed_env)])
    assert result.exit_code == 1 and "does not hold the original KMS's tables" in result.output


def test_an_unreachable_source_is_exit_3_without_its_password(populated, import_seed, runner, seed_env):
    result = runner.invoke(args=["kms", "import-seed", "--from", "postgresql://kms:s3cret-pw@127.0.0.1:1/kms",
                                 "--seed-env", str(seed_env)])
    assert result.exit_code == 3 and "the original's database (--from) is unavailable" in result.output
    assert "s3cret-pw" not in result.output


def test_rows_that_do_not_open_are_named_and_skipped_and_the_rest_imported(populated, import_seed, db, client, auth):
    billing, orders = populated.ids["billing-svc"], populated.ids["Orders-Svc"]
    # One DEK sealed under another KEK, one client whose name does not open.
    populated.execute("UPDATE keys SET dek = %s WHERE clientid = %s AND version = 2 RETURNING id",
                      (seal(os.urandom(32), os.urandom(32)), billing))
    populated.execute("UPDATE clients SET clientname = %s WHERE id = %s", (raw_url(os.urandom(40)), orders))
    result = import_seed()
    assert result.exit_code == 4, result.output
    assert f"does not open: client #{orders}: the name does not open under DB_SECRET" in result.output
    assert f"does not open: key of client #{billing} (rows" in result.output
    assert "version 2 (row #" in result.output and "the DEK does not open under KEK" in result.output
    # Orders-Svc's keys are refused with it; everything else is here.
    assert result.output.count(f"refused: key of client #{orders}") == 2
    assert "imported 2 clients and 1 keys (1 versions)" in result.output
    token = auth.login("billing-svc", CLIENTS["billing-svc"][0])
    ledger = client.get("/keys/ledger/1", headers=bearer(token)).json()["encryptWith"]["dek"]
    assert raw_url_decode(ledger) == populated.deks[("billing-svc", "ledger", 1)]
    assert client.get("/keys/invoices-db", headers=bearer(token)).status_code == 404

    # Mended in the source, a second run imports what was skipped, and nothing twice.
    populated.execute("UPDATE keys SET dek = %s WHERE clientid = %s AND version = 2",
                      (seal(populated.deks[("billing-svc", "invoices-db", 2)], populated.secrets["KEK"]), billing))
    populated.execute("UPDATE clients SET clientname = %s WHERE id = %s",
                      (seal(b"Orders-Svc", populated.secrets["DB_SECRET"]), orders))
    mended = import_seed()
    assert mended.exit_code == 0, mended.output
    assert "imported 1 clients and 3 keys (6 versions)" in mended.output
    assert "imported by an earlier run: 2 clients, 1 keys" in mended.output
    dek = client.get("/keys/invoices-db/2", headers=bearer(token)).json()["decryptWith"]["dek"]
    assert raw_url_decode(dek) == populated.deks[("billing-svc", "invoices-db", 2)]


def test_a_name_taken_here_is_refused_with_the_clients_keys_and_the_rest_imported(populated, import_seed, auth):
    auth.new_client("BILLING-SVC")  # names compare without regard to case here
    result = import_seed()
    assert result.exit_code == 1, result.output
    billing = populated.ids["billing-svc"]
    assert f"refused: client #{billing} (billing-svc): a client of that name is here already" in result.output
    assert result.output.count(f"refused: key of client #{billing}") == 2
    assert "imported 2 clients and 2 keys (3 versions)" in result.output


def test_an_interrupted_import_resumes_where_it_stopped(populated, import_seed, monkeypatch, db):
    imported = []
    real = importing.insert_imported_key

    def fails_on_the_third_key(cur, kms, *args):
        if len(imported) == 2:
            raise psycopg2.OperationalError("the connection was lost")
        imported.append(args)
        return real(cur, kms, *args)

    monkeypatch.setattr(importing, "insert_imported_key", fails_on_the_third_key)
    interrupted = import_seed()
    assert interrupted.exit_code == 3, interrupted.output
    assert count(db, "keys") == 2 and count(db, "imported_keys") == 2
    monkeypatch.undo()
    resumed = import_seed()
    assert resumed.exit_code == 0, resumed.output
    assert "imported 0 clients and 2 keys" in resumed.output
    assert "imported by an earlier run: 3 clients, 2 keys" in resumed.output
    assert count(db, "keys") == 4 and count(db, "key_versions") == 7


def test_versions_added_in_the_source_after_an_import_are_named_not_imported_twice(populated, import_seed):
    assert import_seed().exit_code == 0
    populated.rotate("billing-svc", "ledger")
    result = import_seed()
    assert result.exit_code == 1
    assert "versions after 1 were added in the source after an earlier run imported it" in result.output


def test_a_second_run_with_another_key_ref_secret_needs_it_proven(populated, import_seed, tmp_path, client, auth):
    real = populated.secrets["KEY_REF_SECRET"]
    wrong = populated.write_env(tmp_path / "wrong-ref.env", KEY_REF_SECRET=os.urandom(32))
    assert import_seed(env=wrong).exit_code == 0  # no stored row can tell it is wrong
    token = auth.login("billing-svc", CLIENTS["billing-svc"][0])
    assert client.get("/keys/ledger", headers=bearer(token)).status_code == 404  # so nothing is found

    refused = import_seed()  # the right one now
    assert refused.exit_code == 2 and "prove this one with --check-reference" in refused.output
    unproven = import_seed("--check-reference", "billing-svc:no-such-key")
    assert unproven.exit_code == 2 and "KEY_REF_SECRET in --seed-env is not the source's" in unproven.output
    assert "no-such-key" not in unproven.output
    proven = import_seed("--check-reference", "billing-svc:ledger")
    assert proven.exit_code == 0, proven.output
    assert "KEY_REF_SECRET: proven by --check-reference, and kept in place of the one given before" in proven.output
    dek = client.get("/keys/ledger", headers=bearer(token)).json()["encryptWith"]["dek"]
    assert raw_url_decode(dek) == populated.deks[("billing-svc", "ledger", 1)]
    assert populated.secrets["KEY_REF_SECRET"] == real


def test_a_key_ref_secret_that_names_no_key_is_refused_by_check_reference(populated, import_seed, tmp_path, db):
    wrong = populated.write_env(tmp_path / "wrong-ref.env", KEY_REF_SECRET=os.urandom(32))
    result = import_seed("--check-reference", "billing-svc:ledger", env=wrong)
    assert result.exit_code == 2 and "KEY_REF_SECRET" in result.output
    assert count(db, "keys") == 0
    checked = import_seed("--check-reference", "billing-svc:ledger")
    assert checked.exit_code == 0 and "KEY_REF_SECRET: not checked" not in checked.output


def mark_retired(seed, clientname, reference, version):
    from tests.importing.original_format import hs256_b64
    seed.execute("UPDATE keys SET state = %s WHERE clientid = %s AND keyreference = %s AND version = %s",
                 (seal(b"retired", seed.secrets["DB_SECRET"]), seed.ids[clientname],
                  hs256_b64(reference, seed.secrets["KEY_REF_SECRET"]), version))


def test_versions_marked_retired_stay_retired_and_are_never_served(populated, import_seed, client, auth, db):
    mark_retired(populated, "billing-svc", "invoices-db", 1)
    assert import_seed().exit_code == 0
    token = auth.login("billing-svc", CLIENTS["billing-svc"][0])
    answer = client.get("/keys/invoices-db/1", headers=bearer(token))
    assert answer.status_code == 410 and answer.json()["error"] == "version_retired"
    assert client.get("/keys/invoices-db/2", headers=bearer(token)).status_code == 200
    versions = client.get("/keys/invoices-db/versions", headers=bearer(token)).json()["versions"]
    assert [v["state"] for v in versions] == ["retired", "deprecated", "in-use"]
    assert count(db, "key_versions", "state = 'retired' AND wrapped_dek IS NULL") == 1


def test_a_key_retired_out_of_order_is_refused_by_name(populated, import_seed):
    mark_retired(populated, "billing-svc", "invoices-db", 2)
    result = import_seed()
    assert result.exit_code == 1
    assert "a version is marked retired above one that is not" in result.output
    assert "imported 3 clients and 3 keys" in result.output


def test_a_source_that_goes_away_mid_import_is_named_and_a_second_run_finishes(populated, import_seed,
                                                                             monkeypatch, db):
    real = importing.original.read_keys

    def source_dies(source):
        populated.execute("SELECT pg_terminate_backend(%s)", (source.info.backend_pid,))
        return real(source)

    monkeypatch.setattr(importing.original, "read_keys", source_dies)
    result = import_seed()
    assert result.exit_code == 3 and "the original's database (--from) went away" in result.output
    monkeypatch.undo()
    finished = import_seed()
    assert finished.exit_code == 0 and "imported 0 clients and 4 keys" in finished.output


def test_one_import_runs_at_a_time(populated, import_seed, db):
    with db.cursor() as cur:
        cur.execute("SELECT pg_advisory_lock(7100006)")  # as a running import holds it
        result = import_seed()
        cur.execute("SELECT pg_advisory_unlock(7100006)")
    assert result.exit_code == 1 and "another `kms import-seed` is running" in result.output
    assert import_seed().exit_code == 0
