"""Imported clients log in with their old password: the original's bcrypt hash is checked once and
replaced by an Argon2id hash on the first success. Unknown, wrong and disabled stay alike, in
answer and in time, imported or not."""
import statistics
import time

import pytest

from kms.auth import passwords
from tests.conftest import ADMIN_NAME, HttpClient, bearer, serve_in_thread, stop_server
from tests.importing.conftest import CLIENTS

BILLING_PASSWORD = CLIENTS["billing-svc"][0]
WRONG = "Wrong-passw0rd!"


def stored_hash(db, name_like: str) -> str:
    with db.cursor() as cur:
        cur.execute("SELECT c.password_hash FROM clients c JOIN imported_clients i ON i.client_id = c.id "
                    "WHERE i.original_id = %s", (name_like,))
        return cur.fetchone()[0]


@pytest.fixture
def imported(populated, import_seed):
    result = import_seed()
    assert result.exit_code == 0, result.output
    return populated


def test_the_first_login_checks_the_bcrypt_hash_once_and_replaces_it(imported, client, db):
    billing = imported.ids["billing-svc"]
    assert stored_hash(db, billing).startswith("$2a$10$")
    first = client.post("/auth/login", json={"clientname": "billing-svc", "password": BILLING_PASSWORD})
    assert first.status_code == 200, first.text
    replaced = stored_hash(db, billing)
    assert replaced.startswith("$argon2id$")
    # The row's MAC was made anew with it: the next login and the token's requests are believed.
    again = client.post("/auth/login", json={"clientname": "billing-svc", "password": BILLING_PASSWORD})
    assert again.status_code == 200
    assert client.get("/keys", headers=bearer(again.json()["token"])).status_code == 200
    assert stored_hash(db, billing) == replaced
    assert client.post("/auth/login", json={"clientname": "billing-svc", "password": WRONG}).status_code == 401


def test_names_compare_without_regard_to_case_for_imported_clients_too(imported, client):
    answer = client.post("/auth/login", json={"clientname": "orders-svc", "password": CLIENTS["Orders-Svc"][0]})
    assert answer.status_code == 200


def test_wrong_unknown_and_disabled_answer_alike_for_an_imported_client(imported, client, auth, db):
    def login(name, password):
        answer = client.post("/auth/login", json={"clientname": name, "password": password})
        return answer.status_code, answer.json()["error"], answer.json()["message"]

    unknown = login("ghost-svc", WRONG)
    assert unknown[0] == 401
    assert login("billing-svc", WRONG) == unknown
    orders = auth.client_id("Orders-Svc")
    assert client.post(f"/clients/{orders}/actions/disable", headers=bearer(auth.admin_token)).status_code == 204
    assert login("Orders-Svc", CLIENTS["Orders-Svc"][0]) == unknown  # the right password, disabled
    assert stored_hash(db, imported.ids["Orders-Svc"]).startswith("$2a$")  # not replaced either


def test_while_imported_hashes_remain_every_login_does_a_bcrypt_check_and_then_none(imported, client, auth,
                                                                                    monkeypatch):
    checks = []
    real = passwords.bcrypt.checkpw
    monkeypatch.setattr(passwords.bcrypt, "checkpw", lambda password, hashed: checks.append(hashed) or
                        real(password, hashed))

    def bcrypt_checks_of(name, password):
        checks.clear()
        client.post("/auth/login", json={"clientname": name, "password": password})
        return len(checks)

    assert bcrypt_checks_of(ADMIN_NAME, WRONG) == 1  # a client of ours
    assert bcrypt_checks_of("ghost-svc", WRONG) == 1  # no client at all
    assert bcrypt_checks_of("billing-svc", WRONG) == 1  # an imported one
    for name, (password, _, _) in CLIENTS.items():
        assert bcrypt_checks_of(name, password) == 1  # each replaces its hash
    assert bcrypt_checks_of(ADMIN_NAME, WRONG) == 0  # none left: Argon2id alone, as before any import
    assert bcrypt_checks_of("ghost-svc", WRONG) == 0


def test_login_timing_does_not_tell_an_imported_client_from_ours_or_from_no_client(imported, another_app):
    # Limits raised so that every failure below is checked (by default the 6th of one name is a 429).
    server, base_url = serve_in_thread(another_app(LOGIN_MAX_FAILURES_PER_CLIENT=100,
                                                LOGIN_MAX_FAILURES_PER_ADDRESS=1000))
    try:
        with HttpClient(base_url) as http:
            def timed(name):
                started = time.perf_counter()
                answer = http.post("/auth/login", json={"clientname": name, "password": WRONG})
                assert answer.status_code == 401
                return time.perf_counter() - started

            timed(ADMIN_NAME)  # warm: connections, caches
            ours, imported_client, nobody = [], [], []
            for i in range(25):  # interleaved, so drift in the machine's speed hits all alike
                ours.append(timed(ADMIN_NAME))
                imported_client.append(timed("billing-svc"))  # its bcrypt hash still stored
                nobody.append(timed(f"ghost-{i}-svc"))
    finally:
        stop_server(server)
    # The median of pair-wise ratios: a pause of the machine hits one pair, not the statistic.
    for other in (imported_client, nobody):
        ratio = statistics.median(o / w for o, w in zip(other, ours))
        assert 0.75 < ratio < 1.33, (ratio, other, ours)
