"""Attacks on grants: a grantee (or a stranger) trying to learn which keys exist, to use a grant for
more than it names, to step outside its contextSubset, and a database writer trying to keep a
grant alive or to make one unending; and inputs that must be a 4xx, never a 500."""
import json
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from tests.conftest import CLIENT_PASSWORD, bearer, envelope, tamper
from tests.grants.test_grants import CONTEXT, Pair, b64, unb64

OTHER = {"tenant": "globex"}


@pytest.fixture
def pair(auth, client):
    return Pair(auth, client)


def post(client, token, path, body):
    return client.post(path, json=body, headers=bearer(token))


def integrity_failures(db) -> list:
    with db.cursor() as cur:
        cur.execute("SELECT target, outcome FROM audit_events WHERE action = 'integrity.failure' ORDER BY seq")
        return cur.fetchall()


def grant_revoked(db, grant_id) -> bool:
    with db.cursor() as cur:
        cur.execute("SELECT revoked_at IS NOT NULL FROM grants WHERE id = %s", (grant_id,))
        return cur.fetchone()[0]


# What the grantee may not learn

def test_not_found_answers_say_nothing_of_owners_keys_or_grants(pair, client, auth):
    """No owner, an owner without that key, a key without a grant, a grant for another operation, a
    key not exportable, a retired version: one answer, the same body (but its request id) and the
    same headers, on the look-up and on each operation."""
    ciphertext = pair.sealed()
    stranger = auth.new_client("stranger")
    pair.grant(operations=["encrypt"])  # for another operation than those asked below
    assert post(client, pair.owner, "/keys/invoices/actions/rotate", None).status_code == 200
    assert post(client, pair.owner, "/keys/invoices/actions/retire", {"belowVersion": 2}).status_code == 200

    def answers(token, ref, suffix=""):
        yield client.get(f"/keys/{ref}{suffix}", headers=bearer(token))
        yield post(client, token, f"/keys/{ref}/actions/decrypt", {"ciphertext": ciphertext, "context": CONTEXT})
        yield post(client, token, f"/keys/{ref}/actions/reencrypt", {"ciphertext": ciphertext, "context": CONTEXT})
        yield post(client, token, f"/keys/{ref}/actions/generate-data-key", {"context": CONTEXT})

    seen = []
    for token, ref, suffix in [(pair.grantee, "nobody-here:invoices", ""), (pair.grantee, "billing:missing", ""),
                               (pair.grantee, "billing:invoices", ""), (pair.grantee, "billing:invoices", "/1"),
                               (pair.grantee, "billing:vault", ""), (stranger, "billing:invoices", ""),
                               (stranger, "billing:invoices", "/1"), (stranger, "billing:vault", "")]:
        for response in answers(token, ref, suffix):
            body = envelope(response, 404, "not_found")
            headers = {name: value for name, value in response.headers.items()
                       if name.lower() not in ("x-request-id", "date", "content-length")}
            seen.append((body["message"], tuple(sorted(headers.items()))))
    assert len(set(seen)) == 1, set(seen)


# What a grant allows: its operations, each on its own

ROUTES = {
    "fetch": lambda p, token, ciphertext: p.client.get("/keys/billing:invoices", headers=bearer(token)),
    "encrypt": lambda p, token, ciphertext: post(p.client, token, "/keys/billing:invoices/actions/encrypt",
                                                 {"items": [{"plaintext": b64(b"x"), "context": CONTEXT}]}),
    "decrypt": lambda p, token, ciphertext: post(p.client, token, "/keys/billing:invoices/actions/decrypt",
                                                 {"items": [{"ciphertext": ciphertext, "context": CONTEXT}]}),
    "reencrypt": lambda p, token, ciphertext: post(p.client, token, "/keys/billing:invoices/actions/reencrypt",
                                                   {"items": [{"ciphertext": ciphertext, "context": CONTEXT}]}),
    "generate-data-key": lambda p, token, ciphertext: post(p.client, token,
                                                           "/keys/billing:invoices/actions/generate-data-key",
                                                           {"items": [{"context": CONTEXT}]}),
}


