"""The audit stream (AUDIT_SINK): every sealed event, as one JSON line, in chain order, at least
once, with its chain position, chain hash and row MAC, so a SIEM can keep the chain (and its head)
outside the database.

- `file:/var/log/kms/audit.jsonl` appends to a file (fsync'd after each batch); where it left off
  is read back from the file's last line, so a restart re-sends nothing it wrote and skips nothing.
- `syslog` (or `syslog:/dev/log`, `syslog:HOST:PORT` for UDP) sends each line as one message;
  where it left off is kept in a cursor file beside AUDIT_HEAD_FILE (written after each batch,
  so a crash between sending and writing it sends that batch again: at least once).

The sealer ships after each seal, in the process that seals; events sealed by other hosts are
shipped too (the stream follows the chain, not the sealer).
"""
import json
import logging
import logging.handlers
import os
import socket
from datetime import timezone

from kms import db

log = logging.getLogger("kms.audit")

BATCH = 2000


class SinkError(ValueError):
    """AUDIT_SINK is not a sink this KMS knows."""


def _line(row) -> str:
    return json.dumps({
        "chainPos": row.chain_pos, "chainHash": bytes(row.chain_hash).hex(), "rowMac": bytes(row.row_mac).hex(),
        "seq": row.seq, "at": row.at.astimezone(timezone.utc).isoformat(), "actor": row.actor,
        "action": row.action, "target": row.target, "version": row.version, "outcome": row.outcome,
        "requestId": str(row.request_id) if row.request_id else None, "sourceIp": row.source_ip,
        "repeats": row.repeats, "changes": row.changes, "detail": row.detail}, separators=(",", ":"))


class FileSink:
    def __init__(self, path: str):
        self.path = path
        self.position = self._last_position()

    def _last_position(self) -> int:
        try:
            with open(self.path, "rb") as file:
                file.seek(0, os.SEEK_END)
                size = file.tell()
                file.seek(max(0, size - 65536))
                tail = file.read().splitlines()
        except FileNotFoundError:
            return 0
        for line in reversed(tail):
            try:
                return int(json.loads(line)["chainPos"])
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash: the one before it counts
        return 0

    def write(self, lines: list[str], last: int):
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        with open(self.path, "a") as file:
            if file.tell() and not self._ends_with_newline():
                file.write("\n")  # after a line cut short by a crash
            file.write("".join(line + "\n" for line in lines))
            file.flush()
            os.fsync(file.fileno())
        self.position = last

    def close(self):
        pass

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as file:
            file.seek(-1, os.SEEK_END)
            return file.read(1) == b"\n"


class SyslogSink:
    def __init__(self, address, cursor_path: str | None):
        self.handler = logging.handlers.SysLogHandler(
            address=address, facility=logging.handlers.SysLogHandler.LOG_AUTHPRIV,
            socktype=socket.SOCK_DGRAM)
        self.handler.append_nul = False
        self.cursor_path = cursor_path
        self.position = self._read_cursor()

    def close(self):
        self.handler.close()

    def _read_cursor(self) -> int:
        if not self.cursor_path:
            return 0
        try:
            with open(self.cursor_path) as file:
                return int(file.read().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def write(self, lines: list[str], last: int):
        for line in lines:
            record = logging.LogRecord("kms.audit.stream", logging.INFO, __file__, 0, "kms-audit: %s", (line,), None)
            self.handler.emit(record)
        self.position = last
        if self.cursor_path:
            temporary = f"{self.cursor_path}.tmp"
            with open(temporary, "w") as file:
                file.write(f"{last}\n")
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.cursor_path)


def open_sink(spec: str | None, head_file: str | None):
    """The sink AUDIT_SINK names, or None."""
    if not spec:
        return None
    kind, _, where = spec.partition(":")
    if kind == "file" and where:
        return FileSink(where)
    if kind == "syslog":
        if not where:
            address = "/dev/log"
        elif where.startswith("/"):
            address = where
        else:
            host, _, port = where.rpartition(":")
            if not host or not port.isdigit():
                raise SinkError("AUDIT_SINK syslog:HOST:PORT needs a host and a port")
            address = (host, int(port))
        return SyslogSink(address, f"{head_file}.sink-position" if head_file else None)
    raise SinkError("AUDIT_SINK is file:PATH, syslog, syslog:/dev/log or syslog:HOST:PORT")


def ship(sink, conn) -> int:
    """Send every event sealed past the sink's position; returns how many."""
    shipped = 0
    while True:
        with db.transaction(conn) as cur:
            cur.execute(db.sql.sealed_events_after, {"after": sink.position, "limit": BATCH})
            rows = cur.fetchall()
        if not rows:
            return shipped
        sink.write([_line(row) for row in rows], rows[-1].chain_pos)
        shipped += len(rows)
        if len(rows) < BATCH:
            return shipped
