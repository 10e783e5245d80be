"""Data encryption keys through the HTTP API."""
import base64
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import pytest

from tests.conftest import CLIENT_PASSWORD, AuthActions, HttpClient, bearer, envelope, serve_in_thread, stop_server


def b64(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))  # we send it unpadded


@pytest.fixture
def token(auth):
    return auth.new_client("key-owner")


def generate(client, token, ref="billing-db"):
    return client.post("/keys/actions/generate", json={"keyReference": ref}, headers=bearer(token))


def test_generate_returns_a_32_byte_dek_version_1(client, token):
    response = generate(client, token)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"dek", "version", "encoding", "expiresAt"}
    assert len(b64(body["dek"])) == 32 and body["version"] == 1
    assert body["encoding"] == "base64url (RFC 4648)"
    assert response.headers["Cache-Control"] == "no-store"
    expires = datetime.fromisoformat(body["expiresAt"].replace("Z", "+00:00"))
    assert timedelta(minutes=4, seconds=50) < expires - datetime.now(timezone.utc) <= timedelta(minutes=5)


def test_generate_an_existing_reference_is_409(client, token):
    generate(client, token)
    assert generate(client, token).status_code == 409


def test_get_returns_the_current_version_twice(client, token):
    dek = generate(client, token).json()["dek"]
    response = client.get("/keys/billing-db", headers=bearer(token))
    assert response.status_code == 200
    body = response.json()
    assert body["decryptWith"]["dek"] == body["encryptWith"]["dek"] == dek
    assert response.headers["X-Key-Deprecated"] == "false"
    assert response.headers["Cache-Control"] == "no-store"


def test_rotate_makes_a_new_current_version_and_keeps_the_old_for_decryption(client, token):
    first = generate(client, token).json()
    rotated = client.post("/keys/billing-db/actions/rotate", headers=bearer(token))
    assert rotated.status_code == 200 and rotated.json()["version"] == 2
    assert rotated.headers["Cache-Control"] == "no-store"
    old = client.get("/keys/billing-db/1", headers=bearer(token))
    assert old.json()["decryptWith"] == {**first, "expiresAt": old.json()["decryptWith"]["expiresAt"]}
    assert old.json()["encryptWith"]["dek"] == rotated.json()["dek"]
    assert old.headers["X-Key-Deprecated"] == "true"
    current = client.get("/keys/billing-db/2", headers=bearer(token))
    assert current.headers["X-Key-Deprecated"] == "false"


def test_unknown_version_is_404_and_malformed_version_400(client, token):
    generate(client, token)
    assert client.get("/keys/billing-db/7", headers=bearer(token)).status_code == 404
    assert client.get("/keys/billing-db/0", headers=bearer(token)).status_code == 400
    assert client.get("/keys/billing-db/two", headers=bearer(token)).status_code == 400


@pytest.mark.parametrize("segment,status", [("%EF%BC%91", 400), ("%20%201", 400), ("1%20", 400), ("+1", 400),
                                            ("01x", 400), ("-1", 400), ("0", 400), ("99999999999", 400)])
def test_a_version_is_ascii_digits_only(client, auth, segment, status):
    token = auth.new_client()
    client.post("/keys/actions/generate", json={"keyReference": "k"}, headers=bearer(token))
    assert client.get("/keys/k/1", headers=bearer(token)).status_code == 200
    response = client.get(f"/keys/k/{segment}", headers=bearer(token))
    body = envelope(response, status)
    if status == 400:
        assert body["fields"].keys() == {"version"}



@pytest.mark.parametrize("ref", ["", "x" * 65, "naïve", "has space", "under_score", "ключ"])
def test_malformed_reference_is_400(client, token, ref):
    assert generate(client, token, ref).status_code == 400


