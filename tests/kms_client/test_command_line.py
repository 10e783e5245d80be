"""`kms-client`: a command for every client route, the password read once (KMS_PASS,
--password-stdin or a prompt, confirmed at signup), nothing asked before the KMS answers, one line
and a documented exit code for everything a user can cause, never a traceback."""
import json
import os
import pty
import select
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

from kms.serving.throwaway_postgres import _free_port
from tests.conftest import CLIENT_PASSWORD

KMS_CLIENT = str(Path(sys.executable).parent / "kms-client")  # the console script `pip install` made


def client_env(url: str | None, user: str | None = "sdk-svc", password: str | None = CLIENT_PASSWORD) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith("KMS_")}
    for name, value in (("KMS_BASE_URL", url), ("KMS_USER", user), ("KMS_PASS", password)):
        if value is not None:
            env[name] = value
    return env


def run_cli(url, *args, stdin=b"", user="sdk-svc", password=CLIENT_PASSWORD):
    """kms-client as cron or CI runs it: no terminal (a new session has no controlling one)."""
    return subprocess.run([KMS_CLIENT, *args], cwd="/", env=client_env(url, user, password), input=stdin,
                          capture_output=True, timeout=60, start_new_session=True)


def one_line(result) -> str:
    text = result.stderr.decode()
    assert "Traceback" not in text, text
    assert text.count("\n") == 1, text
    return text


def test_every_client_route_has_a_command(live_server, auth):
    token = auth.signup_token("cli-svc")
    signed_up = run_cli(live_server, "signup", stdin=token.encode() + b"\n", user="cli-svc")
    assert signed_up.returncode == 0 and signed_up.stderr == b"signed up as cli-svc\n", signed_up.stderr

    def ok(*args, stdin=b""):
        result = run_cli(live_server, *args, stdin=stdin, user="cli-svc")
        assert result.returncode == 0, (args, result.stderr)
        return result

    first = json.loads(ok("generate", "cli-key").stdout)
    assert first["version"] == 1 and len(first["dek"]) == 43
    rotated = json.loads(ok("rotate", "cli-key").stdout)
    assert rotated["version"] == 2 and rotated["dek"] != first["dek"]
    assert json.loads(ok("get", "cli-key").stdout)["encryptWith"] == rotated
    old = json.loads(ok("get", "cli-key", "--version", "1").stdout)
    assert old["decryptWith"] == first and old["encryptWith"] == rotated
    assert [v["state"] for v in json.loads(ok("versions", "cli-key").stdout)] == ["deprecated", "in-use"]
    blob = ok("encrypt", "cli-key", "--aad", "ctx", stdin=b"hello").stdout
    assert ok("decrypt", "cli-key", "--aad", "ctx", stdin=blob).stdout == b"hello"
    retired = ok("retire", "cli-key", "--below", "2")
    assert json.loads(retired.stdout)["currentVersion"] == 2
    assert retired.stderr == b"retired the versions of cli-key below 2: they are never served again\n"
    assert run_cli(live_server, "get", "cli-key", "--version", "1", user="cli-svc").returncode == 1  # 410
    period = ok("set-rotation-period", "cli-key", "30d")
    assert json.loads(period.stdout)["rotationPeriod"] == 30 * 86_400_000
    assert period.stderr == b"cli-key is rotated by itself every 30d\n"
    assert json.loads(ok("set-rotation-period", "cli-key", "off").stdout)["rotationPeriod"] is None
    listed = json.loads(ok("list").stdout)
    assert [key["keyReference"] for key in listed] == ["cli-key"] and "dek" not in json.dumps(listed)
    deleted = ok("delete", "cli-key")
    assert deleted.stdout == b"" and deleted.stderr.startswith(b"deleted cli-key: no longer served;")
    gone = run_cli(live_server, "get", "cli-key", user="cli-svc")
    assert gone.returncode == 1 and one_line(gone).startswith("kms-client: 404 not_found: ")
    restored = ok("restore", "cli-key")
    assert json.loads(restored.stdout)["state"] == "enabled" and restored.stderr == b"restored cli-key: it is served again\n"
    assert json.loads(ok("get", "cli-key").stdout)["encryptWith"] == rotated
    logged_out = ok("logout")
    assert logged_out.stderr.startswith(b"logged in as cli-svc and out again")
    help_text = subprocess.run([KMS_CLIENT, "--help"], capture_output=True, text=True, timeout=60).stdout
    for command in ("signup", "logout", "list", "versions", "generate", "get", "rotate", "retire",
                    "set-rotation-period", "delete", "restore", "set-not-exportable", "encrypt", "decrypt", "reencrypt",
                    "data-key", "grant", "grants", "revoke-grant", "grant-uses"):
        assert f"\n    {command} " in help_text or f"\n    {command}\n" in help_text, command
        assert subprocess.run([KMS_CLIENT, command, "--help"], capture_output=True, timeout=60).returncode == 0


