"""Imported keys are found by the original's hash of their reference until their owner first names
them; that request moves the key under our own index, and from then on it is like any other."""
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from kms.config import generate_secret
from kms.keys.service import hash_key_reference
from tests.conftest import AuthActions, HttpClient, bearer, serve_in_thread, stop_server
from tests.importing.conftest import CLIENTS
from tests.test_go_clients import raw_url_decode

BILLING_PASSWORD = CLIENTS["billing-svc"][0]


def dek(answer, which="encryptWith") -> bytes:
    assert answer.status_code == 200, answer.text
    return raw_url_decode(answer.json()[which]["dek"])


@pytest.fixture
def billing(populated, import_seed, auth):
    """billing-svc's token, after the import."""
    result = import_seed()
    assert result.exit_code == 0, result.output
    return auth.login("billing-svc", BILLING_PASSWORD)


def key_rows(db, client_id):
    with db.cursor() as cur:
        cur.execute("SELECT ref_hash, ref_enc IS NULL FROM keys WHERE client_id = %s ORDER BY id", (client_id,))
        return [(bytes(ref_hash), unnamed) for ref_hash, unnamed in cur.fetchall()]


def test_listings_show_imported_keys_without_a_name_until_their_owner_names_them(billing, client, auth, db, app):
    listed = client.get("/keys", headers=bearer(billing)).json()["keys"]
    assert sorted((k["keyReference"], k["currentVersion"]) for k in listed) == [(None, 1), (None, 3)]
    owner = uuid.UUID(auth.client_id("billing-svc"))
    assert [unnamed for _, unnamed in key_rows(db, owner)] == [True, True]

    client.get("/keys/invoices-db", headers=bearer(billing))  # its first use
    listed = client.get("/keys", headers=bearer(billing)).json()["keys"]
    assert sorted(((k["keyReference"], k["currentVersion"]) for k in listed), key=str) == [("invoices-db", 3), (None, 1)]
    # Moved under our own index: found by our hash of (owner, reference), like a key made here.
    ours = hash_key_reference(app.extensions["kms"], owner, "invoices-db")
    assert (ours, False) in key_rows(db, owner)
    with db.cursor() as cur:
        cur.execute("SELECT target FROM audit_events WHERE action = 'key.claim_imported'")
        assert cur.fetchall() == [(ours.hex(),)]


def test_a_moved_key_serves_the_same_deks_and_rotates_like_any_other(populated, billing, client):
    for version in (1, 2, 3):
        answer = client.get(f"/keys/invoices-db/{version}", headers=bearer(billing))
        assert dek(answer, "decryptWith") == populated.deks[("billing-svc", "invoices-db", version)]
    rotated = client.post("/keys/invoices-db/actions/rotate", headers=bearer(billing))
    assert rotated.status_code == 200 and rotated.json()["version"] == 4
    answer = client.get("/keys/invoices-db/3", headers=bearer(billing))
    assert dek(answer, "decryptWith") == populated.deks[("billing-svc", "invoices-db", 3)]
    assert answer.json()["encryptWith"]["version"] == 4


@pytest.mark.parametrize("first_use", ["rotate", "versions", "retire", "set-rotation-period", "delete"])
def test_any_request_naming_an_imported_key_moves_it_first(populated, billing, client, first_use):
    headers = bearer(billing)
    answer = {
        "rotate": lambda: client.post("/keys/invoices-db/actions/rotate", headers=headers),
        "versions": lambda: client.get("/keys/invoices-db/versions", headers=headers),
        "retire": lambda: client.post("/keys/invoices-db/actions/retire", json={"belowVersion": 2}, headers=headers),
        "set-rotation-period": lambda: client.post("/keys/invoices-db/actions/set-rotation-period",
                                                   json={"rotationPeriod": 3_600_000}, headers=headers),
        "delete": lambda: client.delete("/keys/invoices-db/actions/delete", headers=headers),
    }[first_use]()
    assert answer.status_code in (200, 204), answer.text
    if first_use == "delete":
        assert client.post("/keys/invoices-db/actions/restore", headers=headers).status_code == 200
    served = client.get("/keys/invoices-db/3", headers=headers)
    assert dek(served, "decryptWith") == populated.deks[("billing-svc", "invoices-db", 3)]


