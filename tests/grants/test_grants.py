"""Grants: one client shares a key with another for named operations, through the HTTP API
against a real PostgreSQL; every refusal performed, and the database writer's attacks made with SQL."""
import base64
import json
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from tests.conftest import bearer, envelope, tamper

CONTEXT = {"tenant": "acme"}


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Pair:
    """An owner (billing) with keys, and a grantee (reporting)."""

    def __init__(self, auth, client):
        self.auth, self.client = auth, client
        self.owner = auth.new_client("billing")
        self.grantee = auth.new_client("reporting")
        for ref, exportable in (("invoices", True), ("vault", False)):
            response = client.post("/keys/actions/generate", json={"keyReference": ref, "exportable": exportable},
                                   headers=bearer(self.owner))
            assert response.status_code == 200, response.text

    def grant(self, ref="invoices", grantee="reporting", status=201, **body):
        body = {"grantee": grantee, "operations": ["decrypt"], **body}
        response = self.client.post(f"/keys/{ref}/grants", json=body, headers=bearer(self.owner))
        assert response.status_code == status, response.text
        return response.json()

    def encrypt(self, token=None, ref="invoices", context=CONTEXT, plaintext=b"invoice 42"):
        return self.client.post(f"/keys/{ref}/actions/encrypt", json={"plaintext": b64(plaintext), "context": context},
                                headers=bearer(token or self.owner))

    def decrypt(self, ciphertext, token=None, ref="billing:invoices", context=CONTEXT):
        return self.client.post(f"/keys/{ref}/actions/decrypt", json={"ciphertext": ciphertext, "context": context},
                                headers=bearer(token or self.grantee))

    def sealed(self, **kwargs) -> str:
        response = self.encrypt(**kwargs)
        assert response.status_code == 200, response.text
        return response.json()["ciphertext"]


@pytest.fixture
def pair(auth, client):
    return Pair(auth, client)


def test_owner_encrypts_grantee_decrypts(pair):
    ciphertext = pair.sealed()
    envelope(pair.decrypt(ciphertext), 404, "not_found")  # no grant yet: as for no key at all
    grant = pair.grant()
    assert grant["grantee"] == "reporting" and grant["operations"] == ["decrypt"]
    response = pair.decrypt(ciphertext)
    assert response.status_code == 200, response.text
    assert unb64(response.json()["plaintext"]) == b"invoice 42"
    again = pair.decrypt(ciphertext)  # with the key kept in the process
    assert again.status_code == 200 and again.json() == response.json()


def test_a_grant_for_other_operations_is_a_404_like_no_key(pair, client):
    ciphertext = pair.sealed()
    pair.grant(operations=["encrypt"])
    missing = pair.decrypt(ciphertext, ref="billing:no-such-key")
    wrong_op = pair.decrypt(ciphertext)
    no_owner = pair.decrypt(ciphertext, ref="nobody-here:invoices")
    for response in (missing, wrong_op, no_owner):
        body = envelope(response, 404, "not_found")
        assert body["message"] == envelope(missing, 404)["message"]
    # encrypt is granted: the grantee encrypts under the owner's key, the owner decrypts
    sealed = pair.encrypt(token=pair.grantee, ref="billing:invoices")
    assert sealed.status_code == 200, sealed.text
    opened = client.post("/keys/invoices/actions/decrypt", json={"ciphertext": sealed.json()["ciphertext"],
                                                                 "context": CONTEXT}, headers=bearer(pair.owner))
    assert opened.status_code == 200 and unb64(opened.json()["plaintext"]) == b"invoice 42"
    # the DEK routes need `fetch`
    envelope(client.get("/keys/billing:invoices", headers=bearer(pair.grantee)), 404, "not_found")


def test_fetch_grants_the_dek_routes_of_exportable_keys_only(pair, client):
    pair.grant(operations=["fetch"])
    own = client.get("/keys/invoices", headers=bearer(pair.owner)).json()
    shared = client.get("/keys/billing:invoices", headers=bearer(pair.grantee))
    assert shared.status_code == 200, shared.text
    assert shared.json()["encryptWith"]["dek"] == own["encryptWith"]["dek"]
    assert client.get("/keys/billing:invoices/1", headers=bearer(pair.grantee)).status_code == 200
    envelope(client.get("/keys/billing:invoices/7", headers=bearer(pair.grantee)), 404, "not_found")
    body = pair.grant(ref="vault", operations=["fetch", "decrypt"], status=409)
    assert body["error"] == "not_exportable"