def _allowed(response) -> bool:
    if response.status_code != 200:
        assert response.status_code == 404 and response.json()["error"] == "not_found", response.text
        return False
    body = response.json()
    return "results" not in body or "error" not in body["results"][0]


@pytest.mark.parametrize("granted", sorted(ROUTES))
def test_a_grant_for_one_operation_opens_no_other_even_with_the_key_kept(pair, granted):
    """Each route twice (the second with the key's DEKs kept in the process, as the owner used it
    just before), in batches: only the operation granted answers."""
    ciphertext = pair.sealed()
    pair.grant(operations=[granted])
    for _ in range(2):
        for operation, route in ROUTES.items():
            pair.sealed()  # the owner uses the key: its DEKs are kept
            assert _allowed(route(pair, pair.grantee, ciphertext)) == (operation == granted), operation


def test_a_grant_replaced_by_a_narrower_one_is_obeyed_at_once_with_the_key_kept(pair, client):
    ciphertext = pair.sealed()
    wide = pair.grant(operations=["decrypt", "encrypt"])
    for _ in range(2):  # the grant and the key remembered in this process
        assert pair.decrypt(ciphertext).status_code == 200
        assert pair.encrypt(token=pair.grantee, ref="billing:invoices").status_code == 200
    assert client.delete(f"/keys/invoices/grants/{wide['id']}", headers=bearer(pair.owner)).status_code == 204
    pair.grant(operations=["encrypt"])
    for _ in range(2):
        envelope(pair.decrypt(ciphertext), 404, "not_found")
        assert pair.encrypt(token=pair.grantee, ref="billing:invoices").status_code == 200


def test_an_owner_deleted_and_its_name_taken_again_shares_nothing(pair, client, auth):
    """The grantee remembered the owner's id by name and kept the key; the new client of that name,
    with a key of the same reference, shares nothing until it grants."""
    ciphertext = pair.sealed()
    pair.grant(operations=["decrypt", "encrypt", "fetch"])
    for _ in range(2):
        assert pair.decrypt(ciphertext).status_code == 200
        assert client.get("/keys/billing:invoices", headers=bearer(pair.grantee)).status_code == 200
    assert client.delete(f"/clients/{auth.client_id('billing')}", headers=bearer(auth.admin_token)).status_code == 204
    again = auth.new_client("billing")
    assert post(client, again, "/keys/actions/generate", {"keyReference": "invoices"}).status_code == 200
    for _ in range(2):
        envelope(pair.decrypt(ciphertext), 404, "not_found")
        envelope(pair.encrypt(token=pair.grantee, ref="billing:invoices"), 404, "not_found")
        envelope(client.get("/keys/billing:invoices", headers=bearer(pair.grantee)), 404, "not_found")
    assert client.get("/grants", headers=bearer(pair.grantee)).json() == {"grants": []}


# contextSubset

def test_reencrypt_within_a_shared_key_holds_to_context_to_the_subset(pair, client):
    """A grant with contextSubset {"tenant": "acme"}: re-encrypting within the shared key must not
    make a ciphertext bound to another tenant's context (the subset applies to toContext of a
    reencrypt into a shared key, this one too), with or without the key kept, named or not."""
    pair.grant(operations=["reencrypt"], contextSubset=CONTEXT)
    ciphertext = pair.sealed()
    for to in ({"toContext": OTHER}, {"toContext": {}}, {"toContext": OTHER, "toKeyReference": "billing:invoices"}):
        for _ in range(2):
            body = {"ciphertext": ciphertext, "context": CONTEXT, **to}
            envelope(post(client, pair.grantee, "/keys/billing:invoices/actions/reencrypt", body), 403,
                     "context_not_granted")
            batch = post(client, pair.grantee, "/keys/billing:invoices/actions/reencrypt", {"items": [body]})
            assert batch.json()["results"][0]["error"] == "context_not_granted", batch.text
    moved = post(client, pair.grantee, "/keys/billing:invoices/actions/reencrypt",
                 {"ciphertext": ciphertext, "context": CONTEXT, "toContext": {**CONTEXT, "year": "2026"}})
    assert moved.status_code == 200, moved.text


