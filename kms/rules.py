"""Input rules that several layers share (settings, request schemas, the CLI): pure, no Flask."""
import re

CLIENTNAME_LENGTH = (4, 64)
CLIENTNAME_PATTERN = "^[A-Za-z0-9-]{%d,%d}$" % CLIENTNAME_LENGTH
CLIENTNAME_PROBLEM = "Must be %d-%d characters of A-Z a-z 0-9 -." % CLIENTNAME_LENGTH
KEY_REFERENCE_LENGTH = (1, 64)
KEY_REFERENCE_PATTERN = "^[A-Za-z0-9-]{%d,%d}$" % KEY_REFERENCE_LENGTH
KEY_REFERENCE_PROBLEM = "Must be %d-%d characters of A-Z a-z 0-9 -." % KEY_REFERENCE_LENGTH
# A key as a request names it: a reference of the caller's, or `{owner}:{reference}` of a key
# another client granted it (the colon occurs in neither name).
KEY_ADDRESS_PATTERN = "^(?:[A-Za-z0-9-]{%d,%d}:)?" % CLIENTNAME_LENGTH + KEY_REFERENCE_PATTERN[1:]
KEY_ADDRESS_PROBLEM = (KEY_REFERENCE_PROBLEM.removesuffix(".") + ", or OWNER:REFERENCE with an owner's clientname of "
                       "%d-%d of those characters." % CLIENTNAME_LENGTH)  # no braces: marshmallow formats it
# What a grant can name (kms.grants): `fetch` is the DEK routes; the rest, the server-side operations.
GRANT_OPERATIONS = ("decrypt", "encrypt", "fetch", "generate-data-key", "reencrypt")
MAX_VERSION = 2**31 - 1  # key versions are PostgreSQL integers

MINUTE_MS = 60 * 1000
DAY_MS = 24 * 60 * MINUTE_MS
SIGNUP_TOKEN_MAX_TTL_MS = 30 * DAY_MS

PASSWORD_MIN, PASSWORD_MAX = 12, 128
# Character classes, as /openapi.json's pattern states them: anything not an ASCII letter or digit
# is a symbol, so the server's check and the documented pattern agree exactly.
_CLASSES = {"a lowercase letter": "a-z", "an uppercase letter": "A-Z", "a digit": "0-9"}
_SYMBOL = "^A-Za-z0-9"
_ALL = [*_CLASSES.values(), _SYMBOL]
# At least 3 of the 4 classes: each way of leaving one out, as lookaheads.
PASSWORD_PATTERN = "^(?:" + "|".join(
    "".join(f"(?=[\\s\\S]*[{cls}])" for cls in _ALL if cls != left_out) for left_out in _ALL
) + f")[\\s\\S]{{{PASSWORD_MIN},{PASSWORD_MAX}}}$"


def password_problem(password: str) -> str | None:
    """What a password lacks under the policy, in words the caller can act on; None if it passes.
    Never quotes the password."""
    if not PASSWORD_MIN <= len(password) <= PASSWORD_MAX:
        return f"Must be {PASSWORD_MIN} to {PASSWORD_MAX} characters long."
    present = {name: re.search(f"[{cls}]", password) is not None for name, cls in _CLASSES.items()}
    present["a symbol"] = re.search(f"[{_SYMBOL}]", password) is not None
    if sum(present.values()) < 3:
        missing = [name for name, found in present.items() if not found]
        return "Must contain at least 3 of: lowercase letter, uppercase letter, digit, symbol; add " + \
            " or ".join(missing) + "."
    return None