@pytest.mark.parametrize("method, path, body", [
    ("post", "/keys/billing:invoices/actions/rotate", None),
    ("post", "/keys/billing:invoices/actions/retire", {"belowVersion": 2}),
    ("delete", "/keys/billing:invoices/actions/delete", None),
    ("post", "/keys/billing:invoices/actions/restore", None),
    ("post", "/keys/billing:invoices/actions/set-rotation-period", {"rotationPeriod": None}),
    ("post", "/keys/billing:invoices/actions/set-exportable", {"exportable": False}),
    ("get", "/keys/billing:invoices/versions", None),
    ("get", "/keys/billing:invoices/grants", None),
    ("post", "/keys/billing:invoices/grants", {"grantee": "billing", "operations": ["decrypt"]}),
])
def test_a_grant_never_lets_the_grantee_manage_the_key(pair, client, method, path, body):
    pair.grant(operations=["fetch", "encrypt", "decrypt", "reencrypt", "generate-data-key"])
    kwargs = {"headers": bearer(pair.grantee)}
    if body is not None:
        kwargs["json"] = body
    envelope(getattr(client, method)(path, **kwargs), 404, "not_found")
    assert client.get("/keys/invoices", headers=bearer(pair.owner)).json()["encryptWith"]["version"] == 1


def test_context_subset_is_required_of_the_grantee(pair):
    pair.grant(contextSubset={"tenant": "acme"})
    ciphertext = pair.sealed(context={"tenant": "acme", "table": "invoices"})
    assert pair.decrypt(ciphertext, context={"tenant": "acme", "table": "invoices"}).status_code == 200
    other = pair.sealed(context={"tenant": "globex"})
    envelope(pair.decrypt(other, context={"tenant": "globex"}), 403, "context_not_granted")
    envelope(pair.decrypt(other, context={}), 403, "context_not_granted")
    batch = pair.client.post("/keys/billing:invoices/actions/decrypt", headers=bearer(pair.grantee), json={"items": [
        {"ciphertext": ciphertext, "context": {"tenant": "acme", "table": "invoices"}},
        {"ciphertext": other, "context": {"tenant": "globex"}}]})
    results = batch.json()["results"]
    assert "plaintext" in results[0] and results[1]["error"] == "context_not_granted"


def test_revocation_is_immediate_in_another_process(pair, client, another_app):
    ciphertext = pair.sealed()
    grant = pair.grant()
    from tests.conftest import HttpClient, serve_in_thread, stop_server
    server, base = serve_in_thread(another_app(), threads=2)
    try:
        with HttpClient(base) as other:
            first = other.post("/keys/billing:invoices/actions/decrypt", json={"ciphertext": ciphertext,
                                                                             "context": CONTEXT},
                               headers=bearer(pair.grantee))
            assert first.status_code == 200, first.text
            assert client.delete(f"/keys/invoices/grants/{grant['id']}", headers=bearer(pair.owner)).status_code == 204
            for _ in range(2):  # the key is kept in that process: the statement still refuses
                envelope(other.post("/keys/billing:invoices/actions/decrypt", json={"ciphertext": ciphertext,
                                                                                    "context": CONTEXT},
                                    headers=bearer(pair.grantee)), 404, "not_found")
    finally:
        stop_server(server)
    envelope(pair.decrypt(ciphertext), 404, "not_found")


def test_expired_grant_allows_nothing_and_its_end_is_recorded(pair, client, runner):
    ciphertext = pair.sealed()
    body = pair.grant(operations=["decrypt"], expiresAt="2001-01-01T00:00:00Z", status=400)
    assert "expiresAt" in body["fields"]
    soon = datetime.now(timezone.utc) + timedelta(seconds=2)
    grant = pair.grant(operations=["decrypt"], expiresAt=soon.isoformat())
    assert pair.decrypt(ciphertext).status_code == 200
    time.sleep(max(0.0, (soon - datetime.now(timezone.utc)).total_seconds()) + 0.2)
    envelope(pair.decrypt(ciphertext), 404, "not_found")
    result = runner.invoke(args=["kms", "keys", "rotate-due"])
    assert result.exit_code == 0 and "ended 1 expired grants" in result.output, result.output
    uses = client.get(f"/keys/invoices/grants/{grant['id']}/uses", headers=bearer(pair.owner)).json()["uses"]
    assert uses[-1]["action"] == "grant.expire"
    pair.grant()  # the grantee may be granted again


