"""`kms-client <command>` (or `python -m kms_client`): the KMS from a shell.

Configuration from KMS_BASE_URL, KMS_USER and KMS_PASS; a password that is needed and not in the
environment is prompted for, never taken from the command line. Secrets go to stdout only when
they are the command's output (a DEK from `get`/`generate`/`rotate`, plaintext from `decrypt`).
Errors are one line on stderr. Exit codes: 0 done, 1 the KMS refused (its error code and message
are printed), 2 usage or unusable input, 3 the KMS cannot be reached, 4 a blob failed
authentication (altered, or another key or aad).
"""
import argparse
import base64
import binascii
import getpass
import json
import os
import sys

from kms_client import BlobError, Client, KmsError, KmsUnreachable

EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTEGRITY = 1, 2, 3, 4


def _client(args) -> Client:
    password = os.environ.get("KMS_PASS")
    if password is None and args.command not in ("signup",):
        password = getpass.getpass("KMS password: ")
    return Client(base_url=args.url, clientname=args.user, password=password, verify=not args.insecure)


def _key_json(key) -> dict:
    return {"dek": base64.urlsafe_b64encode(key.dek).rstrip(b"=").decode(), "version": key.version}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kms-client", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=None, help="KMS base URL (default: KMS_BASE_URL)")
    parser.add_argument("--user", default=os.environ.get("KMS_USER"), help="client name (default: KMS_USER)")
    parser.add_argument("--insecure", action="store_true", help="do not verify the TLS certificate")
    commands = parser.add_subparsers(dest="command", required=True)
    signup = commands.add_parser("signup", help="register with a signup token (password prompted)")
    signup.add_argument("--token-file", default="-", help="file holding the signup token (default: stdin)")
    for name in ("generate", "get", "rotate", "delete", "encrypt", "decrypt"):
        command = commands.add_parser(name)
        command.add_argument("ref", help="key reference")
        if name == "get":
            command.add_argument("--version", type=int, default=None)
        if name in ("encrypt", "decrypt"):
            command.add_argument("--aad", default="", help="associated data (text) bound to the blob")
    args = parser.parse_args(argv)

    try:
        client = _client(args)
        if args.command == "signup":
            source = sys.stdin if args.token_file == "-" else open(args.token_file, encoding="utf-8")
            with source:
                token = source.readline().strip()
            password = os.environ.get("KMS_PASS") or getpass.getpass("New password: ")
            client.signup(token, password)
            print("signed up", file=sys.stderr)
        elif args.command == "generate":
            print(json.dumps(_key_json(client.generate_key(args.ref))))
        elif args.command == "get":
            bundle = client.get_key(args.ref, args.version)
            print(json.dumps({"decryptWith": _key_json(bundle.decrypt_with),
                              "encryptWith": _key_json(bundle.encrypt_with)}))
        elif args.command == "rotate":
            print(json.dumps(_key_json(client.rotate_key(args.ref))))
        elif args.command == "delete":
            client.delete_key(args.ref)
        elif args.command == "encrypt":
            blob = client.encrypt(args.ref, sys.stdin.buffer.read(), args.aad.encode())
            print(base64.urlsafe_b64encode(blob).decode())
        elif args.command == "decrypt":
            text = sys.stdin.read().strip()
            try:
                blob = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))  # padded or not
            except (binascii.Error, ValueError):
                print("kms-client: stdin is not a blob from `kms-client encrypt` (base64url)", file=sys.stderr)
                return EXIT_USAGE
            sys.stdout.buffer.write(client.decrypt(args.ref, blob, args.aad.encode()))
    except KmsUnreachable as error:
        print(f"kms-client: {error.message}: check --url or KMS_BASE_URL, and that the KMS runs", file=sys.stderr)
        return EXIT_UNREACHABLE
    except BlobError as error:
        code = EXIT_USAGE if error.message == "not a KMS blob" else EXIT_INTEGRITY
        print(f"kms-client: {error.message}", file=sys.stderr)
        return code
    except KmsError as error:
        print(f"kms-client: {error}", file=sys.stderr)
        return EXIT_REFUSED
    except OSError as error:  # --token-file that cannot be read
        print(f"kms-client: {error.strerror}: {error.filename}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