def test_generating_a_reference_an_imported_key_has_is_409(billing, client):
    answer = client.post("/keys/actions/generate", json={"keyReference": "ledger"}, headers=bearer(billing))
    assert answer.status_code == 409 and answer.json()["error"] == "key_exists"
    assert client.post("/keys/actions/generate", json={"keyReference": "new-one"},
                       headers=bearer(billing)).status_code == 200


def test_another_clients_imported_key_of_the_same_reference_stays_its_own(populated, billing, client, auth):
    """The original's reference hash is not bound to the client: both had an `invoices-db`."""
    orders = auth.login("Orders-Svc", CLIENTS["Orders-Svc"][0])
    mine = client.get("/keys/invoices-db", headers=bearer(billing))
    theirs = client.get("/keys/invoices-db", headers=bearer(orders))
    assert dek(mine) == populated.deks[("billing-svc", "invoices-db", 3)]
    assert dek(theirs) == populated.deks[("Orders-Svc", "invoices-db", 1)]
    assert client.get("/keys/orders-db", headers=bearer(billing)).status_code == 404


def test_an_unknown_reference_is_still_404(billing, client):
    answer = client.get("/keys/no-such-key", headers=bearer(billing))
    assert answer.status_code == 404 and answer.json()["error"] == "not_found"


def test_parallel_first_look_ups_of_an_imported_key_all_get_it_and_it_moves_once(populated, billing, app, db):
    server, base_url = serve_in_thread(app, threads=8)
    try:
        def look_up(_):
            with HttpClient(base_url) as http:
                return dek(http.get("/keys/invoices-db", headers=bearer(billing)))
        with ThreadPoolExecutor(8) as pool:
            served = list(pool.map(look_up, range(8)))
    finally:
        stop_server(server)
    assert served == [populated.deks[("billing-svc", "invoices-db", 3)]] * 8
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM audit_events WHERE action = 'key.claim_imported'")
        assert cur.fetchone()[0] == 1


def test_a_tampered_imported_key_row_is_refused_not_moved(billing, client, db, auth):
    owner = auth.client_id("billing-svc")
    with db.cursor() as cur:
        cur.execute("UPDATE keys SET current_version = 1 WHERE client_id = %s AND current_version = 3", (owner,))
    answer = client.get("/keys/invoices-db", headers=bearer(billing))
    assert answer.status_code == 500 and answer.json()["error"] == "integrity_error"


def test_kek_rotation_re_wraps_the_kept_secret_and_imported_keys_are_still_found(populated, billing, another_app, db):
    kek_2 = generate_secret()
    rewrapping = another_app(KEK_2=kek_2)
    assert rewrapping.test_cli_runner().invoke(args=["kms", "kek", "rewrap"]).exit_code == 0
    with db.cursor() as cur:
        cur.execute("SELECT kek_version FROM import_sources")
        assert cur.fetchall() == [(2,)]
    only_kek_2 = another_app(KEK="", KEK_2=kek_2)
    server, base_url = serve_in_thread(only_kek_2, threads=2)
    try:
        with HttpClient(base_url) as http:
            answer = http.get("/keys/ledger", headers=bearer(billing))
    finally:
        stop_server(server)
    assert dek(answer) == populated.deks[("billing-svc", "ledger", 1)]


def test_a_server_without_the_kek_the_kept_secret_is_wrapped_with_starts_and_answers_503(seed, import_seed,
                                                                                           another_app):
    seed.sign_up("lone-svc", "Lone-passw0rd!!")  # a client and no key: only the kept secret is under KEK 1
    assert import_seed().exit_code == 0
    lacking = another_app(KEK="", KEK_2=generate_secret())  # starts: one secret it cannot open stops nothing
    server, base_url = serve_in_thread(lacking, threads=2)
    try:
        with HttpClient(base_url) as http:
            token = AuthActions(http).new_client("fresh-svc")
            answer = http.get("/keys/anything", headers=bearer(token))  # a miss looks among the imported keys
    finally:
        stop_server(server)
    assert answer.status_code == 503 and answer.json()["error"] == "kek_unavailable"
    assert int(answer.headers["Retry-After"]) > 0
