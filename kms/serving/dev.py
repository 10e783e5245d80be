"""`kms dev`: a throwaway KMS with nothing to configure, like `vault server -dev`.

Embedded PostgreSQL in a temporary directory, freshly generated secrets, an admin and a signup
token printed, everything gone when it stops: on Ctrl-C (even if started with SIGINT ignored), on
SIGTERM, when its terminal closes (SIGHUP) and when its parent dies. The port is bound before
anything else, so a taken port fails in one line before a secret is printed. Loopback only: it
must never serve a network. Its settings go to `.env.dev` (mode 0600, removed on exit), so the
admin commands reach it: `kms --env-file .env.dev signup-token --name svc`.
"""
import ipaddress
import os
import secrets
import signal
import sys
import threading
from pathlib import Path

from kms.app import create_app
from kms.auth.service import issue_signup_token
from kms.config import DEFAULT, SECRET_VARIABLES, generate_secret, load_settings
from kms.context import Context
from kms.rules import DAY_MS
from kms.runtime import Kms
from kms.serving.lifecycle import bind_listener, die_with_parent, stop_on_signals
from kms.serving.server import serve_app
from kms.serving.throwaway_postgres import ThrowawayPostgres

DEV_ENV_FILE = ".env.dev"


class DevModeRefused(Exception):
    """Dev mode will not start as asked; the message says why and what to do."""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _dev_password() -> str:
    return secrets.token_urlsafe(18) + "-Aa1"


def dev_environment(database_url: str, host: str, port: int, head_file: str | None = None) -> dict:
    env = {name: generate_secret() for name in SECRET_VARIABLES}
    env.update({
        "DATABASE_URL": database_url,
        # The throwaway database's chain head, deleted with it (not the default in the working
        # directory, which the next `kms dev` would find naming a chain that is gone).
        "AUDIT_HEAD_FILE": head_file or "off",
        "SERVER_HOST": host,
        "SERVER_PORT": str(port),
        "SERVER_THREADS": os.environ.get("SERVER_THREADS", str(DEFAULT.server_threads)),
        "LOG_LEVEL": os.environ.get("LOG_LEVEL", DEFAULT.log_level),
        "MASTER_ADMIN_USERNAME": "admin",
        "MASTER_ADMIN_PASSWORD": _dev_password(),
        # Everything else as in production (KEY_DELETION_WAIT included: delete, then restore, works).
    })
    return env


def write_env_file(path: Path, env: dict):
    """The dev server's settings for the admin commands, readable by this user alone."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write("# Written by `kms dev` for `kms --env-file .env.dev ...`; deleted when it stops.\n")
        for name, value in env.items():
            if not name.startswith("MASTER_ADMIN_"):  # the admin exists; its password was printed once
                file.write(f"{name}={value}\n")


def run_dev() -> int:
    host = os.environ.get("SERVER_HOST", DEFAULT.server_host)
    if not _is_loopback(host):
        raise DevModeRefused(f"dev mode refuses to listen on {host}: it has throwaway secrets and an open admin. "
                             "Use 127.0.0.1, or run `kms serve` with a real configuration.")
    port = int(os.environ.get("SERVER_PORT", str(DEFAULT.server_port)))
    sock = bind_listener(host, port)  # before anything is started or printed
    stopping = threading.Event()
    stop_on_signals(stopping)  # installed now: SIGINT may have been inherited as ignored
    die_with_parent(signal.SIGTERM)

    print("Starting a throwaway PostgreSQL ...", file=sys.stderr, flush=True)
    database = ThrowawayPostgres().start()
    env_file = Path(DEV_ENV_FILE).resolve()
    try:
        env = dev_environment(database.dsn, host, sock.getsockname()[1], str(database.root / "audit-head"))
        kms = Kms.start(load_settings(env))
        app = create_app(kms=kms)
        with kms.pool.connection() as conn:
            token, _ = issue_signup_token(Context(kms=kms, conn=conn, source_ip="local", origin="cli"), "demo-service",
                                          DAY_MS)
        write_env_file(env_file, env)
        base = f"http://{host}:{env['SERVER_PORT']}"
        print(f"""
KMS dev mode: throwaway database and secrets; everything is deleted when it stops (Ctrl-C).

  URL:           {base}
  Admin:         admin / {env['MASTER_ADMIN_PASSWORD']}
  Signup token:  {token}   (for client "demo-service", valid 24 h)
  Database:      {database.root}
  Settings:      {env_file} (mode 0600, deleted on exit), for the admin commands:
                 kms --env-file {DEV_ENV_FILE} signup-token --name billing-service

Try it:

  TOKEN=$(curl -s {base}/auth/signup -H 'Content-Type: application/json' \\
      -d '{{"token": "{token}", "password": "Demo-passw0rd!"}}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
  curl -s {base}/keys/actions/generate -H "Authorization: Bearer $TOKEN" \\
      -H 'Content-Type: application/json' -d '{{"keyReference": "billing-db"}}'
""", flush=True)
        if not stopping.is_set():
            serve_app(app, sock, stopping)
        else:
            kms.close()
    finally:
        sock.close()
        env_file.unlink(missing_ok=True)
        database.destroy()
        print("KMS dev mode stopped; its database and secrets are gone.", file=sys.stderr, flush=True)
    return 0
