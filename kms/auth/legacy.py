"""Signup tokens minted offline by the original Go KMS's admin tool (`kms-admin generate_signup`).

They are self-contained: base64url(header) "." base64url(payload) "." base64url(HMAC-SHA256(
SIGNUP_SECRET, the first two parts)), all unpadded; header {"ver": "1", "typ": "signup"} (the
original's tool writes the key as "type"), payload {"sub": clientname, "ttl": ms, "iat": unix ms}.
This module only reads them; whether one was used already is the service's business, by the
token's canonical spelling (`LegacySignupToken.canonical`): the signature's last base64url
character carries 2 bits that decode to nothing, so every token has 4 spellings that verify.
"""
import binascii
import hmac
import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from kms import crypto
from kms.rules import CLIENTNAME_PATTERN

MAX_TTL_MS = 30 * 24 * 3600 * 1000
CLOCK_SKEW_MS = 5 * 60 * 1000  # an iat this far in the future is still believed
_PART = re.compile(r"[A-Za-z0-9_-]{1,2048}")


@dataclass(frozen=True)
class LegacySignupToken:
    clientname: str
    expires_at: datetime
    canonical: str  # the one spelling of this token: what is remembered as used


def looks_legacy(token: str) -> bool:
    return token.count(".") == 2


def _json_part(text: str):
    try:
        value = json.loads(crypto.b64url_decode(text))
    except (binascii.Error, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def read_legacy_signup_token(secret: bytes, token: str, now_ms: int) -> LegacySignupToken | None:
    """The token's client name and expiry if it is genuine, of the signup type and still valid;
    None otherwise (the caller answers every None alike)."""
    parts = token.split(".")
    if len(parts) != 3 or not all(_PART.fullmatch(part) for part in parts):
        return None
    try:
        signature = crypto.b64url_decode(parts[2])
    except binascii.Error:
        return None
    expected = hmac.new(secret, f"{parts[0]}.{parts[1]}".encode(), "sha256").digest()
    if not hmac.compare_digest(signature, expected):
        return None
    header, payload = _json_part(parts[0]), _json_part(parts[1])
    if header is None or payload is None:
        return None
    if header.get("ver") != "1" or header.get("typ", header.get("type")) != "signup":
        return None
    sub, ttl, iat = payload.get("sub"), payload.get("ttl"), payload.get("iat")
    if not (isinstance(sub, str) and re.fullmatch(CLIENTNAME_PATTERN, sub)):
        return None
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in (ttl, iat)):
        return None
    if not 0 < ttl <= MAX_TTL_MS or iat > now_ms + CLOCK_SKEW_MS or iat + ttl <= now_ms:
        return None
    expires_at = datetime.fromtimestamp(0, timezone.utc) + timedelta(milliseconds=iat + ttl)
    # The header and payload are signed as text; the signature is compared as bytes, which
    # several texts decode to: the canonical spelling is the bytes written back.
    canonical = f"{parts[0]}.{parts[1]}.{crypto.b64url(signature)}"
    return LegacySignupToken(clientname=sub, expires_at=expires_at, canonical=canonical)
