"""PostgreSQL: the connection pool, a connection per request on `g`, transactions, named queries
from sql/queries/*.sql and numbered migrations from sql/migrations/.
"""
import operator
import queue
import re
import threading
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import psycopg2
import psycopg2.extensions
import psycopg2.extras
from flask import current_app, g

from kms.errors import ServiceUnavailable

# Installed, the SQL is package data (kms/sql); in a checkout it stands at the top.
SQL_DIR = next(path for path in (Path(__file__).resolve().parent / "sql", Path(__file__).resolve().parent.parent / "sql")
               if path.is_dir())
MIGRATIONS_DIR = SQL_DIR / "migrations"
QUERIES_DIR = SQL_DIR / "queries"
MIGRATION_LOCK_ID = 7_100_001  # pg_advisory_lock key shared by every KMS process

psycopg2.extras.register_uuid()

# Bound every wait on the server side so no request can hang behind another one.
SESSION_OPTIONS = (
    "-c statement_timeout=15000 -c lock_timeout=5000 -c idle_in_transaction_session_timeout=60000"
    " -c DateStyle=ISO"  # times read as text (the look-up's session expiry) parse as ISO 8601
)


class Connection(psycopg2.extensions.connection):
    """A psycopg2 connection that can carry the pool's bookkeeping."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kms_generation = 0
        self.kms_prepared = set()  # names of the statements prepared on this connection


def connect(dsn: str, *, options: str = SESSION_OPTIONS, application_name: str = "kms"):
    """A connection in autocommit mode: transactions are explicit (see transaction()), and a single
    statement needs no BEGIN/COMMIT round trips at all. Rows come back as named tuples, named by
    the query's columns: code reads `row.current_version`, never a position."""
    conn = psycopg2.connect(dsn, connect_timeout=3, options=options, application_name=application_name,
                            connection_factory=Connection, cursor_factory=psycopg2.extras.NamedTupleCursor)
    conn.autocommit = True
    # A server in recovery (a standby, or a demoted primary a stale DNS answer still points at)
    # cannot take our writes: never lend it out. With several hosts and
    # target_session_attrs=read-write, libpq already skips such servers.
    with conn.cursor() as cur:
        cur.execute("SELECT pg_is_in_recovery()")
        in_recovery = cur.fetchone()[0]
    if in_recovery:
        conn.close()
        raise ReadOnlyDatabase("the database server is a read-only standby")
    return conn


class ReadOnlyDatabase(psycopg2.OperationalError):
    """Connected to a server that accepts no writes: as good as no database (503)."""


