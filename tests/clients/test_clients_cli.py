"""`kms clients ...` and `kms keys list` from the KMS host: the same services as the admin routes,
host access as the authority, each change audited with the actor `cli`."""
import json
import subprocess

from tests.conftest import ADMIN_NAME, CLIENT_PASSWORD, KMS_COMMAND as KMS, bare_env, bearer


def kms(base_env, *args, stdin=None):
    return subprocess.run([KMS, *args], env=bare_env(**base_env), cwd="/", capture_output=True, text=True,
                          timeout=60, input=stdin, start_new_session=True)


def audited(db, action: str) -> list[tuple[str, str]]:
    with db.cursor() as cur:
        cur.execute("SELECT actor, target FROM audit_events WHERE action = %s", (action,))
        return cur.fetchall()


def test_an_admin_manages_clients_from_the_host(base_env, client, auth, db):
    token = auth.new_client("billing-svc")
    billing = auth.client_id("billing-svc")
    listed = kms(base_env, "clients", "list")
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["ID", "NAME", "ROLE", "STATUS", "CREATED", "LAST", "LOGIN"]
    assert {row.split()[1] for row in rows} == {ADMIN_NAME, "billing-svc"}
    as_json = [json.loads(line) for line in kms(base_env, "clients", "list", "--json").stdout.splitlines()]
    assert {entry["clientname"]: entry["id"] for entry in as_json}["billing-svc"] == billing
    assert "argon2" not in listed.stdout

    disabled = kms(base_env, "clients", "disable", "billing-svc")
    assert disabled.returncode == 0 and disabled.stdout == "disabled billing-svc; its tokens no longer work\n"
    assert client.get("/keys", headers=bearer(token)).status_code == 401  # at once
    assert client.post("/auth/login", json={"clientname": "billing-svc", "password": CLIENT_PASSWORD}).status_code != 200
    enabled = kms(base_env, "clients", "enable", billing)  # by id, as `clients list` shows it
    assert enabled.returncode == 0 and enabled.stdout == f"enabled {billing}\n"
    token = auth.login("billing-svc", CLIENT_PASSWORD)
    assert client.post("/keys/actions/generate", json={"keyReference": "ledger"}, headers=bearer(token)).status_code == 200

    promoted = kms(base_env, "clients", "role", "billing-svc", "admin")
    assert promoted.returncode == 0 and promoted.stdout == "billing-svc is now admin\n"
    assert client.get("/clients", headers=bearer(auth.login("billing-svc", CLIENT_PASSWORD))).status_code == 200
    assert kms(base_env, "clients", "role", "billing-svc", "client").returncode == 0

    keys = kms(base_env, "keys", "list", "billing-svc")
    assert keys.returncode == 0, keys.stderr
    assert keys.stdout.splitlines()[1].split()[:4] == ["billing-svc", "ledger", "1", "enabled"]
    everyone = [json.loads(line) for line in kms(base_env, "keys", "list", "--json").stdout.splitlines()]
    assert [(key["client"], key["keyReference"]) for key in everyone] == [("billing-svc", "ledger")]
    assert "dek" not in keys.stdout

    wrong = {"clientname": "billing-svc", "password": "Wrong-passw0rd!"}
    for _ in range(5):
        client.post("/auth/login", json=wrong, headers={"Connection": "close"})
    assert client.post("/auth/login", json=wrong, headers={"Connection": "close"}).status_code == 429
    unlocked = kms(base_env, "clients", "unlock", "billing-svc")
    assert unlocked.returncode == 0 and unlocked.stdout == "unlocked billing-svc\n"
    assert client.post("/auth/login", json={"clientname": "billing-svc", "password": CLIENT_PASSWORD}).status_code == 200

    unconfirmed = kms(base_env, "clients", "delete", "billing-svc")  # no terminal to confirm on
    assert unconfirmed.returncode == 2 and "add --yes" in unconfirmed.stderr
    deleted = kms(base_env, "clients", "delete", "billing-svc", "--yes")
    assert deleted.returncode == 0
    assert deleted.stdout == f"deleted billing-svc ({billing}); its keys are scheduled for deletion\n"
    with db.cursor() as cur:  # its keys go with it
        cur.execute("SELECT count(*) FROM keys WHERE client_id = %s AND destroy_after IS NOT NULL", (billing,))
        assert cur.fetchone()[0] == 1
    assert billing not in kms(base_env, "clients", "list").stdout
    assert client.post("/auth/login", json={"clientname": "billing-svc", "password": CLIENT_PASSWORD}).status_code == 401
    again = kms(base_env, "clients", "delete", "billing-svc", "--yes")
    assert again.returncode == 1 and again.stderr == "no client named billing-svc (see `kms clients list`)\n"

    for action in ("client.disable", "client.enable", "client.role_change", "client.unlock", "client.delete"):
        assert ("cli", billing) in audited(db, action), action


def test_the_last_admin_is_kept_from_the_host_too(base_env, app):
    for args in (["clients", "disable", ADMIN_NAME], ["clients", "role", ADMIN_NAME, "client"],
                 ["clients", "delete", ADMIN_NAME, "--yes"]):
        refused = kms(base_env, *args)
        assert refused.returncode == 1, (args, refused.stderr)
        assert refused.stderr == "This is the last active admin; promote another client first.\n"
