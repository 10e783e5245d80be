"""A grant's end takes effect at once in every server process: `kms serve --workers 2`, each request
on a new connection (the kernel hands it to either worker), both workers having used the grant
(and kept the key) before it is revoked, or its owner disabled."""
import base64
import os
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.conftest import ADMIN_NAME, ADMIN_PASSWORD, ServerProcess, bearer, served_by_pid
from tests.serving.test_kek_order import generate, new_client


@pytest.fixture
def server(make_app, base_env, tmp_path):
    make_app()
    server = ServerProcess({**base_env, "AUDIT_SEAL_INTERVAL": "100"}, tmp_path, workers=2)
    yield server
    server.stop()


def decrypts(base: str, token: str, ciphertext: str, count: int) -> list[int]:
    def one(_):
        return requests.post(base + "/keys/gw-owner:shared/actions/decrypt", json={"ciphertext": ciphertext},
                             headers={**bearer(token), "Connection": "close"}, timeout=30).status_code

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(count)))


def test_revocation_and_disabling_reach_both_workers_at_once(server):
    base = server.base
    owner, grantee = new_client(base, "gw-owner"), new_client(base, "gw-grantee")
    generate(base, owner, "shared")
    plaintext = base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()
    ciphertext = requests.post(base + "/keys/shared/actions/encrypt", json={"plaintext": plaintext},
                               headers=bearer(owner), timeout=30).json()["ciphertext"]
    grant = requests.post(base + "/keys/shared/grants", json={"grantee": "gw-grantee", "operations": ["decrypt"]},
                          headers=bearer(owner), timeout=30).json()
    assert set(decrypts(base, grantee, ciphertext, 60)) == {200}
    by_pid = served_by_pid(server.metrics_dir(), "/keys/<ref>/actions/decrypt")
    assert len([pid for pid, served in by_pid.items() if served]) == 2, by_pid  # both workers used it
    assert requests.delete(f"{base}/keys/shared/grants/{grant['id']}", headers=bearer(owner),
                           timeout=30).status_code == 204
    assert set(decrypts(base, grantee, ciphertext, 60)) == {404}
    # granted again, then the owner disabled: refused everywhere; enabled: served again
    requests.post(base + "/keys/shared/grants", json={"grantee": "gw-grantee", "operations": ["decrypt"]},
                  headers=bearer(owner), timeout=30).raise_for_status()
    assert set(decrypts(base, grantee, ciphertext, 40)) == {200}
    admin = requests.post(base + "/auth/login", json={"clientname": ADMIN_NAME, "password": ADMIN_PASSWORD},
                          timeout=30).json()["token"]
    owner_id = next(c["id"] for c in requests.get(base + "/clients", headers=bearer(admin), timeout=30).json()["clients"]
                    if c["clientname"] == "gw-owner")
    requests.post(f"{base}/clients/{owner_id}/actions/disable", headers=bearer(admin), timeout=30).raise_for_status()
    assert set(decrypts(base, grantee, ciphertext, 40)) == {404}
    requests.post(f"{base}/clients/{owner_id}/actions/enable", headers=bearer(admin), timeout=30).raise_for_status()
    assert set(decrypts(base, grantee, ciphertext, 40)) == {200}
