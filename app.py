"""Entry point from a checkout; installed, the same commands are the `kms` command.

  python app.py [serve] [--workers N]   serve with waitress (configuration from the environment or .env)
  python app.py dev          a throwaway KMS: embedded PostgreSQL, generated secrets
  python app.py gen-secret   a new 32-byte key
  flask --app app kms ...    the admin commands (as `kms ...`)
"""
import sys

# `flask --app app` finds this factory: the command line's app, which opens nothing until a
# command needs it (the server's app is kms.create_app, built by `serve`).
from kms.cli import cli_app as create_app  # noqa: F401
from kms.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0].startswith("--workers"):  # `python app.py`, `python app.py --workers 4`
        args = ["serve", *args]
    main(args=args, prog_name="python app.py")
