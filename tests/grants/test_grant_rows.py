"""A database writer gains nothing with grant rows: a grant invented, widened, re-pointed to another
key or grantee, or put back after its revocation by SQL is refused on use (404, as no grant) and
reported, in the process that revoked it and in another that learned it from the audit trail."""
import uuid

import pytest

from kms.audit.freshness import catch_up
from tests.conftest import bearer, envelope, tamper
from tests.grants.test_grants import CONTEXT, Pair

GRANT_COLUMNS = "id, key_id, grantee_id, operations, expires_at, context_subset, revoked_at, revision, row_mac"


@pytest.fixture
def pair(auth, client):
    return Pair(auth, client)


def grant_row(db, grant_id) -> tuple:
    with db.cursor() as cur:
        cur.execute(f"SELECT {GRANT_COLUMNS} FROM grants WHERE id = %s", (grant_id,))
        return cur.fetchone()


def integrity_failures(db) -> list:
    with db.cursor() as cur:
        cur.execute("SELECT target, outcome FROM audit_events WHERE action = 'integrity.failure' ORDER BY seq")
        return cur.fetchall()


def key_id(db, ref_owner: str) -> int:
    with db.cursor() as cur:
        cur.execute("SELECT k.id FROM keys k JOIN grants g ON g.key_id = k.id LIMIT 1")
        return cur.fetchone()[0]


def test_a_grant_invented_in_the_database_allows_nothing(pair, db):
    ciphertext = pair.sealed()
    # a real grant of "vault" gives the writer a MAC'd row to copy, and the ids
    real = pair.grant(ref="vault", operations=["decrypt"])
    row = grant_row(db, real["id"])
    with db.cursor() as cur:
        cur.execute("SELECT id FROM keys WHERE id <> %s ORDER BY id LIMIT 1", (row[1],))
        invoices = cur.fetchone()[0]
    # invented: a fresh row with a made-up MAC
    tamper(db, "INSERT INTO grants (id, key_id, grantee_id, operations, revision, row_mac) "
               "VALUES (%s, %s, %s, %s, 1, %s)", (str(uuid.uuid4()), invoices, row[2], ["decrypt"], b"\x01" * 33))
    envelope(pair.decrypt(ciphertext), 404, "not_found")
    assert integrity_failures(db)[-1][0].startswith("grants:")


def test_a_grant_widened_or_re_pointed_in_the_database_is_refused(pair, client, db):
    ciphertext = pair.sealed()
    grant = pair.grant(operations=["encrypt"])
    # widened: decrypt added to a grant for encrypt
    tamper(db, "UPDATE grants SET operations = %s WHERE id = %s", (["decrypt", "encrypt"], grant["id"]))
    envelope(pair.decrypt(ciphertext), 404, "not_found")
    tamper(db, "UPDATE grants SET operations = %s, context_subset = NULL WHERE id = %s", (["encrypt"], grant["id"]))
    # re-pointed: the vault key's grant moved onto invoices
    vault = pair.grant(ref="vault", operations=["decrypt"])
    invoices_key = grant_row(db, grant["id"])[1]
    assert client.delete(f"/keys/invoices/grants/{grant['id']}", headers=bearer(pair.owner)).status_code == 204
    tamper(db, "UPDATE grants SET key_id = %s WHERE id = %s", (invoices_key, vault["id"]))
    envelope(pair.decrypt(ciphertext), 404, "not_found")
    # a grantee swapped in: the owner's own grant row re-pointed at a third client
    failures = integrity_failures(db)
    assert len(failures) >= 2 and all(target.startswith("grants:") for target, _ in failures)


def test_a_grant_put_back_after_revocation_is_refused_here_and_in_another_process(pair, client, db, another_app):
    ciphertext = pair.sealed()
    grant = pair.grant()
    assert pair.decrypt(ciphertext).status_code == 200
    live = grant_row(db, grant["id"])
    assert client.delete(f"/keys/invoices/grants/{grant['id']}", headers=bearer(pair.owner)).status_code == 204
    envelope(pair.decrypt(ciphertext), 404, "not_found")
    # put back: the live row, MAC and all, as it was before the revocation
    tamper(db, "UPDATE grants SET revoked_at = NULL, revision = %s, row_mac = %s WHERE id = %s",
           (live[7], live[8], grant["id"]))
    envelope(pair.decrypt(ciphertext), 404, "not_found")
    assert integrity_failures(db)[-1] == (f"grants:{grant['id']}", "rolled_back")
    # a process that did not revoke it learns the revocation from the audit trail
    other = another_app()
    kms = other.extensions["kms"]
    with kms.pool.connection() as conn:
        catch_up(kms, conn)
    assert kms.revisions.newest("grants", grant["id"]) == live[7] + 1
    answer = other.test_client().post("/keys/billing:invoices/actions/decrypt", headers=bearer(pair.grantee),
                                      json={"ciphertext": ciphertext, "context": CONTEXT})
    assert answer.status_code == 404 and answer.json["error"] == "not_found"
    # the look-up path refuses it too
    tamper(db, "UPDATE grants SET operations = %s WHERE id = %s", (["decrypt"], grant["id"]))
    envelope(client.get("/keys/billing:invoices", headers=bearer(pair.grantee)), 404, "not_found")