def test_context_subset_is_bounded_as_a_context_is(pair, client):
    """A subset no context could hold (more pairs or bytes than a context may have) is a 400."""
    too_many = {f"k{i}": "v" for i in range(17)}
    assert pair.grant(contextSubset=too_many, status=400)["error"] == "context_too_large"
    assert pair.grant(contextSubset={"k": "v" * 2000}, status=400)["error"] == "context_too_large"
    pair.grant(contextSubset={f"k{i}": "v" for i in range(16)})


# A database writer: nothing gained, and nothing made that cannot be ended

def test_a_grant_whose_expiry_was_extended_in_the_database_is_refused(pair, db):
    ciphertext = pair.sealed()
    soon = datetime.now(timezone.utc) + timedelta(seconds=1)
    grant = pair.grant(operations=["decrypt", "fetch"], expiresAt=soon.isoformat())
    assert pair.decrypt(ciphertext).status_code == 200  # remembered, the key kept
    time.sleep(max(0.0, (soon - datetime.now(timezone.utc)).total_seconds()) + 0.2)
    tamper(db, "UPDATE grants SET expires_at = now() + interval '1 day' WHERE id = %s", (grant["id"],))
    envelope(pair.decrypt(ciphertext), 404, "not_found")
    envelope(pair.client.get("/keys/billing:invoices", headers=bearer(pair.grantee)), 404, "not_found")
    assert integrity_failures(db)[-1][0] == f"grants:{grant['id']}"


def test_a_grant_given_to_another_grantee_in_the_database_is_refused(pair, auth, db):
    ciphertext = pair.sealed()
    grant = pair.grant(operations=["decrypt"])
    mallory = auth.new_client("mallory")
    tamper(db, "UPDATE grants SET grantee_id = %s WHERE id = %s", (auth.client_id("mallory"), grant["id"]))
    envelope(pair.decrypt(ciphertext, token=mallory), 404, "not_found")
    assert integrity_failures(db)[-1][0] == f"grants:{grant['id']}"


def swap_names(db, one, other):
    """Two clients' names swapped in the database (their hashes and encrypted names), around the
    unique index on the hash."""
    rows = tamper(db, "SELECT id, name_hash, name_enc FROM clients WHERE id IN (%s, %s)", (one, other))
    (first, first_hash, first_enc), (second, second_hash, second_enc) = rows
    tamper(db, "UPDATE clients SET name_hash = %s WHERE id = %s", (b"\0" * 32, first))
    tamper(db, "UPDATE clients SET name_hash = %s, name_enc = %s WHERE id = %s", (first_hash, first_enc, second))
    tamper(db, "UPDATE clients SET name_hash = %s, name_enc = %s WHERE id = %s", (second_hash, second_enc, first))


def test_an_owner_name_moved_to_another_client_in_the_database_is_refused(pair, client, auth, db):
    """mallory grants reporting encrypt on its own `invoices`, then a writer gives mallory billing's
    name: reporting, naming billing:invoices, must not encrypt under mallory's key."""
    mallory = auth.new_client("mallory")
    assert post(client, mallory, "/keys/actions/generate", {"keyReference": "invoices"}).status_code == 200
    assert post(client, mallory, "/keys/invoices/grants",
                {"grantee": "reporting", "operations": ["encrypt"]}).status_code == 201
    billing_id, mallory_id = auth.client_id("billing"), auth.client_id("mallory")
    swap_names(db, billing_id, mallory_id)
    envelope(pair.encrypt(token=pair.grantee, ref="billing:invoices"), 404, "not_found")
    assert any(target.startswith("clients:") for target, _ in integrity_failures(db))


