"""Times on the wire: RFC 3339, UTC, millisecond precision (2026-11-30T10:00:00.000Z)."""
import time
from datetime import datetime, timezone


def rfc3339(value: datetime) -> str:
    return value.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def rfc3339_from_now(milliseconds: int) -> str:
    """rfc3339(now + milliseconds), for a key look-up's expiresAt: strftime on the epoch costs a
    third of building and formatting a datetime."""
    seconds, millis = divmod(time.time_ns() // 1_000_000 + milliseconds, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"