def test_keys_are_scoped_to_their_client(client, auth, token):
    generate(client, token)
    other = auth.new_client("other-svc")
    for call in (lambda t: client.get("/keys/billing-db", headers=bearer(t)),
                 lambda t: client.get("/keys/billing-db/1", headers=bearer(t)),
                 lambda t: client.post("/keys/billing-db/actions/rotate", headers=bearer(t)),
                 lambda t: client.delete("/keys/billing-db/actions/delete", headers=bearer(t))):
        assert call(other).status_code == 404
    assert client.get("/keys", headers=bearer(other)).json() == {"keys": []}
    assert generate(client, other).status_code == 200  # the same reference, another client's key
    assert client.get("/keys/billing-db", headers=bearer(other)).json()["encryptWith"]["dek"] != \
        client.get("/keys/billing-db", headers=bearer(token)).json()["encryptWith"]["dek"]


def test_the_database_holds_no_plaintext_dek_or_reference(client, token, db):
    dek = b64(generate(client, token, "very-secret-ref").json()["dek"])
    with db.cursor() as cur:
        cur.execute("SELECT k.ref_hash, k.ref_enc, v.wrapped_dek FROM keys k JOIN key_versions v ON v.key_id = k.id")
        ref_hash, ref_enc, wrapped = (bytes(x) for x in cur.fetchone())
    assert dek not in wrapped and len(wrapped) == 1 + 12 + 32 + 16
    assert b"very-secret-ref" not in ref_enc + ref_hash + wrapped


def test_swapped_wrapped_deks_fail_instead_of_serving_the_other_key(client, auth, token, db):
    generate(client, token, "key-a")
    generate(client, token, "key-b")
    other = auth.new_client("other-svc")
    generate(client, other, "key-a")
    with db.cursor() as cur:  # every key's DEK moved into the next row
        cur.execute("""UPDATE key_versions v SET wrapped_dek = n.wrapped_dek
                       FROM (SELECT key_id, coalesce(lead(wrapped_dek) OVER (ORDER BY key_id),
                                     (SELECT wrapped_dek FROM key_versions ORDER BY key_id LIMIT 1)) AS wrapped_dek
                             FROM key_versions) n
                       WHERE n.key_id = v.key_id""")
    for t, ref in ((token, "key-a"), (token, "key-b"), (other, "key-a")):
        response = client.get(f"/keys/{ref}", headers=bearer(t))
        assert response.status_code == 500 and response.json()["error"] == "integrity_error"
        assert "dek" not in response.json()


def test_a_wrapped_dek_copied_into_another_version_of_the_same_key_fails(client, token, db):
    generate(client, token)
    client.post("/keys/billing-db/actions/rotate", headers=bearer(token))
    with db.cursor() as cur:
        cur.execute("""UPDATE key_versions SET wrapped_dek = (SELECT wrapped_dek FROM key_versions WHERE version = 2)
                       WHERE version = 1""")
    assert client.get("/keys/billing-db/1", headers=bearer(token)).status_code == 500


def test_fifty_parallel_rotations_yield_contiguous_versions_and_one_in_use(client, token, db):
    generate(client, token)
    with ThreadPoolExecutor(50) as pool:
        responses = list(pool.map(lambda _: client.post("/keys/billing-db/actions/rotate", headers=bearer(token)),
                                  range(50)))
    assert [r.status_code for r in responses] == [200] * 50
    assert sorted(r.json()["version"] for r in responses) == list(range(2, 52))
    versions = client.get("/keys/billing-db/versions", headers=bearer(token)).json()["versions"]
    assert [v["version"] for v in versions] == list(range(1, 52))
    assert [v["state"] for v in versions].count("in-use") == 1 and versions[-1]["state"] == "in-use"
    assert client.get("/keys/billing-db", headers=bearer(token)).json()["encryptWith"]["version"] == 51


def test_parallel_generates_of_one_reference_give_one_200_and_409s(client, token):
    with ThreadPoolExecutor(20) as pool:
        statuses = sorted(pool.map(lambda _: generate(client, token, "racy").status_code, range(20)))
    assert statuses == [200] + [409] * 19


