"""Each operation on its own: `reencrypt` alone never moves a shared key's data where the grantee
could decrypt it, and a `contextSubset` is not promised where `fetch` hands the DEK over."""
import pytest

from tests.conftest import bearer, envelope
from tests.grants.test_grants import CONTEXT, Pair, b64


@pytest.fixture
def pair(auth, client):
    return Pair(auth, client)


def test_a_grant_for_reencrypt_alone_does_not_give_the_plaintext(pair, client):
    """With `reencrypt` alone the grantee re-encrypts the owner's ciphertext into a key of its own,
    then decrypts it there: `reencrypt` out of a shared key is `decrypt`. (AWS KMS allows it and
    warns; the contract here says each operation on its own.)"""
    pair.grant(operations=["reencrypt"])
    assert client.post("/keys/actions/generate", json={"keyReference": "mine"},
                       headers=bearer(pair.grantee)).status_code == 200
    ciphertext = pair.sealed()
    moved = client.post("/keys/billing:invoices/actions/reencrypt", headers=bearer(pair.grantee),
                        json={"ciphertext": ciphertext, "context": CONTEXT, "toKeyReference": "mine"})
    assert moved.status_code != 200, "reencrypt out of a shared key into the grantee's own key: " + moved.text
    envelope(moved, 404, "not_found")


def test_a_context_subset_is_not_given_with_fetch(pair, client):
    """`fetch` hands the grantee the DEK, with which it encrypts and decrypts under any context: a
    contextSubset on such a grant constrains nothing, so creating one is refused (400) rather than
    promising what cannot be kept."""
    body = pair.grant(operations=["fetch", "decrypt"], contextSubset=CONTEXT, status=400)
    assert body["error"] == "validation_failed" and "contextSubset" in body["fields"]