def test_owner_retire_delete_and_disable_take_effect_at_once(pair, client, auth):
    ciphertext = pair.sealed()
    pair.grant(operations=["decrypt", "fetch"])
    assert pair.decrypt(ciphertext).status_code == 200
    owner_id = auth.client_id("billing")
    assert client.post(f"/clients/{owner_id}/actions/disable", headers=bearer(auth.admin_token)).status_code == 204
    envelope(pair.decrypt(ciphertext), 404, "not_found")
    envelope(client.get("/keys/billing:invoices", headers=bearer(pair.grantee)), 404, "not_found")
    assert client.post(f"/clients/{owner_id}/actions/enable", headers=bearer(auth.admin_token)).status_code == 204
    owner = auth.login("billing", pair_password())
    assert pair.decrypt(ciphertext).status_code == 200
    assert client.post("/keys/invoices/actions/rotate", headers=bearer(owner)).status_code == 200
    assert client.post("/keys/invoices/actions/retire", json={"belowVersion": 2},
                       headers=bearer(owner)).status_code == 200
    envelope(pair.decrypt(ciphertext), 410, "version_retired")
    assert client.delete("/keys/invoices/actions/delete", headers=bearer(owner)).status_code == 204
    envelope(client.get("/keys/billing:invoices", headers=bearer(pair.grantee)), 404, "not_found")


def pair_password():
    from tests.conftest import CLIENT_PASSWORD
    return CLIENT_PASSWORD


def test_grantee_disabled_or_deleted(pair, client, auth):
    ciphertext = pair.sealed()
    pair.grant()
    grantee_id = auth.client_id("reporting")
    assert client.post(f"/clients/{grantee_id}/actions/disable", headers=bearer(auth.admin_token)).status_code == 204
    envelope(pair.decrypt(ciphertext), 401)
    assert client.post(f"/clients/{grantee_id}/actions/enable", headers=bearer(auth.admin_token)).status_code == 204
    token = auth.login("reporting", pair_password())
    assert pair.decrypt(ciphertext, token=token).status_code == 200
    assert client.delete(f"/clients/{grantee_id}", headers=bearer(auth.admin_token)).status_code == 204
    assert client.get("/keys/invoices/grants", headers=bearer(pair.owner)).json() == {"grants": []}
    # a new client under the old name inherits nothing
    again = auth.new_client("reporting")
    envelope(pair.decrypt(ciphertext, token=again), 404, "not_found")


def test_listings_and_uses(pair, client, auth):
    ciphertext = pair.sealed()
    grant = pair.grant(operations=["decrypt", "encrypt"], contextSubset=CONTEXT)
    listed = client.get("/keys/invoices/grants", headers=bearer(pair.owner)).json()["grants"]
    assert [g["id"] for g in listed] == [grant["id"]] and listed[0]["contextSubset"] == CONTEXT
    mine = client.get("/grants", headers=bearer(pair.grantee)).json()["grants"]
    assert mine[0]["owner"] == "billing" and mine[0]["keyReference"] == "invoices"
    assert client.get("/grants", headers=bearer(pair.owner)).json() == {"grants": []}
    owner_id = auth.client_id("billing")
    assert len(client.get(f"/clients/{owner_id}/grants", headers=bearer(auth.admin_token)).json()["grants"]) == 1
    envelope(client.get(f"/clients/{owner_id}/grants", headers=bearer(pair.owner)), 403)
    envelope(client.get(f"/clients/{uuid.uuid4()}/grants", headers=bearer(auth.admin_token)), 404, "not_found")
    assert pair.decrypt(ciphertext).status_code == 200
    assert pair.decrypt(ciphertext).status_code == 200
    uses = client.get(f"/keys/invoices/grants/{grant['id']}/uses", headers=bearer(pair.owner)).json()["uses"]
    assert [use["action"] for use in uses] == ["grant.create", "key.decrypt", "key.decrypt"]
    assert json.loads(uses[1]["detail"])["grant"] == grant["id"]
    # the grantee cannot read them, nor another client
    envelope(client.get(f"/keys/billing:invoices/grants/{grant['id']}/uses", headers=bearer(pair.grantee)), 404)
    # an admin revokes it, naming the key {owner}:{ref}
    envelope(client.delete(f"/keys/invoices/grants/{grant['id']}", headers=bearer(auth.admin_token)), 404)
    assert client.delete(f"/keys/billing:invoices/grants/{grant['id']}",
                         headers=bearer(auth.admin_token)).status_code == 204
    envelope(pair.decrypt(ciphertext), 404, "not_found")
    again = pair.grant(operations=["decrypt"])  # the owner revokes naming its key in full, too
    envelope(client.delete(f"/keys/billing:invoices/grants/{again['id']}", headers=bearer(pair.grantee)), 404)
    assert client.delete(f"/keys/billing:invoices/grants/{again['id']}", headers=bearer(pair.owner)).status_code == 204
    actions = [u["action"] for u in client.get(f"/keys/invoices/grants/{grant['id']}/uses",
                                               headers=bearer(pair.owner)).json()["uses"]]
    assert actions[-1] == "grant.revoke"