def test_a_tampered_grant_can_still_be_ended(pair, client, auth, db):
    """A grant row altered in the database is refused on use; ending it (the owner's revocation,
    or either client's deletion) must still work, and is reported, not answered 404 as if the
    grant, the key or the client did not exist."""
    ciphertext = pair.sealed()
    first = pair.grant(operations=["decrypt"])
    tamper(db, "UPDATE grants SET operations = %s WHERE id = %s", (["decrypt", "encrypt"], first["id"]))
    envelope(pair.decrypt(ciphertext), 404, "not_found")
    assert client.delete(f"/keys/invoices/grants/{first['id']}", headers=bearer(pair.owner)).status_code == 204
    assert grant_revoked(db, first["id"])
    envelope(pair.decrypt(ciphertext), 404, "not_found")
    second = pair.grant(operations=["decrypt"])  # the grantee can be granted again
    third = pair.grant(ref="vault", operations=["decrypt"])
    tamper(db, "UPDATE grants SET operations = %s WHERE id IN (%s, %s)",
           (["decrypt", "encrypt"], second["id"], third["id"]))
    assert client.delete(f"/clients/{auth.client_id('reporting')}",
                         headers=bearer(auth.admin_token)).status_code == 204
    assert grant_revoked(db, second["id"]) and grant_revoked(db, third["id"])
    grantee = auth.new_client("analytics")
    fourth = post(client, pair.owner, "/keys/invoices/grants", {"grantee": "analytics", "operations": ["decrypt"]})
    tamper(db, "UPDATE grants SET context_subset = NULL, operations = %s WHERE id = %s",
           (["encrypt"], fourth.json()["id"]))
    assert client.delete(f"/clients/{auth.client_id('billing')}", headers=bearer(auth.admin_token)).status_code == 204
    assert grant_revoked(db, fourth.json()["id"])
    envelope(pair.decrypt(ciphertext, token=grantee, ref="billing:invoices"), 404, "not_found")
    reported = {target for target, _ in integrity_failures(db)}
    assert {f"grants:{g}" for g in (first["id"], second["id"], third["id"], fourth.json()["id"])} <= reported


def test_a_tampered_expired_grant_does_not_stop_the_cron_job(pair, db, runner):
    honest = pair.grant(operations=["decrypt"], expiresAt=(datetime.now(timezone.utc)
                                                             + timedelta(seconds=1)).isoformat())
    tampered = pair.grant(ref="vault", operations=["decrypt"])
    tamper(db, "UPDATE grants SET expires_at = now() - interval '1 day' WHERE id = %s", (tampered["id"],))
    time.sleep(1.3)
    result = runner.invoke(args=["kms", "keys", "rotate-due"])
    assert result.exit_code == 0, result.output
    assert "ended 2 expired grants" in result.output, result.output
    assert grant_revoked(db, honest["id"]) and grant_revoked(db, tampered["id"])


def test_listings_leave_out_a_tampered_grant_and_report_it(pair, client, auth, db):
    """The owner's, the grantee's and an admin's listings are not answered 404 (as if the owner's
    own key did not exist) because one grant row was altered: they leave it out, and it is reported."""
    honest = pair.grant(operations=["decrypt"])
    tampered = pair.grant(ref="vault", operations=["decrypt"])
    tamper(db, "UPDATE grants SET operations = %s WHERE id = %s", (["decrypt", "encrypt"], tampered["id"]))
    listed = client.get("/keys/invoices/grants", headers=bearer(pair.owner))
    assert listed.status_code == 200 and [g["id"] for g in listed.json()["grants"]] == [honest["id"]]
    listed = client.get("/keys/vault/grants", headers=bearer(pair.owner))
    assert listed.status_code == 200 and listed.json()["grants"] == [], listed.text
    mine = client.get("/grants", headers=bearer(pair.grantee))
    assert mine.status_code == 200 and [g["id"] for g in mine.json()["grants"]] == [honest["id"]], mine.text
    admin = client.get(f"/clients/{auth.client_id('billing')}/grants", headers=bearer(auth.admin_token))
    assert admin.status_code == 200 and [g["id"] for g in admin.json()["grants"]] == [honest["id"]], admin.text
    assert f"grants:{tampered['id']}" in {target for target, _ in integrity_failures(db)}


