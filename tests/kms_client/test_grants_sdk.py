"""Sharing a key through the SDK and `kms-client`: the owner grants, lists, reads uses and revokes;
the grantee lists what it was granted and uses the key as OWNER:REF, through the server and (with
`fetch`) locally."""
import json

import pytest

from kms_client import Client, KmsError
from tests.conftest import CLIENT_PASSWORD
from tests.kms_client.test_command_line import run_cli


@pytest.fixture
def owner(live_server, auth):
    kms = Client(base_url=live_server, clientname="billing-sdk")
    kms.signup(auth.signup_token("billing-sdk"), CLIENT_PASSWORD)
    kms.generate_key("ledger")
    return kms


@pytest.fixture
def grantee(live_server, auth):
    kms = Client(base_url=live_server, clientname="reports-sdk")
    kms.signup(auth.signup_token("reports-sdk"), CLIENT_PASSWORD)
    return kms


def test_one_service_encrypts_the_other_decrypts(owner, grantee):
    blob = owner.encrypt("ledger", b"entry 7", {"tenant": "acme"})
    with pytest.raises(KmsError) as refused:
        grantee.decrypt("billing-sdk:ledger", blob, {"tenant": "acme"})
    assert refused.value.status == 404
    grant = owner.grant("ledger", "reports-sdk", ["decrypt"], context_subset={"tenant": "acme"})
    assert [g["id"] for g in owner.list_grants("ledger")] == [grant["id"]]
    mine = grantee.list_grants()
    assert (mine[0]["owner"], mine[0]["keyReference"]) == ("billing-sdk", "ledger")
    assert grantee.decrypt("billing-sdk:ledger", blob, {"tenant": "acme"}) == b"entry 7"
    local = owner.encrypt("ledger", b"entry 8", {"tenant": "acme"}, local=True)  # the owner's own DEK, here
    assert grantee.decrypt("billing-sdk:ledger", local, {"tenant": "acme"}) == b"entry 8"  # the same format
    with pytest.raises(KmsError) as outside:
        grantee.decrypt("billing-sdk:ledger", owner.encrypt("ledger", b"x", {"tenant": "globex"}), {"tenant": "globex"})
    assert outside.value.status == 403 and outside.value.code == "context_not_granted"
    uses = owner.grant_uses("ledger", grant["id"])
    assert uses[0]["action"] == "grant.create" and "key.decrypt" in [use["action"] for use in uses]
    owner.revoke_grant("ledger", grant["id"])
    assert owner.list_grants("ledger") == [] and grantee.list_grants() == []
    with pytest.raises(KmsError) as revoked:
        grantee.decrypt("billing-sdk:ledger", blob, {"tenant": "acme"})
    assert revoked.value.status == 404
    fetch = owner.grant("ledger", "reports-sdk", ["fetch"])  # the DEK itself: decrypted here, under any context
    assert grantee.decrypt("billing-sdk:ledger", local, {"tenant": "acme"}, local=True) == b"entry 8"
    owner.revoke_grant("ledger", fetch["id"])


def test_kms_client_grants_and_the_grantee_uses_it(live_server, owner, grantee):
    def ok(user, *args, stdin=b""):
        result = run_cli(live_server, *args, stdin=stdin, user=user)
        assert result.returncode == 0, (args, result.stderr)
        return result

    granted = ok("billing-sdk", "grant", "ledger", "--to", "reports-sdk", "--operation", "encrypt",
                 "--operation", "decrypt", "--expires", "1h")
    grant = json.loads(granted.stdout)
    assert grant["operations"] == ["decrypt", "encrypt"] and grant["expiresAt"]
    assert b"billing-sdk:ledger" in granted.stderr
    assert [g["id"] for g in json.loads(ok("billing-sdk", "grants", "ledger").stdout)] == [grant["id"]]
    assert json.loads(ok("reports-sdk", "grants").stdout)[0]["keyReference"] == "ledger"
    sealed = ok("reports-sdk", "encrypt", "billing-sdk:ledger", "--lines", stdin=b"c2VjcmV0\n").stdout
    assert ok("billing-sdk", "decrypt", "ledger", "--lines", stdin=sealed).stdout == b"c2VjcmV0\n"
    assert "grant.create" in ok("billing-sdk", "grant-uses", "ledger", grant["id"]).stdout.decode()
    revoked = ok("billing-sdk", "revoke-grant", "ledger", grant["id"])
    assert revoked.stderr.startswith(b"revoked grant ")
    refused = run_cli(live_server, "encrypt", "billing-sdk:ledger", "--lines", stdin=b"c2VjcmV0\n", user="reports-sdk")
    assert refused.returncode == 1