def test_the_password_comes_from_stdin_once_and_never_from_the_command_line(live_server, auth):
    token_file = Path(f"/tmp/kms-client-test-{os.getpid()}.token")
    token_file.write_text(auth.signup_token("stdin-svc") + "\n")
    try:
        signed_up = run_cli(live_server, "--password-stdin", "signup", "--token-file", str(token_file),
                            stdin=CLIENT_PASSWORD.encode() + b"\n", user="stdin-svc", password=None)
    finally:
        token_file.unlink()
    assert signed_up.returncode == 0, signed_up.stderr
    generated = run_cli(live_server, "--password-stdin", "generate", "k", stdin=CLIENT_PASSWORD.encode() + b"\n",
                        user="stdin-svc", password=None)
    assert generated.returncode == 0, generated.stderr
    both = run_cli(live_server, "--password-stdin", "signup", stdin=b"x\n", user="stdin-svc", password=None)
    assert both.returncode == 2 and "use --token-file" in one_line(both)
    empty = run_cli(live_server, "--password-stdin", "list", stdin=b"", user="stdin-svc", password=None)
    assert empty.returncode == 2 and "stdin held no password" in one_line(empty)
    assert run_cli(live_server, "--password", "x", "list").returncode == 2  # there is no such option


def test_no_password_and_no_terminal_is_one_line_and_exit_2(live_server, auth):
    for args, stdin in ((["get", "k"], b""), (["signup"], auth.signup_token("nopass-svc").encode() + b"\n"),
                        (["list"], b"")):
        result = run_cli(live_server, *args, stdin=stdin, user="nopass-svc", password=None)
        assert result.returncode == 2, result.stderr
        assert one_line(result) == ("kms-client: no terminal to ask for the password on: set KMS_PASS, or pipe it "
                                    "with --password-stdin\n")


def on_a_terminal(url: str, *args, answers: list[str], user="tty-svc"):
    """kms-client with a terminal of its own, as a person at a shell: each password prompt gets the
    next answer. Returns (exit code, everything the terminal showed)."""
    pid, master = pty.fork()
    if pid == 0:  # the child: its controlling terminal is the pty
        os.execve(KMS_CLIENT, [KMS_CLIENT, *args], client_env(url, user, None))
    shown, answered, deadline = b"", 0, time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if not ready:
            continue
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child is gone and its terminal with it
            break
        if not chunk:
            break
        shown += chunk
        prompts = shown.count(b"assword")
        if prompts > answered and shown.rstrip(b" ").endswith(b":") and answers:
            answered = prompts
            os.write(master, answers.pop(0).encode() + b"\n")
    _, status = os.waitpid(pid, 0)
    os.close(master)
    return os.waitstatus_to_exitcode(status), shown.decode(errors="replace")


