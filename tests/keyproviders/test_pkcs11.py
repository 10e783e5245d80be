"""KEKs that never leave an HSM: the PKCS#11 provider against SoftHSM2 (Debian package `softhsm2`),
with a throwaway token in a temporary directory. Skipped on a machine without it, except under
CI=true, where a skip is a failure."""
import glob
import os
import shutil
import subprocess

import pytest

from kms.config import ConfigError
from tests.conftest import (ROOT, AuthActions, HttpClient, ServerProcess, bearer, serve_in_thread, served_by_pid,
                            stop_server)

PIN = "4711-test-pin"
TOKEN = "kms-test"
MODULE_PATHS = ["/usr/lib/softhsm/libsofthsm2.so", *glob.glob("/usr/lib/*/softhsm/libsofthsm2.so"),
                "/usr/local/lib/softhsm/libsofthsm2.so"]


def _module():
    return next((path for path in MODULE_PATHS if os.path.exists(path)), None)


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory):
    module = _module()
    if module is None or not shutil.which("softhsm2-util"):
        if os.environ.get("CI") == "true":
            pytest.fail("SoftHSM2 is missing under CI=true: .ci/run installs the Debian package softhsm2")
        pytest.skip("needs SoftHSM2: apt-get install softhsm2")
    directory = tmp_path_factory.mktemp("softhsm")
    (directory / "tokens").mkdir()
    conf = directory / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {directory / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)  # read when the library initialises, in this process
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", TOKEN, "--pin", PIN, "--so-pin", "0000"],
                   check=True, capture_output=True)
    return {"module": module, "tokens": directory / "tokens"}


@pytest.fixture
def hsm_env(softhsm):
    return {"PKCS11_MODULE": softhsm["module"], "PKCS11_PIN": PIN}


def uri(label: str) -> str:
    return f"pkcs11:token={TOKEN};object={label}"


def generate_kek(make_app, hsm_env, label: str) -> str:
    result = make_app(**hsm_env).test_cli_runner().invoke(args=["kms", "kek", "generate", "--pkcs11", uri(label)])
    assert result.exit_code == 0, result.output
    return uri(label)


def serve(app, action):
    server, base_url = serve_in_thread(app, threads=4)
    try:
        with HttpClient(base_url) as http:
            return action(http)
    finally:
        stop_server(server)


def test_a_full_workflow_with_an_hsm_kek(make_app, hsm_env, db):
    kek = generate_kek(make_app, hsm_env, "kek-full")
    app = make_app(**hsm_env, KEK_2=kek)  # active: the highest version

    def workflow(http):
        token = AuthActions(http).new_client()
        first = http.post("/keys/actions/generate", json={"keyReference": "k"}, headers=bearer(token)).json()
        second = http.post("/keys/k/actions/rotate", headers=bearer(token)).json()
        bundle = http.get("/keys/k/1", headers=bearer(token)).json()
        assert bundle["decryptWith"]["dek"] == first["dek"] and bundle["encryptWith"]["dek"] == second["dek"]

    serve(app, workflow)
    with db.cursor() as cur:
        cur.execute("SELECT DISTINCT kek_version FROM key_versions")
        assert cur.fetchall() == [(2,)]
    status = app.test_cli_runner().invoke(args=["kms", "kek", "status"]).output
    assert f"KEK version 2 (active): 2 wrapped DEK versions [pkcs11 {kek}]" in status
    assert "KEK version 1: 0 wrapped DEK versions [environment]" in status


def test_generate_refuses_to_overwrite_an_existing_key(make_app, hsm_env):
    generate_kek(make_app, hsm_env, "kek-once")
    again = make_app(**hsm_env).test_cli_runner().invoke(args=["kms", "kek", "generate", "--pkcs11", uri("kek-once")])
    assert again.exit_code == 1 and "already holds" in again.output


