"""Times on the wire: RFC 3339, UTC, millisecond precision (2026-11-30T10:00:00.000Z)."""
from datetime import datetime, timezone


def rfc3339(value: datetime) -> str:
    return value.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