def test_a_generate_in_progress_makes_another_answer_409_at_once_not_wait(app, client, token, db):
    import time
    import uuid
    import jwt
    from kms.keys.service import hash_key_reference
    owner = uuid.UUID(jwt.decode(token, options={"verify_signature": False})["sub"])
    ref_hash = hash_key_reference(app.extensions["kms"], owner, "racy")
    with db.cursor() as cur:  # another generate of the same reference, mid-transaction
        cur.execute("BEGIN")
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (int.from_bytes(ref_hash[:8], "big", signed=True),))
        started = time.monotonic()
        answer = generate(client, token, "racy")
        elapsed = time.monotonic() - started
        cur.execute("ROLLBACK")
    assert answer.status_code == 409
    assert elapsed < 1.0, elapsed  # waiting would have lasted until the lock timeout (5 s)
    assert generate(client, token, "racy").status_code == 200  # once it is gone, the reference is free


def test_one_in_use_version_is_enforced_by_the_database(client, token, db):
    generate(client, token)
    import psycopg2
    with pytest.raises(psycopg2.errors.UniqueViolation), db.cursor() as cur:
        cur.execute("""INSERT INTO key_versions (key_id, version, state, kek_version, wrapped_dek)
                       SELECT key_id, 2, 'in-use', kek_version, wrapped_dek FROM key_versions""")


def test_delete_stops_serving_at_once_and_restore_brings_it_back(client, token):
    dek = generate(client, token).json()["dek"]
    assert client.delete("/keys/billing-db/actions/delete", headers=bearer(token)).status_code == 204
    assert client.get("/keys/billing-db", headers=bearer(token)).status_code == 404
    assert client.post("/keys/billing-db/actions/rotate", headers=bearer(token)).status_code == 404
    assert generate(client, token).status_code == 409  # the reference is held while deletion is pending
    listed = client.get("/keys", headers=bearer(token)).json()["keys"]
    assert listed[0]["state"] == "pending-deletion" and listed[0]["destroyAt"]
    restored = client.post("/keys/billing-db/actions/restore", headers=bearer(token))
    assert restored.status_code == 200 and restored.json()["state"] == "enabled"
    assert client.get("/keys/billing-db", headers=bearer(token)).json()["encryptWith"]["dek"] == dek


def test_restore_of_a_live_key_is_409_and_of_an_unknown_key_404(client, token):
    generate(client, token)
    assert client.post("/keys/billing-db/actions/restore", headers=bearer(token)).status_code == 409
    assert client.post("/keys/nothing/actions/restore", headers=bearer(token)).status_code == 404


def test_deletion_with_zero_wait_destroys_at_once(make_app, auth_for):
    app = make_app(KEY_DELETION_WAIT=0)

    def scenario(http, t):
        http.post("/keys/actions/generate", json={"keyReference": "k"}, headers=bearer(t))
        assert http.delete("/keys/k/actions/delete", headers=bearer(t)).status_code == 204
        assert http.post("/keys/k/actions/restore", headers=bearer(t)).status_code == 404
        assert http.post("/keys/actions/generate", json={"keyReference": "k"}, headers=bearer(t)).status_code == 200
    auth_for(app, scenario)


def test_cron_job_destroys_keys_whose_deletion_is_due(client, token, db, runner):
    generate(client, token)
    client.delete("/keys/billing-db/actions/delete", headers=bearer(token))
    with db.cursor() as cur:
        cur.execute("UPDATE keys SET destroy_after = now() - interval '1 second'")
    result = runner.invoke(args=["kms", "keys", "rotate-due"])
    assert result.exit_code == 0 and "destroyed 1 keys" in result.output
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM key_versions")
        assert cur.fetchone()[0] == 0
    assert generate(client, token).status_code == 200