def test_moving_a_running_kms_from_an_environment_kek_to_the_hsm(make_app, hsm_env, base_env):
    """README's steps: generate in the token, add KEK_2=URI, restart, rewrap while look-ups go on,
    then leave KEK (version 1) out."""
    env_only = make_app()

    def make_keys(http):
        token = AuthActions(http).new_client("moving-svc")
        return token, [http.post("/keys/actions/generate", json={"keyReference": f"k{i}"},
                                 headers=bearer(token)).json()["dek"] for i in range(5)]

    _, deks = serve(env_only, make_keys)
    kek = generate_kek(make_app, hsm_env, "kek-move")
    mixed = make_app(**hsm_env, KEK_2=kek)

    def rewrap_while_looking_up(http):  # online: look-ups go on, and are served, during the rewrap
        import threading
        token = AuthActions(http).login("moving-svc", "Client-passw0rd!")
        statuses, done = [], threading.Event()

        def look_up():
            while not done.is_set():
                statuses.append(http.get("/keys/k0", headers=bearer(token)).status_code)
        looker = threading.Thread(target=look_up)
        looker.start()
        try:
            return mixed.test_cli_runner().invoke(args=["kms", "kek", "rewrap"]), statuses
        finally:
            done.set()
            looker.join()

    result, statuses = serve(mixed, rewrap_while_looking_up)
    assert result.exit_code == 0 and "re-wrapped 5 DEK versions under KEK version 2" in result.output
    assert statuses and set(statuses) == {200}
    hsm_only = make_app(**hsm_env, KEK="", KEK_2=kek)
    assert hsm_only.extensions["kms"].keyring.kek_versions == [2]

    def read_keys(http):
        token = AuthActions(http).login("moving-svc", "Client-passw0rd!")
        return [http.get(f"/keys/k{i}", headers=bearer(token)).json()["encryptWith"]["dek"] for i in range(5)]

    assert serve(hsm_only, read_keys) == deks


def test_a_wrong_pin_is_one_line_naming_the_setting_never_the_pin(make_app, hsm_env, base_env):
    """In a process of its own: this one is logged in to the token already."""
    import sys
    kek = generate_kek(make_app, hsm_env, "kek-pin")
    env = {**os.environ, **base_env, **hsm_env, "KEK_2": kek, "PKCS11_PIN": "0000-wrong-pin"}
    result = subprocess.run([sys.executable, "app.py"], env=env, capture_output=True, text=True, timeout=60,
                            cwd=ROOT)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == "configuration error: PKCS11_PIN: was refused by the token"
    assert "0000-wrong-pin" not in result.stderr + result.stdout and "Traceback" not in result.stderr


def test_a_missing_key_stops_start_up_naming_the_kek(make_app, hsm_env):
    with pytest.raises(ConfigError) as error:
        make_app(**hsm_env, KEK_2=uri("no-such-kek"))
    assert error.value.variable == "KEK_2" and "no AES secret key" in str(error.value)


def test_an_extractable_key_is_refused(make_app, hsm_env, softhsm):
    from types import SimpleNamespace

    from kms.keyproviders.opening import load_module
    module = load_module(SimpleNamespace(pkcs11_module=hsm_env["PKCS11_MODULE"], pkcs11_pin=PIN))
    pkcs11 = module._pkcs11
    with module.calls:
        module.session(TOKEN).generate_key(pkcs11.KeyType.AES, 256, label="kek-extractable", store=True,
                                           template={pkcs11.Attribute.EXTRACTABLE: True,
                                                     pkcs11.Attribute.SENSITIVE: False})
    with pytest.raises(ConfigError) as error:
        make_app(**hsm_env, KEK_2=uri("kek-extractable"))
    assert error.value.variable == "KEK_2" and "extractable" in str(error.value)


