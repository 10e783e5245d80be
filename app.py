"""Entry point from a checkout; installed, the same commands are the `kms` command.

  python app.py [serve]      serve with waitress (configuration from the environment or .env)
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
    main(args=sys.argv[1:] or ["serve"], prog_name="python app.py")