# Inputs that are the caller's mistake: 4xx, never a 500

@pytest.mark.parametrize("expires_at", ["9999-12-31T23:59:59-12:00", "9999-12-31T20:00:00-23:59"])
def test_an_expiry_beyond_what_a_time_can_hold_is_a_400(pair, expires_at):
    body = pair.grant(expiresAt=expires_at, status=400)
    assert body["error"] == "validation_failed" and "expiresAt" in body["fields"]


def test_the_grants_of_an_unknown_client_are_a_404(client, auth):
    envelope(client.get(f"/clients/{uuid.uuid4()}/grants", headers=bearer(auth.admin_token)), 404)


def test_a_key_that_does_not_exist_costs_what_one_without_a_grant_does(pair, client, auth, monkeypatch):
    """The same statements, in number, for an owner's key without a grant and for a reference the
    owner has no key under: no timing tells them apart (the owner's name stays remembered)."""
    from kms import db
    ciphertext = pair.sealed()
    stranger = auth.new_client("stranger")
    counted = {"statements": 0}
    execute_prepared, transaction = db.execute_prepared, db.transaction

    def counting_execute(*args, **kwargs):
        counted["statements"] += 1
        return execute_prepared(*args, **kwargs)

    def counting_transaction(*args, **kwargs):
        counted["statements"] += 1
        return transaction(*args, **kwargs)

    monkeypatch.setattr(db, "execute_prepared", counting_execute)
    monkeypatch.setattr(db, "transaction", counting_transaction)

    def cost(name: str, route: str) -> int:
        counted["statements"] = 0
        if route == "get":
            response = client.get(f"/keys/{name}", headers=bearer(stranger))
        else:
            response = post(client, stranger, f"/keys/{name}/actions/decrypt",
                            {"ciphertext": ciphertext, "context": CONTEXT})
        envelope(response, 404, "not_found")
        return counted["statements"]

    for route in ("get", "decrypt"):
        cost("billing:invoices", route)  # the owner's name remembered
        for _ in range(2):
            assert cost("billing:missing", route) == cost("billing:invoices", route), route


@pytest.mark.parametrize("deleted", ["reporting", "billing"])
def test_a_grant_ended_by_a_client_deletion_shows_its_end_in_its_uses(pair, client, auth, deleted):
    """/uses shows a grant's creation, its uses and its end: also an end by the deletion of its
    grantee or of its owner (the admin reads it, as the owner is gone in the second case)."""
    ciphertext = pair.sealed()
    grant = pair.grant()
    assert pair.decrypt(ciphertext).status_code == 200
    assert client.delete(f"/clients/{auth.client_id(deleted)}", headers=bearer(auth.admin_token)).status_code == 204
    if deleted == "reporting":
        uses = client.get(f"/keys/invoices/grants/{grant['id']}/uses", headers=bearer(pair.owner)).json()["uses"]
        assert [use["action"] for use in uses] == ["grant.create", "key.decrypt", "grant.revoke"]
    events = client.get("/audit?limit=1000", headers=bearer(auth.admin_token)).json()["events"]
    ends = [event for event in events if event["action"] == "grant.revoke"]
    assert [json.loads(event["detail"])["grant"] for event in ends] == [grant["id"]]


def test_an_admin_holds_no_grant_by_its_role(pair, client, auth):
    """An admin lists and revokes grants; it uses another client's key only as any grantee would."""
    ciphertext = pair.sealed()
    admin = auth.admin_token
    envelope(client.get("/keys/billing:invoices", headers=bearer(admin)), 404, "not_found")
    envelope(pair.decrypt(ciphertext, token=admin), 404, "not_found")
    envelope(client.get("/keys/billing:invoices/grants", headers=bearer(admin)), 404, "not_found")
    envelope(post(client, admin, "/keys/billing:invoices/grants", {"grantee": "reporting", "operations": ["decrypt"]}),
             404, "not_found")
    envelope(post(client, admin, "/keys/billing:invoices/actions/rotate", None), 404, "not_found")


