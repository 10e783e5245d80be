"""`kms-client <command>` (or `python -m kms_client`): the KMS from a shell, one command per client route.

Where: --url or KMS_BASE_URL (required: there is no default address). Who: --user or KMS_USER.
The password is read once per run, from the first of: --password-stdin (the first line of
stdin), KMS_PASS, a prompt on the terminal (a new password at signup is asked twice). It is never
taken from the command line, and nothing is asked before the KMS has answered.

Secrets go to stdout only when they are the command's output (a DEK from get/generate/rotate,
plaintext from decrypt, a data key from data-key); what a command did goes to stderr. Errors are
one line on stderr.

`encrypt` and `decrypt` stream files of any size: the KMS makes one data key per file, the data is
encrypted here in authenticated chunks (kms_client/stream.py), and only the data key's ciphertext
is kept with it. With `--lines`, each line of stdin is one value (base64url) sent to the KMS to
encrypt, decrypt or reencrypt there, in batches, one line out per line in.

Exit codes: 0 done; 1 the KMS refused (its error code and message are printed); 2 usage or
unusable input (no password and no terminal, not a stream or blob); 3 the KMS cannot be reached,
or is unavailable or overloaded after retries (503, 429: try again later); 4 a stream or
ciphertext failed authentication (altered, truncated, or another key, context or aad).
"""
import argparse
import base64
import binascii
import getpass
import json
import os
import re
import sys
import time
from datetime import datetime, timezone

from kms_client import BLOB_MAGIC, BlobError, Client, KmsError, KmsUnreachable, ciphertext, stream

EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTEGRITY = 1, 2, 3, 4

DURATION_UNITS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


