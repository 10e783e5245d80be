"""`python app.py dev`: a throwaway KMS with nothing to configure, like `vault server -dev`.

Embedded PostgreSQL in a temporary directory, freshly generated secrets, an admin and a signup
token printed, everything gone on Ctrl-C. Loopback only: it must never serve a network.
"""
import ipaddress
import os
import secrets
import sys

from kms.config import SECRET_VARIABLES, generate_secret


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _dev_password() -> str:
    return secrets.token_urlsafe(18) + "-Aa1"


def dev_environment(database_url: str) -> dict:
    env = {name: generate_secret() for name in SECRET_VARIABLES}
    env.update({
        "DATABASE_URL": database_url,
        "ENV": "development",
        "SERVER_HOST": os.environ.get("SERVER_HOST", "127.0.0.1"),
        "SERVER_PORT": os.environ.get("SERVER_PORT", "8080"),
        "SERVER_THREADS": os.environ.get("SERVER_THREADS", "16"),
        "LOG_LEVEL": os.environ.get("LOG_LEVEL", "INFO"),
        "MASTER_ADMIN_USERNAME": "admin",
        "MASTER_ADMIN_PASSWORD": _dev_password(),
        "KEY_DELETION_WAIT": "0",
    })
    return env


def run_dev(serve):
    host = os.environ.get("SERVER_HOST", "127.0.0.1")
    if not _is_loopback(host):
        sys.exit(f"dev mode refuses to listen on {host}: it has throwaway secrets and an open admin. "
                 "Use 127.0.0.1, or run `python app.py` with a real configuration.")
    from kms import create_app
    from kms.devdb import ThrowawayPostgres

    print("Starting a throwaway PostgreSQL ...", file=sys.stderr)
    database = ThrowawayPostgres().start()
    try:
        env = dev_environment(database.dsn)
        app = create_app(env)
        with app.app_context():
            from kms.auth.service import issue_signup_token
            from kms.cli import cli_context
            with cli_context() as ctx:
                token, _ = issue_signup_token(ctx, "demo-service", 24 * 3600 * 1000)
        base = f"http://{env['SERVER_HOST']}:{env['SERVER_PORT']}"
        print(f"""
KMS dev mode: throwaway database and secrets; everything is deleted when you press Ctrl-C.

  URL:           {base}
  Admin:         admin / {env['MASTER_ADMIN_PASSWORD']}
  Signup token:  {token}   (for client "demo-service", valid 24 h)

Try it:

  TOKEN=$(curl -s {base}/auth/signup -H 'Content-Type: application/json' \\
      -d '{{"token": "{token}", "password": "Demo-passw0rd!"}}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
  curl -s {base}/keys/actions/generate -H "Authorization: Bearer $TOKEN" \\
      -H 'Content-Type: application/json' -d '{{"keyReference": "billing-db"}}'
""", flush=True)
        serve(app)
    finally:
        database.destroy()
