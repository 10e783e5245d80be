"""`kms-client <command>` (or `python -m kms_client`): the KMS from a shell.

Configuration from KMS_BASE_URL, KMS_USER and KMS_PASS; a password that is needed and not in the
environment is prompted for, never taken from the command line. Secrets go to stdout only when
they are the command's output (a DEK from `get`/`generate`/`rotate`, plaintext from `decrypt`, a
data key from `data-key`). Errors are one line on stderr. Exit codes: 0 done, 1 the KMS refused
(its error code and message are printed), 2 usage or unusable input, 3 the KMS cannot be reached,
4 a ciphertext or stream failed authentication (altered, truncated, or another key or context).

`encrypt` and `decrypt` stream files of any size: the KMS makes one data key per file, the data is
encrypted here in authenticated chunks (kms_client/stream.py), and only the data key's ciphertext
is kept with it. With `--lines`, each line of stdin is one value (base64url) sent to the KMS to
encrypt or decrypt there, in batches, one line out per line in.
"""
import argparse
import base64
import binascii
import getpass
import json
import os
import re
import sys

from kms_client import BLOB_MAGIC, BlobError, Client, KmsError, KmsUnreachable, ciphertext, stream

EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTEGRITY = 1, 2, 3, 4


def _client(args) -> Client:
    password = os.environ.get("KMS_PASS")
    if password is None and args.command not in ("signup",):
        password = getpass.getpass("KMS password: ")
    return Client(base_url=args.url, clientname=args.user, password=password, verify=not args.insecure)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


_BASE64URL = re.compile(r"[A-Za-z0-9_-]*={0,2}")


def _unb64(text: str) -> bytes:
    """base64url, padded or not; binascii.Error on anything else (no character skipped)."""
    if not _BASE64URL.fullmatch(text):
        raise binascii.Error("not base64url")
    bare = text.rstrip("=")
    return base64.urlsafe_b64decode(bare + "=" * (-len(bare) % 4))


def _key_json(key) -> dict:
    return {"dek": _b64(key.dek), "version": key.version}


def _context(pairs) -> dict | None:
    """--context k=v, repeated."""
    if not pairs:
        return None
    context = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--context takes NAME=VALUE, not {pair!r}")
        context[name] = value
    return context


def _lines(client, args, context) -> int:
    """One value per line of stdin (base64url), sent to the KMS in batches; one line out per line in.
    An item the KMS refused gives an empty line and one line on stderr naming it."""
    values = [line.strip() for line in sys.stdin.read().splitlines() if line.strip()]
    try:
        blobs = [_unb64(value) for value in values]
    except (binascii.Error, ValueError):
        print("kms-client: --lines reads one base64url value per line", file=sys.stderr)
        return EXIT_USAGE
    items = [(blob, context) for blob in blobs]
    if args.command == "encrypt":
        answers = client.encrypt_batch(args.ref, items)
    elif args.command == "decrypt":
        answers = client.decrypt_batch(args.ref, items)
    else:
        answers = client.reencrypt_batch(args.ref, items, to_reference=args.to_ref, to_context=_context(args.to_context))
    failed = 0
    for number, answer in enumerate(answers, 1):
        if isinstance(answer, KmsError):
            failed += 1
            print(f"kms-client: line {number}: {answer.code}: {answer.message}", file=sys.stderr)
            print()
        else:
            print(_b64(answer))
    return EXIT_REFUSED if failed else 0