class ConnectionPool:
    """A fixed-size pool: `size` connections at most, opened up front and kept open.

    (psycopg2's ThreadedConnectionPool closes every connection returned above minconn, which
    costs a connect per request under load.) Free slots are a stack, each slot a connection or
    None (not connected yet), counted by a queue of as many tokens: waiting for a slot is one
    C-level queue operation. Last in, first out, as PgBouncer does by default: under light load
    the connections used last serve the next requests, and their server processes are still warm
    in the CPU's caches. (First in, first out spread one-at-a-time look-ups over all 16 server
    processes.) After the database goes away, connections are replaced as they are found broken,
    and the idle ones of the old generation with them, so the service heals without a restart.
    """

    def __init__(self, dsn: str, size: int, acquire_timeout: float = 5.0):
        self.dsn = dsn
        self.size = size
        self.acquire_timeout = acquire_timeout
        self._free: deque = deque()
        self._tokens: queue.SimpleQueue = queue.SimpleQueue()  # one per slot on the stack
        self.waiting = 0
        self._waiting_lock = threading.Lock()
        for _ in range(size):
            self._push(None)
        self._generation = 0

    def _push(self, conn):
        self._free.append(conn)  # before its token, so a token always finds a slot
        self._tokens.put(True)

    def _pop(self, timeout: float):
        try:
            self._tokens.get_nowait()
        except queue.Empty:  # the slow path counts who waits, for /metrics
            with self._waiting_lock:
                self.waiting += 1
            try:
                self._tokens.get(timeout=timeout)
            finally:
                with self._waiting_lock:
                    self.waiting -= 1
        return self._free.pop()

    @property
    def in_use(self) -> int:
        return self.size - self._tokens.qsize()

    def warm(self):
        """Open every connection now (min = max), so the first requests pay no connect."""
        connections = [self.acquire() for _ in range(self.size)]
        for conn in connections:
            self.release(conn)

    def acquire(self, patience: float = 0.0):
        """A connection; opening one may keep failing for up to `patience` seconds (a failover in
        progress) before the error is raised."""
        try:
            conn = self._pop(self.acquire_timeout)
        except queue.Empty:
            raise ServiceUnavailable("The server is busy; retry shortly.") from None
        if conn is not None and (conn.closed or conn.kms_generation != self._generation):
            conn.close()
            conn = None
        if conn is None:
            try:
                conn = self._connect_within(patience)
            except BaseException:
                self._push(None)
                raise
            conn.kms_generation = self._generation
        return conn

    def _connect_within(self, patience: float):
        deadline = time.monotonic() + patience
        pause = 0.1
        while True:
            try:
                return connect(self.dsn)
            except psycopg2.OperationalError:
                if time.monotonic() + pause > deadline:
                    raise
                time.sleep(pause)
                pause = min(pause * 2, 1.0)

    def release(self, conn):
        try:
            if not conn.closed and conn.info.transaction_status != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
                with conn.cursor() as cur:
                    cur.execute("ROLLBACK")
        except psycopg2.Error:
            pass
        if conn.closed:
            # One broken connection means the server went away: retire its siblings too.
            if conn.kms_generation == self._generation:
                self._generation += 1
            conn = None
        self._push(conn)

    def close(self):
        for _ in range(self.size):
            try:
                conn = self._pop(self.acquire_timeout)
            except queue.Empty:
                return
            if conn is not None:
                conn.close()

    @contextmanager
    def connection(self):
        conn = self.acquire()
        try:
            yield conn
        finally:
            self.release(conn)


# How long a key look-up waits for a database to connect to (a failover or switchover in
# progress) before it answers 503: reads ride through; writes answer 503 at once.
LOOKUP_PATIENCE_S = 10.0


def get_db(patience: float = 0.0):
    """The request's connection, taken from the pool on first use."""
    request_globals = g._get_current_object()  # one context-local hop, not three
    conn = request_globals.get("db")
    if conn is None:
        conn = request_globals.db = current_app.extensions["kms"].pool.acquire(patience)
    return conn


def replace_broken_connection(conn):
    """The request's connection broke (the server went away, or a failover ended its session):
    give it back (the pool retires it and its siblings) and take a fresh one, which libpq opens to
    whichever listed host now accepts writes."""
    request_globals = g._get_current_object()
    pool = current_app.extensions["kms"].pool
    if request_globals.get("db") is conn:
        request_globals.db = None
    pool.release(conn)
    request_globals.db = pool.acquire(LOOKUP_PATIENCE_S)
    return request_globals.db


def is_broken(conn, error: BaseException) -> bool:
    """A connection-level failure (not a statement's own: a time-out leaves the session usable)."""
    return isinstance(error, (psycopg2.OperationalError, psycopg2.InterfaceError)) and bool(conn.closed)


def close_db(_error=None):
    conn = g.pop("db", None)
    if conn is not None:
        current_app.extensions["kms"].pool.release(conn)