def test_retire_erases_old_versions_and_they_become_410(client, token, db):
    generate(client, token)
    for _ in range(3):
        client.post("/keys/billing-db/actions/rotate", headers=bearer(token))
    response = client.post("/keys/billing-db/actions/retire", json={"belowVersion": 3}, headers=bearer(token))
    assert response.status_code == 200 and response.json()["currentVersion"] == 4
    for version in (1, 2):
        gone = client.get(f"/keys/billing-db/{version}", headers=bearer(token))
        assert gone.status_code == 410 and gone.json()["error"] == "version_retired"
    assert client.get("/keys/billing-db/3", headers=bearer(token)).status_code == 200
    states = [v["state"] for v in client.get("/keys/billing-db/versions", headers=bearer(token)).json()["versions"]]
    assert states == ["retired", "retired", "deprecated", "in-use"]
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM key_versions WHERE state = 'retired' AND wrapped_dek IS NULL")
        assert cur.fetchone()[0] == 2


@pytest.mark.parametrize("below,status", [(5, 409), (3, 409), (0, 400), (1, 400), ("2", 400), (None, 400)])
def test_retire_cannot_touch_the_in_use_version_or_take_bad_input(client, token, below, status):
    generate(client, token)
    client.post("/keys/billing-db/actions/rotate", headers=bearer(token))
    response = client.post("/keys/billing-db/actions/retire", json={"belowVersion": below}, headers=bearer(token))
    assert response.status_code == status


def test_rotation_period_rotates_a_due_key_before_it_is_served(client, token, db):
    generate(client, token)
    response = client.post("/keys/billing-db/actions/set-rotation-period", json={"rotationPeriod": 3600_000},
                           headers=bearer(token))
    assert response.status_code == 200 and response.json()["rotationPeriod"] == 3600_000
    assert client.get("/keys/billing-db", headers=bearer(token)).json()["encryptWith"]["version"] == 1
    with db.cursor() as cur:
        cur.execute("UPDATE key_versions SET created_at = now() - interval '2 hours'")
    served = client.get("/keys/billing-db", headers=bearer(token)).json()
    assert served["encryptWith"]["version"] == 2 and served["decryptWith"]["version"] == 2
    old = client.get("/keys/billing-db/1", headers=bearer(token))
    assert old.status_code == 200 and old.json()["encryptWith"]["version"] == 2


def test_rotate_due_cli_rotates_every_due_key(client, token, db, runner):
    generate(client, token, "a")
    generate(client, token, "b")
    generate(client, token, "c")
    for ref in ("a", "b"):
        client.post(f"/keys/{ref}/actions/set-rotation-period", json={"rotationPeriod": 60_000}, headers=bearer(token))
    with db.cursor() as cur:
        cur.execute("UPDATE key_versions SET created_at = now() - interval '5 minutes'")
    result = runner.invoke(args=["kms", "keys", "rotate-due"])
    assert result.exit_code == 0 and "rotated 2 keys" in result.output
    versions = {k["keyReference"]: k["currentVersion"] for k in client.get("/keys", headers=bearer(token)).json()["keys"]}
    assert versions == {"a": 2, "b": 2, "c": 1}


@pytest.mark.parametrize("period", [0, 59_999, -1, "1h", 1.5])
def test_bad_rotation_period_is_400(client, token, period):
    generate(client, token)
    response = client.post("/keys/billing-db/actions/set-rotation-period", json={"rotationPeriod": period},
                           headers=bearer(token))
    assert response.status_code == 400


def test_rotation_period_can_be_cleared_with_null(client, token):
    generate(client, token)
    client.post("/keys/billing-db/actions/set-rotation-period", json={"rotationPeriod": 60_000}, headers=bearer(token))
    response = client.post("/keys/billing-db/actions/set-rotation-period", json={"rotationPeriod": None},
                           headers=bearer(token))
    assert response.status_code == 200 and response.json()["rotationPeriod"] is None


def test_listing_keys_and_versions_never_carries_dek_material(client, token):
    dek = generate(client, token).json()["dek"]
    listing = client.get("/keys", headers=bearer(token))
    versions = client.get("/keys/billing-db/versions", headers=bearer(token))
    assert listing.json()["keys"][0]["keyReference"] == "billing-db"
    for response in (listing, versions):
        assert dek not in response.text and "dek" not in response.text