def test_the_hsm_going_away_gives_503_and_the_service_heals(make_app, hsm_env, softhsm):
    kek = generate_kek(make_app, hsm_env, "kek-outage")
    app = make_app(**hsm_env, KEK_2=kek, HSM_DEK_CACHE=0)  # every look-up goes to the token
    module = app.extensions["kms"].keyring.kek(2).module
    tokens, hidden = softhsm["tokens"], softhsm["tokens"].parent / "tokens-away"

    def outage(http):
        token = AuthActions(http).new_client()
        assert http.post("/keys/actions/generate", json={"keyReference": "k"}, headers=bearer(token)).status_code == 200
        assert http.get("/keys/k", headers=bearer(token)).status_code == 200
        tokens.rename(hidden)  # the token is gone ...
        with module.calls:
            try:
                module.lib.reinitialize()  # ... as the library sees it when the HSM restarts
            except module._pkcs11.PKCS11Error:
                pass  # (no token directory: SoftHSM does not initialise, like an HSM that is down)
        try:
            down = [http.get("/keys/k", headers=bearer(token)) for _ in range(3)]
        finally:
            hidden.rename(tokens)  # ... and it is back
        assert [r.status_code for r in down] == [503, 503, 503]
        assert all(r.headers["Retry-After"] and r.json()["error"] == "service_unavailable" for r in down)
        healed = http.get("/keys/k", headers=bearer(token))
        assert healed.status_code == 200, healed.text

    serve(app, outage)


def test_sessions_are_per_thread_and_a_forked_child_starts_over(make_app, hsm_env):
    import threading
    import uuid as uuid_module
    kek = generate_kek(make_app, hsm_env, "kek-fork")
    keyring = make_app(**hsm_env, KEK_2=kek).extensions["kms"].keyring
    owner, ref_hash = uuid_module.uuid4(), os.urandom(32)

    def round_trip(version):
        dek = os.urandom(32)
        wrapped, kek_version = keyring.wrap_dek(dek, owner, ref_hash, version)
        assert kek_version == 2
        return keyring.unwrap_dek(wrapped, owner, ref_hash, version, kek_version) == dek

    results = []
    threads = [threading.Thread(target=lambda i=i: results.extend(round_trip(i + 1) for _ in range(20)))
               for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [True] * 160
    module = keyring.kek(2).module
    with module.calls:
        sessions = {id(module.session(TOKEN))}
    seen = []

    def other_session():
        with module.calls:
            seen.append(id(module.session(TOKEN)))
    other = threading.Thread(target=other_session)
    other.start()
    other.join()
    assert seen[0] not in sessions  # another thread, another session

    child = os.fork()
    if child == 0:  # the child: the parent's sessions are void here; it must start over
        try:
            os._exit(0 if round_trip(1) else 1)
        except BaseException:  # noqa: BLE001
            os._exit(2)
    _, status = os.waitpid(child, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert round_trip(1)  # and the parent still works


def test_worker_processes_each_use_the_token_after_the_fork(make_app, hsm_env, softhsm, base_env, tmp_path):
    """The parent opens the token to check the KEKs, then forks: each worker must initialise the
    library and log in again, and serve with the KEK in the token."""
    from concurrent.futures import ThreadPoolExecutor

    import requests
    kek = generate_kek(make_app, hsm_env, "kek-workers")
    make_app(**hsm_env, KEK_2=kek)  # migrated, the KEK checked
    server = ServerProcess({**base_env, **hsm_env, "KEK_2": kek, "SOFTHSM2_CONF": os.environ["SOFTHSM2_CONF"],
                            "HSM_DEK_CACHE": "0"}, tmp_path, workers=2)
    try:
        with HttpClient(server.base) as http:
            token = AuthActions(http).new_client()
            generated = http.post("/keys/actions/generate", json={"keyReference": "k"}, headers=bearer(token))
            assert generated.status_code == 200

        def look_up(_):
            answer = requests.get(server.base + "/keys/k", headers={**bearer(token), "Connection": "close"},
                                  timeout=30)
            return answer.status_code, answer.json()["encryptWith"]["dek"]

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(look_up, range(80)))
        assert {status for status, _ in answers} == {200}
        assert {dek for _, dek in answers} == {generated.json()["dek"]}
        by_pid = served_by_pid(server.metrics_dir(), "/keys/<ref>")
        assert len([pid for pid, count in by_pid.items() if count]) == 2, by_pid  # both unwrapped in the token
    finally:
        server.stop()
    assert server.process.returncode == 0