class _TransactionCursor(psycopg2.extras.NamedTupleCursor):
    """A cursor that saves round trips: its first statement carries the BEGIN, and statements
    whose result nobody reads (`defer`) travel with the next one, or with the COMMIT. Each round
    trip ends with the server thread queueing for the GIL, so fewer round trips means less
    waiting (a login makes five)."""
    begin_pending = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._deferred: list[bytes] = []
        # Rows changed past their first revision and not yet named by an audit event (kms.rows):
        # the transaction does not commit while one is left.
        self.row_changes: list[str] = []
        # Called once the transaction has committed (never when it rolls back).
        self.after_commit: list = []

    def defer(self, query: str, vars=None):
        """Send `query` in the same round trip as the block's next statement (or its COMMIT), in
        order. Each statement of that trip runs on its own snapshot, as if sent alone, and an
        error in any of them fails that execute() and rolls the whole transaction back."""
        self._deferred.append(self.mogrify(query, vars))

    def execute(self, query, vars=None):
        if not self.begin_pending and not self._deferred:
            return super().execute(query, vars)
        pieces = [b"BEGIN"] if self.begin_pending else []
        pieces += self._deferred
        self.begin_pending, self._deferred = False, []
        # Each piece is interpolated on its own: a value in one is never read as a placeholder.
        return super().execute(b"\n; ".join(pieces + [self.mogrify(query, vars)]))

    def discard_deferred(self):
        self._deferred = []

    @property
    def has_work(self) -> bool:
        """Something was sent (a transaction is open) or is waiting to be."""
        return not self.begin_pending or bool(self._deferred)


class UnrecordedChange(RuntimeError):
    """A transaction changed a MAC'd row without an audit event recording it: a defect, so the
    change is rolled back rather than committed unbound to the audit chain."""


@contextmanager
def transaction(conn):
    """One transaction: commit when the block ends, roll back on any error (a failed COMMIT
    included: deferred statements run there)."""
    with conn.cursor(cursor_factory=_TransactionCursor) as cur:
        cur.begin_pending = True
        try:
            yield cur
            if cur.row_changes:
                raise UnrecordedChange(f"a change of {len(cur.row_changes)} row(s) that no audit event records")
            if cur.has_work:  # a block that ran no statement began nothing
                cur.execute("COMMIT")
            for committed in cur.after_commit:
                committed()
        except BaseException:
            cur.discard_deferred()
            if not cur.begin_pending and not conn.closed:
                try:
                    cur.execute("ROLLBACK")
                except psycopg2.Error:
                    pass  # the connection broke; the pool replaces it
            raise


_PARAMETER = re.compile(r"%\((\w+)\)s")


class Queries:
    """Named queries from sql/queries/*.sql, marked `-- name: query_name`."""

    def __init__(self, directory: Path = QUERIES_DIR):
        self._sql = {}
        self._prepared = {}
        for path in sorted(directory.glob("*.sql")):
            for match in re.finditer(r"^-- name: (\w+)\n(.*?)(?=^-- name: |\Z)", path.read_text(), re.M | re.S):
                name, body = match.group(1), match.group(2).strip().rstrip(";")
                if name in self._sql:
                    raise RuntimeError(f"query {name} is defined twice")
                self._sql[name] = body

    def __getattr__(self, name: str) -> str:
        try:
            return self._sql[name]
        except KeyError:
            raise AttributeError(f"no query named {name}") from None

    def prepared(self, name: str) -> tuple[str, str, Callable[[dict], tuple]]:
        """(PREPARE statement, EXECUTE template, params dict -> values in order) for a named query."""
        if name not in self._prepared:
            self._prepared[name] = self._prepare(name)
        return self._prepared[name]

    def _prepare(self, name: str) -> tuple[str, str, Callable[[dict], tuple]]:
        names: list[str] = []

        def positional(match):
            if match.group(1) not in names:
                names.append(match.group(1))
            return f"${names.index(match.group(1)) + 1}"

        body = _PARAMETER.sub(positional, getattr(self, name))
        placeholders = ", ".join(["%s"] * len(names))
        execute = f"EXECUTE {name} ({placeholders})" if names else f"EXECUTE {name}"
        return f"PREPARE {name} AS {body}", execute, _values_in_order(names)