def current_dek_of_the_only_client(app, reference):
    """Serve `app`, log in as its one non-admin client, and fetch the key's current DEK."""
    server, base_url = serve_in_thread(app, threads=2)
    try:
        with HttpClient(base_url) as http:
            admin = AuthActions(http)
            clients = http.get("/clients", headers=bearer(admin.admin_token)).json()["clients"]
            name = next(c["clientname"] for c in clients if c["role"] == "client")
            token = admin.login(name, CLIENT_PASSWORD)
            return http.get(f"/keys/{reference}", headers=bearer(token)).json()["encryptWith"]["dek"]
    finally:
        stop_server(server)


def test_kek_rotation_rewraps_every_dek_and_keeps_serving_them(make_app, auth_for):
    from kms.config import generate_secret
    app = make_app()
    served = auth_for(app, lambda http, t: (
        http.post("/keys/actions/generate", json={"keyReference": "k"}, headers=bearer(t)).json()["dek"]))
    new_app = make_app(KEK_2=generate_secret())  # KEK_ACTIVE defaults to the highest
    cli = new_app.test_cli_runner()
    assert "KEK version 1: 1 wrapped" in cli.invoke(args=["kms", "kek", "status"]).output
    result = cli.invoke(args=["kms", "kek", "rewrap"])
    assert result.exit_code == 0 and "re-wrapped 1 DEK versions under KEK version 2" in result.output
    assert "KEK version 2 (active): 1 wrapped" in cli.invoke(args=["kms", "kek", "status"]).output
    with new_app.extensions["kms"].pool.connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT kek_version, c.id FROM key_versions, clients c WHERE c.role = 'client'")
        kek_version, _ = cur.fetchone()
    assert kek_version == 2
    assert current_dek_of_the_only_client(new_app, "k") == served


def test_an_old_kek_can_be_left_out_once_nothing_is_wrapped_with_it(make_app, base_env, auth_for):
    from kms.config import generate_secret
    app = make_app()
    served = auth_for(app, lambda http, t: (
        http.post("/keys/actions/generate", json={"keyReference": "k"}, headers=bearer(t)).json()["dek"]))
    kek_2 = generate_secret()
    rewrapping = make_app(KEK_2=kek_2)
    assert rewrapping.test_cli_runner().invoke(args=["kms", "kek", "rewrap"]).exit_code == 0
    only_kek_2 = make_app(KEK="", KEK_2=kek_2)  # KEK (version 1) retired from the configuration
    assert only_kek_2.extensions["kms"].keyring.kek_versions == [2]
    assert current_dek_of_the_only_client(only_kek_2, "k") == served


def test_rewrap_moves_every_good_row_and_reports_each_bad_one(make_app, auth_for, db):
    from kms.config import generate_secret
    app = make_app()

    def make_keys(http, token):
        for i in range(5):
            assert http.post("/keys/actions/generate", json={"keyReference": f"k{i}"},
                             headers=bearer(token)).status_code == 200
    auth_for(app, make_keys)
    with db.cursor() as cur:
        cur.execute("SELECT key_id FROM key_versions ORDER BY key_id LIMIT 2")
        bad, moved_into = [row[0] for row in cur.fetchall()]
        cur.execute("UPDATE key_versions SET wrapped_dek = (SELECT wrapped_dek FROM key_versions WHERE key_id = %s)"
                    " WHERE key_id = %s", (moved_into, bad))
    new_app = make_app(KEK_2=generate_secret())
    result = new_app.test_cli_runner().invoke(args=["kms", "kek", "rewrap"])
    assert result.exit_code == 4, result.output
    assert f"key {bad} version 1: stored DEK failed authentication" in result.output
    assert "re-wrapped 4 DEK versions under KEK version 2" in result.output
    assert "Traceback" not in result.output
    with db.cursor() as cur:
        cur.execute("SELECT key_id, kek_version FROM key_versions ORDER BY key_id")
        assert [kek for key_id, kek in cur.fetchall() if key_id != bad] == [2, 2, 2, 2]
        cur.execute("SELECT count(*) FROM audit_events WHERE action = 'kek.rewrap' AND outcome = 'integrity_error'")
        assert cur.fetchone()[0] == 1