class Parser(argparse.ArgumentParser):
    """Usage errors in one line, as every other error."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


class Refused(Exception):
    """Usage or input this command cannot work with: one line, exit 2."""


def _duration_ms(text: str) -> int | None:
    """`30d`, `12h`, `90m`: a number with a unit (a bare number is refused); `off` is None."""
    if text == "off":
        return None
    match = re.fullmatch(r"(\d+)(ms|s|m|h|d)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: give a number with a unit (90m, 12h, 30d) "
                                         "or off")
    return int(match.group(1)) * DURATION_UNITS[match.group(2)]


def _pair(text: str) -> tuple[str, str]:
    """One --context NAME=VALUE."""
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    return name, value


def _context(pairs, aad: str = "") -> dict | None:
    """--context pairs, with --aad (the earlier kms-client's) bound as the SDK binds `aad`."""
    context = dict(pairs) if pairs else None
    if aad:
        context = {**(context or {}), "aad": _b64(aad.encode())}
    return context


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


_BASE64URL = re.compile(r"[A-Za-z0-9_-]*={0,2}")


def _unb64(text: str) -> bytes:
    """base64url, padded or not; binascii.Error on anything else (no character skipped)."""
    if not _BASE64URL.fullmatch(text):
        raise binascii.Error("not base64url")
    bare = text.rstrip("=")
    return base64.urlsafe_b64decode(bare + "=" * (-len(bare) % 4))


def _ask(prompt: str) -> str:
    """A password from the terminal (not from stdin, which may carry a token or plaintext)."""
    try:
        with open("/dev/tty", "rb"):
            pass
    except OSError:
        raise Refused("no terminal to ask for the password on: set KMS_PASS, or pipe it with --password-stdin") from None
    return getpass.getpass(prompt)  # reads from /dev/tty


def _read_password(args, *, new: bool) -> str:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise Refused("--password-stdin: stdin held no password")
        return password
    if os.environ.get("KMS_PASS"):
        return os.environ["KMS_PASS"]
    if not new:
        return _ask(f"Password for {args.user}: ")
    password = _ask(f"New password for {args.user}: ")
    if _ask("The same password again: ") != password:
        raise Refused("the two passwords differ; nothing was changed")
    return password


def _key_json(key) -> dict:
    return {"dek": _b64(key.dek), "version": key.version}


def _print_json(value):
    print(json.dumps(value))


def _done(text: str):
    print(text, file=sys.stderr)


def _read_token(args) -> str:
    if args.token_file == "-":
        if args.password_stdin:
            raise Refused("stdin cannot carry both the signup token and the password: use --token-file FILE")
        token = sys.stdin.readline().strip()
    else:
        with open(args.token_file, encoding="utf-8") as source:
            token = source.readline().strip()
    if not token:
        raise Refused("no signup token: give it on stdin or in --token-file FILE (`kms signup-token` prints one)")
    return token


def signup(client: Client, args):
    token = _read_token(args)
    client.signup(token, _read_password(args, new=True))
    _done(f"signed up as {args.user}")


def logout(client: Client, args):
    client.logout()
    _done(f"logged in as {args.user} and out again: the password works, and that token no longer does")


def list_keys(client: Client, args):
    _print_json(client.list_keys())


def versions(client: Client, args):
    _print_json(client.key_versions(args.ref))


def generate(client: Client, args):
    key = client.generate_key(args.ref, exportable=not args.not_exportable)
    _print_json(_key_json(key) if key else {"version": 1, "exportable": False})


def get(client: Client, args):
    bundle = client.get_key(args.ref, args.version)
    _print_json({"decryptWith": _key_json(bundle.decrypt_with), "encryptWith": _key_json(bundle.encrypt_with)})


def rotate(client: Client, args):
    key = client.rotate_key(args.ref)
    _print_json(_key_json(key) if key else {"exportable": False})


def set_not_exportable(client: Client, args):
    _print_json(client.set_exportable(args.ref, False))
    _done(f"{args.ref} is no longer exportable: its DEK never leaves the KMS again")


def retire(client: Client, args):
    _print_json(client.retire_versions(args.ref, args.below))
    _done(f"retired the versions of {args.ref} below {args.below}: they are never served again")


def restore(client: Client, args):
    _print_json(client.restore_key(args.ref))
    _done(f"restored {args.ref}: it is served again")


def set_rotation_period(client: Client, args):
    _print_json(client.set_rotation_period(args.ref, args.period))
    _done(f"{args.ref} is no longer rotated by itself" if args.period is None
          else f"{args.ref} is rotated by itself every {args.period_text}")


def delete(client: Client, args):
    client.delete_key(args.ref)
    _done(f"deleted {args.ref}: no longer served; destroyed after the KMS's deletion wait "
          f"(`kms-client restore {args.ref}` until then)")


def _lines(client: Client, args):
    """One value per line of stdin (base64url), sent to the KMS in batches; one line out per line in.
    An item the KMS refused gives an empty line and one line on stderr naming it (exit 1)."""
    try:
        blobs = [_unb64(line.strip()) for line in sys.stdin.read().splitlines() if line.strip()]
    except (binascii.Error, ValueError):
        raise Refused("--lines reads one base64url value per line") from None
    items = [(blob, args.context) for blob in blobs]
    if args.command == "encrypt":
        answers = client.encrypt_batch(args.ref, items)
    elif args.command == "decrypt":
        answers = client.decrypt_batch(args.ref, items)
    else:
        answers = client.reencrypt_batch(args.ref, items, to_reference=args.to_ref, to_context=args.to_context)
    failed = 0
    for number, answer in enumerate(answers, 1):
        if isinstance(answer, KmsError):
            failed += 1
            print(f"kms-client: line {number}: {answer.code}: {answer.message}", file=sys.stderr)
            print()
        else:
            print(_b64(answer))
    return EXIT_REFUSED if failed else 0


def encrypt(client: Client, args):
    if args.lines:
        return _lines(client, args)
    client.encrypt_stream(args.ref, sys.stdin.buffer, sys.stdout.buffer, args.context)


def decrypt(client: Client, args):
    if args.lines:
        return _lines(client, args)
    source = sys.stdin.buffer
    head = source.peek(4)[:4] if hasattr(source, "peek") else b""
    if head == stream.MAGIC:
        client.decrypt_stream(args.ref, source, sys.stdout.buffer, args.context)
        return
    # a blob the earlier `kms-client encrypt` wrote, or a single ciphertext: base64url text
    try:
        blob = _unb64(source.read().decode().strip())
    except (binascii.Error, ValueError, UnicodeDecodeError):
        blob = b""
    if not (blob[:4] == BLOB_MAGIC or ciphertext.is_ciphertext(blob)):
        raise Refused("not a KMS stream or blob")
    if blob[:4] == BLOB_MAGIC:
        sys.stdout.buffer.write(client.decrypt(args.ref, blob, args.pairs_context, aad=args.aad.encode() or None))
    else:
        sys.stdout.buffer.write(client.decrypt(args.ref, blob, args.context))


def reencrypt(client: Client, args):
    if args.lines:
        return _lines(client, args)
    client.reencrypt_stream(args.ref, sys.stdin.buffer, sys.stdout.buffer, args.context, to_reference=args.to_ref,
                            to_context=args.to_context)


def data_key(client: Client, args):
    key = client.generate_data_key(args.ref, args.context, plaintext=not args.no_plaintext)
    answer = {"ciphertext": _b64(key.ciphertext), "version": key.version}
    if key.plaintext is not None:
        answer["plaintext"] = _b64(key.plaintext)
    _print_json(answer)


def grant(client: Client, args):
    expires_at = None
    if args.expires is not None:
        expires_at = datetime.fromtimestamp(time.time() + args.expires / 1000, timezone.utc).isoformat()
    _print_json(client.grant(args.ref, args.to, args.operation, expires_at=expires_at,
                             context_subset=_context(args.context_subset)))
    _done(f"{args.to} may now {', '.join(args.operation)} with {args.ref}, naming it {args.user}:{args.ref}")


def grants(client: Client, args):
    _print_json(client.list_grants(args.ref))


def revoke_grant(client: Client, args):
    client.revoke_grant(args.ref, args.grant_id)
    _done(f"revoked grant {args.grant_id} on {args.ref}: it allows nothing from now on")


def grant_uses(client: Client, args):
    _print_json(client.grant_uses(args.ref, args.grant_id))


def parser() -> argparse.ArgumentParser:
    top = Parser(prog="kms-client", description=__doc__.split("\n\n")[1],
                                  epilog=__doc__.split("\n\n")[-1], formatter_class=argparse.RawTextHelpFormatter)
    top.add_argument("--url", default=os.environ.get("KMS_BASE_URL"),
                     help="the KMS's base URL, such as https://kms.internal (default: KMS_BASE_URL; required)")
    top.add_argument("--user", default=os.environ.get("KMS_USER"), help="client name (default: KMS_USER)")
    top.add_argument("--password-stdin", action="store_true",
                     help="read the password from the first line of stdin (else KMS_PASS, else a prompt)")
    top.add_argument("--insecure", action="store_true", help="do not verify the TLS certificate")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, run, help, *, ref=True):
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(run=run)
        if ref:  # REF or --ref REF
            sub.add_argument("ref", nargs="?", help="key reference, such as invoices-db (or --ref REF)")
            sub.add_argument("--ref", dest="ref_option", metavar="REF", default=None, help="key reference")
        return sub

    sub = command("signup", signup, "register with a one-time signup token and choose a password (asked twice)",
                  ref=False)
    sub.add_argument("--token-file", default="-", help="file holding the signup token (default: stdin)")
    command("logout", logout, "log in and revoke that token at once (checks the password works)", ref=False)
    command("list", list_keys, "metadata of my keys as JSON (never DEK material)", ref=False)
    command("versions", versions, "a key's versions and their states as JSON")
    sub = command("generate", generate, "create a key; prints its DEK and version as JSON")
    sub.add_argument("--not-exportable", action="store_true", help="its DEK never leaves the KMS (nothing printed "
                     "but the version)")
    sub = command("get", get, "fetch a key's DEKs as JSON: decryptWith (--version, else current) and encryptWith")
    sub.add_argument("--version", type=int, default=None, help="the version to decrypt with")
    command("rotate", rotate, "make a new version the one to encrypt with; prints it as JSON")
    sub = command("retire", retire, "stop serving every version below --below (their material is erased)")
    sub.add_argument("--below", type=int, required=True, help="the lowest version still served")
    sub = command("set-rotation-period", set_rotation_period,
                  "rotate the key by itself once its current version is older than PERIOD")
    sub.add_argument("period_text", metavar="PERIOD", help="a duration with a unit (90m, 12h, 30d), or off")
    command("delete", delete, "stop serving a key now; it is destroyed after the KMS's deletion wait")
    command("restore", restore, "cancel a key's pending deletion")
    command("set-not-exportable", set_not_exportable, "never return the key's DEK again (there is no way back)")
    context_help = "encryption context, bound to the ciphertext (repeat for more pairs)"
    for name, run, what in (
            ("encrypt", encrypt, "encrypt stdin to stdout: a stream under one data key from the KMS, encrypted here "
                                 "(--lines: base64url values, encrypted on the KMS)"),
            ("decrypt", decrypt, "decrypt what `kms-client encrypt` wrote (a stream, or a blob of the earlier one)"),
            ("reencrypt", reencrypt, "move a stream's data key (or --lines values) to the current version of this "
                                     "key or of --to-ref; the data is not read")):
        sub = command(name, run, what)
        sub.add_argument("--context", action="append", type=_pair, metavar="NAME=VALUE", help=context_help)
        sub.add_argument("--lines", action="store_true",
                         help="each stdin line is one base64url value for the KMS to work on")
        if name != "reencrypt":
            sub.add_argument("--aad", default="", help="associated data (text), as the earlier kms-client bound it")
        else:
            sub.add_argument("--to-ref", default=None, help="another key to move to")
            sub.add_argument("--to-context", action="append", type=_pair, metavar="NAME=VALUE",
                             help="the context to bind to instead (default: the same)")
    sub = command("grant", grant, "let another client use this key for named operations; prints the grant")
    sub.add_argument("--to", required=True, metavar="CLIENT", help="the grantee's clientname")
    sub.add_argument("--operation", action="append", required=True,
                     choices=("fetch", "encrypt", "decrypt", "reencrypt", "generate-data-key"),
                     help="an operation it may do (repeat for more)")
    sub.add_argument("--expires", type=_duration_ms, default=None, metavar="DURATION",
                     help="the grant ends after this long (90m, 12h, 30d; default: never)")
    sub.add_argument("--context-subset", action="append", type=_pair, metavar="NAME=VALUE",
                     help="a pair the grantee's context must hold (repeat for more)")
    sub = command("grants", grants, "the live grants on my key REF as JSON; without REF, the grants made to me "
                                    "(name a key shared with me OWNER:REF)", ref=False)
    sub.add_argument("ref", nargs="?", help="one of my keys (default: list the grants made to me)")
    sub = command("revoke-grant", revoke_grant, "end a grant on my key at once")
    sub.add_argument("grant_id", metavar="GRANT_ID", help="the grant's id, as `kms-client grants REF` shows it")
    sub = command("grant-uses", grant_uses, "the audit events naming a grant on my key, as JSON")
    sub.add_argument("grant_id", metavar="GRANT_ID", help="the grant's id")
    sub = command("data-key", data_key, "print a fresh data key as JSON (plaintext and the ciphertext to keep)")
    sub.add_argument("--context", action="append", type=_pair, metavar="NAME=VALUE", help=context_help)
    sub.add_argument("--no-plaintext", action="store_true", help="only the data key's ciphertext")
    return top