def _legacy_decrypt(client, args, data: bytes, context) -> int:
    """A blob `kms-client encrypt` wrote before it streamed: base64url text."""
    try:
        blob = _unb64(data.decode().strip())  # padded or not
    except (binascii.Error, ValueError, UnicodeDecodeError):
        blob = b""
    if not (blob[:4] == BLOB_MAGIC or ciphertext.is_ciphertext(blob)):
        print("kms-client: not a KMS stream or blob", file=sys.stderr)
        return EXIT_USAGE
    sys.stdout.buffer.write(client.decrypt(args.ref, blob, context, aad=args.aad.encode() or None))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kms-client", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=None, help="KMS base URL (default: KMS_BASE_URL)")
    parser.add_argument("--user", default=os.environ.get("KMS_USER"), help="client name (default: KMS_USER)")
    parser.add_argument("--insecure", action="store_true", help="do not verify the TLS certificate")
    commands = parser.add_subparsers(dest="command", required=True)
    signup = commands.add_parser("signup", help="register with a signup token (password prompted)")
    signup.add_argument("--token-file", default="-", help="file holding the signup token (default: stdin)")
    helps = {"generate": "make a key (prints its DEK, if exportable)", "get": "print a key's DEKs",
             "rotate": "make a new current version", "delete": "delete a key",
             "encrypt": "encrypt stdin to stdout (a stream under one data key; --lines: values on the server)",
             "decrypt": "decrypt what encrypt wrote", "reencrypt": "move a stream's data key (or --lines values) "
             "to the current version of this key or of --to-ref", "data-key": "print a fresh data key as JSON"}
    for name, text in helps.items():
        command = commands.add_parser(name, help=text)
        command.add_argument("ref_arg", nargs="?", metavar="ref", help="key reference (or --ref)")
        command.add_argument("--ref", dest="ref_opt", default=None, help="key reference")
        if name == "get":
            command.add_argument("--version", type=int, default=None)
        if name == "generate":
            command.add_argument("--not-exportable", action="store_true", help="its DEK never leaves the KMS")
        if name in ("encrypt", "decrypt", "reencrypt", "data-key"):
            command.add_argument("--context", action="append", metavar="NAME=VALUE",
                                 help="encryption context, bound to the ciphertext (repeat for more pairs)")
        if name in ("encrypt", "decrypt", "reencrypt"):
            command.add_argument("--lines", action="store_true",
                                 help="each stdin line is one base64url value for the KMS to work on")
        if name == "decrypt":
            command.add_argument("--aad", default="", help="associated data of a blob the earlier kms-client wrote")
        if name == "reencrypt":
            command.add_argument("--to-ref", default=None, help="another key to move to")
            command.add_argument("--to-context", action="append", metavar="NAME=VALUE")
        if name == "data-key":
            command.add_argument("--no-plaintext", action="store_true", help="only the data key's ciphertext")
    args = parser.parse_args(argv)
    if args.command != "signup":
        args.ref = args.ref_opt or args.ref_arg
        if not args.ref:
            parser.error("a key reference is needed (--ref REF)")

    try:
        client = _client(args)
        context = _context(getattr(args, "context", None))
        if args.command == "signup":
            source = sys.stdin if args.token_file == "-" else open(args.token_file, encoding="utf-8")
            with source:
                token = source.readline().strip()
            password = os.environ.get("KMS_PASS") or getpass.getpass("New password: ")
            client.signup(token, password)
            print("signed up", file=sys.stderr)
        elif args.command == "generate":
            key = client.generate_key(args.ref, exportable=not args.not_exportable)
            print(json.dumps(_key_json(key) if key else {"version": 1, "exportable": False}))
        elif args.command == "get":
            bundle = client.get_key(args.ref, args.version)
            print(json.dumps({"decryptWith": _key_json(bundle.decrypt_with),
                              "encryptWith": _key_json(bundle.encrypt_with)}))
        elif args.command == "rotate":
            key = client.rotate_key(args.ref)
            print(json.dumps(_key_json(key) if key else {"exportable": False}))
        elif args.command == "delete":
            client.delete_key(args.ref)
        elif args.command == "data-key":
            data_key = client.generate_data_key(args.ref, context, plaintext=not args.no_plaintext)
            answer = {"ciphertext": _b64(data_key.ciphertext), "version": data_key.version}
            if data_key.plaintext is not None:
                answer["plaintext"] = _b64(data_key.plaintext)
            print(json.dumps(answer))
        elif args.lines:
            return _lines(client, args, context)
        elif args.command == "encrypt":
            client.encrypt_stream(args.ref, sys.stdin.buffer, sys.stdout.buffer, context)
        elif args.command == "decrypt":
            source = sys.stdin.buffer
            head = source.peek(4)[:4] if hasattr(source, "peek") else b""
            if head != stream.MAGIC:
                return _legacy_decrypt(client, args, source.read(), context)
            client.decrypt_stream(args.ref, source, sys.stdout.buffer, context)
        elif args.command == "reencrypt":
            client.reencrypt_stream(args.ref, sys.stdin.buffer, sys.stdout.buffer, context, to_reference=args.to_ref,
                                    to_context=_context(args.to_context))
    except KmsUnreachable as error:
        print(f"kms-client: {error.message}: check --url or KMS_BASE_URL, and that the KMS runs", file=sys.stderr)
        return EXIT_UNREACHABLE
    except BlobError as error:
        code = EXIT_USAGE if error.message in ("not a KMS blob", "not a KMS stream") else EXIT_INTEGRITY
        print(f"kms-client: {error.message}", file=sys.stderr)
        return code
    except KmsError as error:
        print(f"kms-client: {error}", file=sys.stderr)
        return EXIT_REFUSED
    except ValueError as error:  # --context without =
        print(f"kms-client: {error}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as error:  # --token-file that cannot be read
        print(f"kms-client: {error.strerror}: {error.filename}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