def test_a_grant_past_its_expiry_is_no_live_grant(pair, client, auth):
    """Past its expiry a grant allows nothing: listings of live grants leave it out at once (not only
    once the expiry job has run), and the owner may grant the grantee again without revoking it
    first; that new grant records the old one's end."""
    soon = datetime.now(timezone.utc) + timedelta(seconds=1)
    old = pair.grant(operations=["decrypt"], expiresAt=soon.isoformat())
    time.sleep(max(0.0, (soon - datetime.now(timezone.utc)).total_seconds()) + 0.2)
    assert client.get("/keys/invoices/grants", headers=bearer(pair.owner)).json() == {"grants": []}
    assert client.get("/grants", headers=bearer(pair.grantee)).json() == {"grants": []}
    assert client.get(f"/clients/{auth.client_id('billing')}/grants",
                      headers=bearer(auth.admin_token)).json() == {"grants": []}
    new = pair.grant(operations=["encrypt"])
    assert [g["id"] for g in client.get("/grants", headers=bearer(pair.grantee)).json()["grants"]] == [new["id"]]
    uses = client.get(f"/keys/invoices/grants/{old['id']}/uses", headers=bearer(pair.owner)).json()["uses"]
    assert [use["action"] for use in uses] == ["grant.create", "grant.expire"]


def test_no_request_begun_after_a_revocation_answered_is_served(pair, live_server):
    """Grantees decrypting in parallel (the key kept, the grant remembered) while the owner revokes:
    every request sent after the revocation was answered gets 404."""
    import threading

    import requests

    ciphertext = pair.sealed()
    grant = pair.grant()
    outcomes, stop = [], threading.Event()

    def decrypting():
        with requests.Session() as session:
            while not stop.is_set():
                began = time.monotonic()
                status = session.post(f"{live_server}/keys/billing:invoices/actions/decrypt",
                                      json={"ciphertext": ciphertext, "context": CONTEXT},
                                      headers=bearer(pair.grantee), timeout=30).status_code
                outcomes.append((began, status))

    threads = [threading.Thread(target=decrypting) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    assert pair.client.delete(f"/keys/invoices/grants/{grant['id']}", headers=bearer(pair.owner)).status_code == 204
    revoked = time.monotonic()
    time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join()
    before = {status for began, status in outcomes if began < revoked}
    after = [status for began, status in outcomes if began > revoked]
    assert 200 in before and after and set(after) == {404}, (before, set(after))


def test_a_grant_ended_while_altered_cannot_be_put_back(pair, client, db):
    """A writer alters a live grant (refused on use), the owner revokes it, then the writer puts
    back the row as it was before the alteration, MAC and all: it is an older copy of an ended
    grant, refused and reported like any put back."""
    ciphertext = pair.sealed()
    grant = pair.grant()
    assert pair.decrypt(ciphertext).status_code == 200
    with db.cursor() as cur:
        cur.execute("SELECT operations, revision, row_mac FROM grants WHERE id = %s", (grant["id"],))
        operations, revision, row_mac = cur.fetchone()
    tamper(db, "UPDATE grants SET operations = %s WHERE id = %s", (["decrypt", "encrypt"], grant["id"]))
    assert client.delete(f"/keys/invoices/grants/{grant['id']}", headers=bearer(pair.owner)).status_code == 204
    tamper(db, "UPDATE grants SET revoked_at = NULL, operations = %s, revision = %s, row_mac = %s WHERE id = %s",
           (operations, revision, row_mac, grant["id"]))
    envelope(pair.decrypt(ciphertext), 404, "not_found")
    assert integrity_failures(db)[-1] == (f"grants:{grant['id']}", "rolled_back")
