"""JSON log lines on stderr, formatted and written in batches by a thread of their own; and what a
failure's line says: its cause, scrubbed of secrets (`cause`), at most once per distinct cause per
interval (`OncePer`)."""
import json
import logging
import os
import sys
import threading
import time
import weakref
from collections import deque
from json.encoder import c_make_encoder, encode_basestring_ascii

_STANDARD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


# json's C encoder, made once: JSONEncoder.encode builds a new one (and a dict to detect cycles)
# for every line, which cost as much as the encoding itself. Same bytes as json.dumps(default=str);
# no cycle check (log values are flat: a cycle would end in RecursionError, and handleError).
_encode = c_make_encoder(None, str, encode_basestring_ascii, None, ": ", ", ", False, False, True) \
    if c_make_encoder is not None else None


class JsonFormatter(logging.Formatter):
    """One JSON object per line. Exception text is deliberately dropped: it may quote data."""

    _encoder = json.JSONEncoder(default=str)  # where the C encoder is missing
    _second = (None, "")  # (whole second, its text): records come in bursts within a second

    def _timestamp(self, record: logging.LogRecord) -> str:
        # 2026-12-01T07:34:29.123+00:00; strftime costs half of datetime's isoformat, and is made
        # once a second
        second = int(record.created)
        cached, text = self._second
        if cached != second:
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = (second, text)
        return f"{text}.{int(record.msecs):03d}+00:00"

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": self._timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            entry["exception"] = record.exc_info[0].__name__
        return "".join(_encode(entry, 0)) if _encode is not None else self._encoder.encode(entry)


class BatchingHandler(logging.Handler):
    """Appends records to a deque; one timer thread formats and writes them in batches.

    A plain StreamHandler makes request threads queue on its lock (each hand-off also waits for
    the GIL), and a background thread woken per record costs every request GIL hand-offs.
    Appending to a deque takes no lock, and the writer wakes a few times a second. Formatting a batch in a
    row, rather than one record in each request, keeps the formatter's code in the CPU's caches.
    A record is formatted when it is written, up to `interval` later: log constant messages with
    values in `extra` (as this service does), not mutable objects as arguments.
    """

    def __init__(self, stream, interval: float = 0.25, max_pending: int = 100_000):
        super().__init__()
        self.stream = getattr(stream, "buffer", stream)  # bytes go straight to the file
        self.interval = interval
        self._pending: deque = deque(maxlen=max_pending)
        self._write_lock = threading.Lock()
        self._stopped = threading.Event()
        self._start_writer()
        _open_handlers.add(self)

    def _start_writer(self):
        self._writer = threading.Thread(target=self._write_periodically, name="log-writer", daemon=True)
        self._writer.start()

    def _after_fork_in_child(self):
        # A forked worker has no writer thread; what was pending is the parent's to write.
        self._pending.clear()
        self._write_lock = threading.Lock()
        self._stopped = threading.Event()
        self._start_writer()

    def handle(self, record) -> bool:
        # No handler lock: deque.append is atomic.
        if self.filter(record):
            self.emit(record)
            return True
        return False

    def emit(self, record):
        self._pending.append(record)

    def flush(self):
        with self._write_lock:
            lines = []
            while self._pending:
                record = self._pending.popleft()
                try:
                    lines.append(self.format(record))
                except Exception:  # noqa: BLE001 - one bad record must not lose the batch
                    self.handleError(record)
            if lines:
                # One write for the batch: a line-buffered text stream (stderr is one) would make
                # a syscall per line, each giving up the GIL and queueing to get it back.
                self.stream.write(("\n".join(lines) + "\n").encode())
                self.stream.flush()

    def _write_periodically(self):
        while not self._stopped.wait(self.interval):
            try:
                self.flush()
            except (OSError, ValueError):
                pass

    def close(self):
        self._stopped.set()
        self.flush()
        super().close()


_open_handlers: "weakref.WeakSet[BatchingHandler]" = weakref.WeakSet()


def _before_fork():
    for handler in list(_open_handlers):
        handler._write_lock.acquire()  # no batch half-written across the fork


def _after_fork_in_parent():
    for handler in list(_open_handlers):
        handler._write_lock.release()


def _after_fork_in_child():
    for handler in list(_open_handlers):
        handler._after_fork_in_child()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)


class _DropRawPaths(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and "while serving" in record.msg:
            record.msg, record.args = record.msg.split(" %s")[0], ()
        return True


def configure_logging(level: str = "INFO", stream=None) -> logging.Handler:
    """JSON lines on stderr, written in batches (see BatchingHandler)."""
    handler = BatchingHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        if isinstance(existing, BatchingHandler):
            root.removeHandler(existing)
            existing.close()
    root.addHandler(handler)
    root.setLevel(level)
    # The logging HOWTO's optimisations: no caller lookup, thread or process names per record.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    # waitress logs the request line of a failed request; keep its own log terse.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    # and it names the raw path (which carries a key reference) when a client disconnects or a
    # request fails: keep the message, drop the path.
    waitress_log = logging.getLogger("waitress")
    if not any(isinstance(f, _DropRawPaths) for f in waitress_log.filters):
        waitress_log.addFilter(_DropRawPaths())
    return handler