def test_grant_refusals_at_creation(pair, client):
    assert pair.grant(grantee="nobody-at-all", status=404)["error"] == "no_such_client"
    assert pair.grant(grantee="billing", status=400)["error"] == "validation_failed"
    assert pair.grant(operations=["rotate"], status=400)["error"] == "validation_failed"
    assert pair.grant(operations=[], status=400)["error"] == "validation_failed"
    assert pair.grant(grantee="*", status=400)["error"] == "validation_failed"
    pair.grant()
    assert pair.grant(status=409)["error"] == "grant_exists"
    envelope(client.post("/keys/missing/grants", json={"grantee": "reporting", "operations": ["decrypt"]},
                         headers=bearer(pair.owner)), 404)


def test_reencrypt_into_a_key_shared_for_encrypt(pair, client, auth):
    """reporting re-encrypts its own ciphertext into billing's key (granted encrypt), which billing decrypts."""
    assert client.post("/keys/actions/generate", json={"keyReference": "mine"},
                       headers=bearer(pair.grantee)).status_code == 200
    own = client.post("/keys/mine/actions/encrypt", json={"plaintext": b64(b"moved"), "context": CONTEXT},
                      headers=bearer(pair.grantee)).json()["ciphertext"]
    moved = client.post("/keys/mine/actions/reencrypt", json={"ciphertext": own, "context": CONTEXT,
                                                              "toKeyReference": "billing:invoices"},
                        headers=bearer(pair.grantee))
    envelope(moved, 404, "not_found")
    pair.grant(operations=["encrypt"])
    moved = client.post("/keys/mine/actions/reencrypt", json={"ciphertext": own, "context": CONTEXT,
                                                              "toKeyReference": "billing:invoices"},
                        headers=bearer(pair.grantee))
    assert moved.status_code == 200, moved.text
    opened = client.post("/keys/invoices/actions/decrypt", json={"ciphertext": moved.json()["ciphertext"],
                                                                 "context": CONTEXT}, headers=bearer(pair.owner))
    assert unb64(opened.json()["plaintext"]) == b"moved"


def test_the_command_line_lists_and_revokes_grants(pair, runner):
    ciphertext = pair.sealed()
    grant = pair.grant(operations=["decrypt", "encrypt"])
    listed = runner.invoke(args=["kms", "clients", "grants", "billing"])
    assert listed.exit_code == 0, listed.output
    assert grant["id"] in listed.output and "billing:invoices" in listed.output and "decrypt,encrypt" in listed.output
    as_json = runner.invoke(args=["kms", "clients", "grants", "reporting", "--json"])
    assert json.loads(as_json.output.splitlines()[0])["id"] == grant["id"]
    revoked = runner.invoke(args=["kms", "grants", "revoke", grant["id"]])
    assert revoked.exit_code == 0 and "revoked grant" in revoked.output, revoked.output
    envelope(pair.decrypt(ciphertext), 404, "not_found")
    again = runner.invoke(args=["kms", "grants", "revoke", grant["id"]])
    assert again.exit_code != 0 and "Traceback" not in again.output and "No such grant" in again.output
    assert runner.invoke(args=["kms", "clients", "grants", "nobody-here"]).exit_code != 0


@pytest.mark.parametrize("raw", [
    b'{"grantee": "reporting", "operations": ["decrypt"], "contextSubset": ' + b'[' * 1000 + b']' * 1000 + b'}',
    b'{"grantee": "reporting", "operations": ["decrypt"], "expiresAt": ' + b'9' * 5000 + b'}',
    b'{"grantee": "\\ud800", "operations": ["decrypt"]}',
    b'{"grantee": "reporting", "operations": ["\\ud800"], "contextSubset": {"\\ud800": "x"}}',
    b'{"grantee": ["reporting"], "operations": "decrypt", "contextSubset": "x"}',
    b'{"grantee": "reporting", "operations": ["decrypt"], "pad": "' + b'x' * (2 * 1024 * 1024) + b'"}',
])
def test_hostile_grant_bodies_are_a_4xx_envelope(pair, client, raw):
    response = client.post("/keys/invoices/grants", data=raw,
                           headers={**bearer(pair.owner), "Content-Type": "application/json"})
    assert 400 <= response.status_code < 500, response.text
    envelope(response, response.status_code)