def main(argv=None) -> int:
    top = parser()
    args = top.parse_args(argv)
    if args.command == "set-rotation-period":
        try:
            args.period = _duration_ms(args.period_text)
        except argparse.ArgumentTypeError as problem:
            top.error(f"PERIOD: {problem}")
    if "ref_option" in args:
        if args.ref and args.ref_option and args.ref != args.ref_option:
            top.error("two key references: give REF or --ref REF")
        args.ref = args.ref_option or args.ref
        if not args.ref:
            top.error("a key reference is needed (REF or --ref REF)")
    if "context" in args:
        args.pairs_context = _context(args.context)
        args.context = _context(args.context, getattr(args, "aad", ""))
        if getattr(args, "to_context", None) is not None:
            args.to_context = _context(args.to_context)
    if not args.url:
        top.error("no KMS to talk to: set KMS_BASE_URL or give --url (such as https://kms.internal)")
    if not args.user:
        top.error("no client name: set KMS_USER or give --user")
    if args.password_stdin and args.command in ("encrypt", "decrypt", "reencrypt"):
        top.error(f"{args.command} reads its input from stdin: give the password in KMS_PASS instead")
    try:
        client = Client(base_url=args.url, clientname=args.user, password="", verify=not args.insecure)
    except ValueError as problem:  # a URL that is not one
        top.error(str(problem))
    try:
        client.ping()  # before asking for anything
        if args.command != "signup":
            client.use_password(_read_password(args, new=False))
            client.login()
        code = args.run(client, args)
    except Refused as problem:
        print(f"kms-client: {problem}", file=sys.stderr)
        return EXIT_USAGE
    except KmsUnreachable as error:
        print(f"kms-client: {error}: check --url or KMS_BASE_URL, and that the KMS runs", file=sys.stderr)
        return EXIT_UNREACHABLE
    except BlobError as error:
        print(f"kms-client: {error}", file=sys.stderr)
        return EXIT_USAGE if error.message in ("not a KMS blob", "not a KMS stream") else EXIT_INTEGRITY
    except KmsError as error:
        if error.status in (429, 503):
            print(f"kms-client: {error} (still, after retries: try again later)", file=sys.stderr)
            return EXIT_UNREACHABLE
        print(f"kms-client: {error}", file=sys.stderr)
        return EXIT_REFUSED
    except OSError as error:  # --token-file that cannot be read
        print(f"kms-client: {error.strerror}: {error.filename}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