def test_a_new_password_is_asked_twice_and_a_mismatch_changes_nothing(live_server, auth, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(auth.signup_token("tty-svc") + "\n")
    code, shown = on_a_terminal(live_server, "signup", "--token-file", str(token_file),
                                answers=[CLIENT_PASSWORD, "Another-passw0rd!"])
    assert code == 2 and "New password for tty-svc:" in shown and "The same password again:" in shown
    assert "the two passwords differ; nothing was changed" in shown and "Traceback" not in shown
    code, shown = on_a_terminal(live_server, "signup", "--token-file", str(token_file),
                                answers=[CLIENT_PASSWORD, CLIENT_PASSWORD])
    assert code == 0 and "signed up as tty-svc" in shown, shown
    assert CLIENT_PASSWORD not in shown  # not echoed
    code, shown = on_a_terminal(live_server, "list", answers=[CLIENT_PASSWORD])
    assert code == 0 and shown.count("assword") == 1 and "[]" in shown, shown  # asked once per run


def test_nothing_is_asked_before_the_kms_answers():
    code, shown = on_a_terminal(f"http://127.0.0.1:{_free_port()}", "list", answers=["never-asked"])
    assert code == 3 and "assword" not in shown and "check --url or KMS_BASE_URL" in shown, shown


class Busy(BaseHTTPRequestHandler):
    """A KMS that is alive (/healthz) but answers everything else 503, as during an outage."""

    def do_GET(self):  # noqa: N802
        self._answer(200 if self.path == "/healthz" else 503)

    def do_POST(self):  # noqa: N802
        self._answer(503)

    def _answer(self, status):
        body = json.dumps({"status": "ok"} if status == 200 else
                          {"error": "service_unavailable", "message": "retry shortly", "requestId": "x"}).encode()
        self.send_response(status)
        self.send_header("Retry-After", "0")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class NotTheKms(BaseHTTPRequestHandler):
    """Some other web server: HTML for everything."""

    def do_GET(self):  # noqa: N802
        body = b"<html>hello</html>"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_exit_codes_tell_unreachable_and_busy_from_refused(live_server):
    unreachable = run_cli(f"http://127.0.0.1:{_free_port()}", "get", "k")
    assert unreachable.returncode == 3
    text = one_line(unreachable)
    assert text.startswith("kms-client: no answer from http://127.0.0.1:") and "0 unreachable" not in text
    server = HTTPServer(("127.0.0.1", 0), Busy)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        busy = run_cli(f"http://127.0.0.1:{server.server_port}", "get", "k")
    finally:
        server.shutdown()
        server.server_close()
    assert busy.returncode == 3 and "503 service_unavailable" in one_line(busy) and "try again later" in one_line(busy)
    denied = run_cli(live_server, "get", "k", user="nobody-svc", password="Wrong-passw0rd!")
    assert denied.returncode == 1 and one_line(denied).startswith("kms-client: 401 invalid_credentials")
    no_url = run_cli(None, "get", "k")
    assert no_url.returncode == 2 and "set KMS_BASE_URL or give --url" in one_line(no_url)
    no_user = run_cli(live_server, "get", "k", user=None)
    assert no_user.returncode == 2 and "set KMS_USER or give --user" in one_line(no_user)
    bare = run_cli(live_server, "set-rotation-period", "k", "10")
    assert bare.returncode == 2 and "not a duration" in one_line(bare)
    unknown = run_cli(live_server, "frobnicate")
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr.decode()
    for url in ("kms.internal", "ftp://kms.internal", "http://[::1", "http://kms.internal:port"):
        not_a_url = run_cli(url, "list")
        assert not_a_url.returncode == 2 and "is not a KMS address" in one_line(not_a_url), url
    server = HTTPServer(("127.0.0.1", 0), NotTheKms)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        elsewhere = run_cli(f"http://127.0.0.1:{server.server_port}", "list")
    finally:
        server.shutdown()
        server.server_close()
    assert elsewhere.returncode == 1 and "is not JSON: is it the KMS?" in one_line(elsewhere)
    missing_file = run_cli(live_server, "signup", "--token-file", "/nonexistent/token")
    assert missing_file.returncode == 2 and "/nonexistent/token" in one_line(missing_file)


def test_blob_errors_keep_their_exit_codes(live_server, auth):
    auth.new_client("blob-svc")
    assert run_cli(live_server, "generate", "k", user="blob-svc").returncode == 0
    garbage = run_cli(live_server, "decrypt", "k", stdin=b"this is not a blob at all", user="blob-svc")
    assert garbage.returncode == 2 and garbage.stderr == b"kms-client: not a KMS stream or blob\n"
    sealed = run_cli(live_server, "encrypt", "k", stdin=b"hello", user="blob-svc").stdout
    altered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    tampered = run_cli(live_server, "decrypt", "k", stdin=altered, user="blob-svc")
    assert tampered.returncode == 4, tampered.stderr
    assert tampered.stderr == b"kms-client: the stream was altered or truncated, or the key or context differs\n"
    other_aad = run_cli(live_server, "decrypt", "k", "--aad", "x", stdin=sealed, user="blob-svc")
    assert other_aad.returncode == 4 and other_aad.stdout == b""
    bad_pair = run_cli(live_server, "encrypt", "k", "--context", "no-equals", stdin=b"x", user="blob-svc")
    assert bad_pair.returncode == 2 and "NAME=VALUE" in one_line(bad_pair)
