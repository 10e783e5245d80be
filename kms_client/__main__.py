"""`kms-client <command>` (or `python -m kms_client`): the KMS from a shell, one command per client route.

Where: --url or KMS_BASE_URL (required: there is no default address). Who: --user or KMS_USER.
The password is read once per run, from the first of: --password-stdin (the first line of
stdin), KMS_PASS, a prompt on the terminal (a new password at signup is asked twice). It is never
taken from the command line, and nothing is asked before the KMS has answered.

Secrets go to stdout only when they are the command's output (a DEK from get/generate/rotate,
plaintext from decrypt); what a command did goes to stderr. Errors are one line on stderr.

Exit codes: 0 done; 1 the KMS refused (its error code and message are printed); 2 usage or
unusable input (no password and no terminal, not a blob); 3 the KMS cannot be reached, or is
unavailable or overloaded after retries (503, 429: try again later); 4 a blob failed
authentication (altered, or another key or aad).
"""
import argparse
import base64
import binascii
import getpass
import json
import os
import re
import sys

from kms_client import BlobError, Client, KmsError, KmsUnreachable

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
    return {"dek": base64.urlsafe_b64encode(key.dek).rstrip(b"=").decode(), "version": key.version}


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
    _print_json(_key_json(client.generate_key(args.ref)))


def get(client: Client, args):
    bundle = client.get_key(args.ref, args.version)
    _print_json({"decryptWith": _key_json(bundle.decrypt_with), "encryptWith": _key_json(bundle.encrypt_with)})


def rotate(client: Client, args):
    _print_json(_key_json(client.rotate_key(args.ref)))


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


def encrypt(client: Client, args):
    blob = client.encrypt(args.ref, sys.stdin.buffer.read(), args.aad.encode())
    print(base64.urlsafe_b64encode(blob).decode())


def decrypt(client: Client, args):
    text = sys.stdin.read().strip()
    try:
        blob = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))  # padded or not
    except (binascii.Error, ValueError):
        raise Refused("stdin is not a blob from `kms-client encrypt` (base64url)") from None
    sys.stdout.buffer.write(client.decrypt(args.ref, blob, args.aad.encode()))


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
        if ref:
            sub.add_argument("ref", help="key reference, such as invoices-db")
        return sub

    sub = command("signup", signup, "register with a one-time signup token and choose a password (asked twice)",
                  ref=False)
    sub.add_argument("--token-file", default="-", help="file holding the signup token (default: stdin)")
    command("logout", logout, "log in and revoke that token at once (checks the password works)", ref=False)
    command("list", list_keys, "metadata of my keys as JSON (never DEK material)", ref=False)
    command("versions", versions, "a key's versions and their states as JSON")
    command("generate", generate, "create a key; prints its DEK and version as JSON")
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
    for name, run, what in (("encrypt", encrypt, "encrypt stdin under the key's current DEK, here; prints a blob"),
                            ("decrypt", decrypt, "decrypt a blob from `kms-client encrypt` on stdin, here")):
        sub = command(name, run, what)
        sub.add_argument("--aad", default="", help="associated data (text) bound to the blob")
    return top


def main(argv=None) -> int:
    top = parser()
    args = top.parse_args(argv)
    if args.command == "set-rotation-period":
        try:
            args.period = _duration_ms(args.period_text)
        except argparse.ArgumentTypeError as problem:
            top.error(f"PERIOD: {problem}")
    if not args.url:
        top.error("no KMS to talk to: set KMS_BASE_URL or give --url (such as https://kms.internal)")
    if not args.user:
        top.error("no client name: set KMS_USER or give --user")
    if args.password_stdin and args.command in ("encrypt", "decrypt"):
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
        args.run(client, args)
    except Refused as problem:
        print(f"kms-client: {problem}", file=sys.stderr)
        return EXIT_USAGE
    except KmsUnreachable as error:
        print(f"kms-client: {error}: check --url or KMS_BASE_URL, and that the KMS runs", file=sys.stderr)
        return EXIT_UNREACHABLE
    except BlobError as error:
        print(f"kms-client: {error}", file=sys.stderr)
        return EXIT_USAGE if error.message == "not a KMS blob" else EXIT_INTEGRITY
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
