"""Client management by admins."""
import uuid

import pytest

from tests.conftest import ADMIN_NAME, CLIENT_PASSWORD, bearer


def test_list_clients_shows_no_hashes(client, auth):
    auth.new_client("billing")
    response = client.get("/clients", headers=bearer(auth.admin_token))
    assert response.status_code == 200
    clients = response.json()["clients"]
    assert {c["clientname"] for c in clients} == {ADMIN_NAME, "billing"}
    for entry in clients:
        assert set(entry) == {"id", "clientname", "role", "status", "createdAt", "lastLoginAt"}
    assert "argon2" not in response.text


def test_clients_routes_are_admin_only(client, auth):
    token = auth.new_client()
    assert client.get("/clients", headers=bearer(token)).status_code == 403
    assert client.get("/clients").status_code == 401


def test_promoted_client_logs_in_again_as_admin(client, auth):
    auth.new_client("ops-svc")
    client_id = auth.client_id("ops-svc")
    assert client.post(f"/clients/{client_id}/role", json={"role": "admin"},
                       headers=bearer(auth.admin_token)).status_code == 204
    token = auth.login("ops-svc", CLIENT_PASSWORD)
    assert client.get("/clients", headers=bearer(token)).status_code == 200


def test_bad_role_is_400(client, auth):
    auth.new_client("ops-svc")
    response = client.post(f"/clients/{auth.client_id('ops-svc')}/role", json={"role": "root"},
                           headers=bearer(auth.admin_token))
    assert response.status_code == 400 and "role" in response.json()["fields"]


def test_disabled_client_cannot_log_in_until_enabled(client, auth):
    auth.new_client("ops-svc")
    client_id = auth.client_id("ops-svc")
    client.post(f"/clients/{client_id}/actions/disable", headers=bearer(auth.admin_token))
    assert client.post("/auth/login", json={"clientname": "ops-svc", "password": CLIENT_PASSWORD}).status_code == 401
    client.post(f"/clients/{client_id}/actions/enable", headers=bearer(auth.admin_token))
    assert client.post("/auth/login", json={"clientname": "ops-svc", "password": CLIENT_PASSWORD}).status_code == 200


@pytest.mark.parametrize("method,suffix,body", [
    ("post", "/role", {"role": "client"}), ("post", "/actions/disable", None), ("post", "/actions/enable", None),
    ("delete", "", None)])
def test_unknown_client_is_404(client, auth, method, suffix, body):
    response = getattr(client, method)(f"/clients/{uuid.uuid4()}{suffix}", json=body, headers=bearer(auth.admin_token))
    assert response.status_code == 404


def test_malformed_client_id_is_400(client, auth):
    assert client.delete("/clients/not-a-uuid", headers=bearer(auth.admin_token)).status_code == 400


@pytest.mark.parametrize("method,suffix,body", [
    ("post", "/role", {"role": "client"}), ("post", "/actions/disable", None), ("delete", "", None)])
def test_last_active_admin_cannot_be_removed(client, auth, method, suffix, body):
    admin_id = auth.client_id(ADMIN_NAME)
    response = getattr(client, method)(f"/clients/{admin_id}{suffix}", json=body, headers=bearer(auth.admin_token))
    assert response.status_code == 409 and response.json()["error"] == "last_admin"


def test_an_admin_can_step_down_once_another_admin_exists(client, auth):
    auth.new_client("second-admin")
    second = auth.client_id("second-admin")
    client.post(f"/clients/{second}/role", json={"role": "admin"}, headers=bearer(auth.admin_token))
    first = auth.client_id(ADMIN_NAME)
    assert client.post(f"/clients/{first}/role", json={"role": "client"},
                       headers=bearer(auth.admin_token)).status_code == 204
    second_token = auth.login("second-admin", CLIENT_PASSWORD)
    response = client.post(f"/clients/{second}/role", json={"role": "client"}, headers=bearer(second_token))
    assert response.status_code == 409


def test_deleted_client_name_can_be_registered_again_and_its_keys_are_scheduled_for_deletion(client, auth, db):
    token = auth.new_client("old-svc")
    client.post("/keys/actions/generate", json={"keyReference": "k"}, headers=bearer(token))
    client_id = auth.client_id("old-svc")
    assert client.delete(f"/clients/{client_id}", headers=bearer(auth.admin_token)).status_code == 204
    assert "old-svc" not in {c["clientname"] for c in client.get("/clients", headers=bearer(auth.admin_token)).json()["clients"]}
    with db.cursor() as cur:
        cur.execute("SELECT destroy_after IS NOT NULL FROM keys")
        assert cur.fetchone()[0] is True
    new_token = auth.new_client("old-svc")
    assert client.get("/keys", headers=bearer(new_token)).json() == {"keys": []}


def test_swapped_client_name_ciphertext_fails_instead_of_renaming(client, auth, db):
    auth.new_client("svc-one")
    auth.new_client("svc-two")
    with db.cursor() as cur:
        cur.execute("""UPDATE clients a SET name_enc = b.name_enc FROM clients b
                       WHERE a.role = 'client' AND b.role = 'client' AND a.id <> b.id""")
    response = client.get("/clients", headers=bearer(auth.admin_token))
    assert response.status_code == 500 and response.json()["error"] == "integrity_error"