def _values_in_order(names: list[str]) -> Callable[[dict], tuple]:
    """params -> (params[names[0]], params[names[1]], ...), by operator.itemgetter (in C)."""
    if len(names) > 1:
        return operator.itemgetter(*names)
    return lambda params: tuple(params[name] for name in names)


sql = Queries()


def execute_prepared(cur, name: str, params: dict, *, prefix: str = "", suffix: str = "", defer: bool = False):
    """Run a named query as a server-side prepared statement, for the hot path: PostgreSQL plans
    it once per connection instead of on every request. `prefix` and `suffix` (other statements)
    travel in the same round trip; the cursor holds the result of the last statement. `defer`:
    send it with the transaction's next statement (see _TransactionCursor.defer)."""
    prepare, execute, values = sql.prepared(name)
    if name not in cur.connection.kms_prepared:
        cur.execute(prepare)
        cur.connection.kms_prepared.add(name)
    if defer:
        cur.defer(prefix + execute + suffix, values(params))
    else:
        cur.execute(prefix + execute + suffix, values(params))


def migration_files() -> list[tuple[int, str, Path]]:
    found = []
    for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
        match = re.fullmatch(r"(\d+)_(\w+)\.sql", path.name)
        if match:
            found.append((int(match.group(1)), match.group(2), path))
    return found


def latest_schema_version() -> int:
    return max(version for version, _, _ in migration_files())


class MigrationNeedsSecrets(RuntimeError):
    """A migration has a step that needs the service's secrets, and stored rows to apply it to."""


def migrate(dsn: str, steps: dict | None = None) -> list[str]:
    """Apply pending migrations in order, each in its own transaction; returns what was applied.

    An advisory lock makes concurrent start-ups take turns: the second one finds nothing left to do.
    A migration whose first line is `-- then: NAME` runs `steps[NAME](cursor)` after its SQL, in its
    transaction (for work that needs the service's secrets, like computing row MACs); without the
    step it may only run on a database with no rows for the step to do.
    """
    applied = []
    conn = connect(dsn, options="-c lock_timeout=0 -c statement_timeout=0", application_name="kms-migrate")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_ID,))
            try:
                cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
                if not cur.fetchone()[0]:  # asked first: a server role without CREATE may start too
                    cur.execute(
                        "CREATE TABLE schema_migrations ("
                        " version integer PRIMARY KEY, name text NOT NULL,"
                        " applied_at timestamptz NOT NULL DEFAULT now())"
                    )
                cur.execute("SELECT version FROM schema_migrations")
                done = {row[0] for row in cur.fetchall()}
                for version, name, path in migration_files():
                    if version in done:
                        continue
                    text = path.read_text()
                    step = re.match(r"-- then: (\w+)\n", text)
                    with transaction(conn) as tx:
                        tx.execute(text)
                        if step:
                            _run_step(tx, step.group(1), steps or {}, f"{version:03d}_{name}")
                        tx.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (version, name))
                    applied.append(f"{version:03d}_{name}")
            finally:
                cur.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_ID,))
    finally:
        conn.close()
    return applied


def _run_step(cur, name: str, steps: dict, migration: str):
    if name in steps:
        steps[name](cur)
        return
    cur.execute(sql.rows_needing_macs)
    if cur.fetchone()[0]:
        raise MigrationNeedsSecrets(f"migration {migration} needs the service's secrets: start the KMS (or run "
                                    "`flask --app app kms migrate`) with its configuration")


def schema_version_if_any(conn) -> int:
    """0 on a database never migrated."""
    with transaction(conn) as cur:
        cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
        if not cur.fetchone()[0]:
            return 0
    return schema_version(conn)


def schema_version(conn) -> int:
    with transaction(conn) as cur:
        cur.execute("SELECT coalesce(max(version), 0) FROM schema_migrations")
        return cur.fetchone()[0]
