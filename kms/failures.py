"""A failure's log line: its cause, scrubbed of anything secret, and at most once per cause per
interval. Below everything that logs failures (the web layer, the audit sealer, the workers), so it
imports nothing of the KMS."""
import logging
import re
import threading
import time

# What a cause must never show: a URL's user:password@, a key=value password (libpq's DSN form),
# and anything long enough to be a key, token or hash (base64, base64url or hex runs).
_URL_CREDENTIALS = re.compile(r"(\w+://)[^/@\s]*@")
_PASSWORD_SETTING = re.compile(r"(password|passwd|pwd|secret|token|pin)(\s*[=:]\s*)('[^']*'|\"[^\"]*\"|\S+)",
                               re.IGNORECASE)
_LONG_OPAQUE = re.compile(r"[A-Za-z0-9_\-+/=]{24,}")
_SERVER_QUOTED = re.compile(r'"[^"]*"')
MAX_CAUSE = 300


def scrub(text: str) -> str:
    """The first line of `text`, without credentials, secrets or anything key-like, at most
    MAX_CAUSE characters."""
    lines = text.strip().splitlines()
    line = lines[0].strip() if lines else ""
    line = _URL_CREDENTIALS.sub(r"\1…@", line)
    line = _PASSWORD_SETTING.sub(r"\1\2…", line)
    line = _LONG_OPAQUE.sub("…", line)
    return line[:MAX_CAUSE]


def cause(error: BaseException) -> str:
    """Why something failed, for a log line: `Type: message`, the message scrubbed (`scrub`).
    libpq's own messages (a connection that failed) keep their first line, which names host and
    port; a message from the PostgreSQL server may quote the values of a statement, so its quoted
    parts are dropped (its SQLSTATE says what happened)."""
    name = type(error).__name__
    if hasattr(error, "format_message"):  # click's errors (ConfigError): written for the operator
        text = error.format_message()
    elif isinstance(error, OSError) and error.strerror:
        text = error.strerror if error.errno is None else f"[Errno {error.errno}] {error.strerror}"
    else:
        text = str(error)
    sqlstate = getattr(error, "pgcode", None)
    if sqlstate:
        text = f"SQLSTATE {sqlstate}: " + _SERVER_QUOTED.sub('"…"', text)
    text = scrub(text)
    return f"{name}: {text}" if text else name


class OncePer:
    """At most one log line per distinct cause per `interval_s`: `due(cause)` says whether to log
    now, and how many lines of that cause were held back since the last one (0 when none)."""

    def __init__(self, interval_s: float = 60.0, max_causes: int = 1000):
        self.interval_s = interval_s
        self.max_causes = max_causes
        self._last: dict = {}  # cause -> (when logged, held back since)
        self._lock = threading.Lock()

    def due(self, cause_text: str) -> int | None:
        """None: hold this one back; else log it, with this many held back before it."""
        now = time.monotonic()
        with self._lock:
            logged_at, held = self._last.get(cause_text, (None, 0))
            if logged_at is not None and now - logged_at < self.interval_s:
                self._last[cause_text] = (logged_at, held + 1)
                return None
            if len(self._last) >= self.max_causes:
                self._last.clear()  # bounded: a flood of distinct causes is logged, not remembered
            self._last[cause_text] = (now, 0)
            return held


def log_failure(logger: logging.Logger, level: int, message: str, error: BaseException, limiter: OncePer,
                **extra):
    """`message` with the error's cause, once per distinct cause per the limiter's interval (the
    line counts the ones held back: `repeated`)."""
    why = cause(error)
    held = limiter.due(f"{message}|{why}")
    if held is None:
        return
    if held:
        extra["repeated"] = held
    logger.log(level, message, extra={"error_code": type(error).__name__, "cause": why, **extra})
