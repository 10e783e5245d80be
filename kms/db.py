"""PostgreSQL: the connection pool, a connection per request on `g`, transactions, named queries
from sql/queries/*.sql and numbered migrations from sql/migrations/.
"""
import queue
import re
import threading
from contextlib import contextmanager
from pathlib import Path

import psycopg2
import psycopg2.extensions
import psycopg2.extras
from flask import current_app, g

from kms.errors import ServiceUnavailable

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
MIGRATIONS_DIR = SQL_DIR / "migrations"
QUERIES_DIR = SQL_DIR / "queries"
MIGRATION_LOCK_ID = 7_100_001  # pg_advisory_lock key shared by every KMS process

psycopg2.extras.register_uuid()

# Bound every wait on the server side so no request can hang behind another one.
SESSION_OPTIONS = "-c statement_timeout=15000 -c lock_timeout=5000 -c idle_in_transaction_session_timeout=60000"


class Connection(psycopg2.extensions.connection):
    """A psycopg2 connection that can carry the pool's bookkeeping."""
    kms_generation = 0


def connect(dsn: str, *, options: str = SESSION_OPTIONS, application_name: str = "kms"):
    return psycopg2.connect(dsn, connect_timeout=3, options=options, application_name=application_name,
                            connection_factory=Connection)


class ConnectionPool:
    """A fixed-size pool: `size` connections at most, opened up front and kept open.

    (psycopg2's ThreadedConnectionPool closes every connection returned above minconn, which
    costs a connect per request under load.) After the database goes away, connections are
    replaced as they are found broken, and the idle ones of the old generation with them, so the
    service heals without a restart.
    """

    def __init__(self, dsn: str, size: int, acquire_timeout: float = 5.0):
        self.dsn = dsn
        self.size = size
        self.acquire_timeout = acquire_timeout
        self._slots = threading.BoundedSemaphore(size)
        self._idle: queue.LifoQueue = queue.LifoQueue()
        self._generation = 0
        self._lock = threading.Lock()

    def warm(self):
        """Open every connection now (min = max), so the first requests pay no connect."""
        connections = [self.acquire() for _ in range(self.size)]
        for conn in connections:
            self.release(conn)

    def _connect(self):
        conn = connect(self.dsn)
        conn.kms_generation = self._generation
        return conn

    def acquire(self):
        if not self._slots.acquire(timeout=self.acquire_timeout):
            raise ServiceUnavailable("The server is busy; retry shortly.")
        try:
            while True:
                try:
                    conn = self._idle.get_nowait()
                except queue.Empty:
                    return self._connect()
                if conn.closed or conn.kms_generation != self._generation:
                    conn.close()
                    continue
                return conn
        except BaseException:
            self._slots.release()
            raise

    def release(self, conn):
        try:
            if not conn.closed and conn.info.transaction_status != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
                conn.rollback()
        except psycopg2.Error:
            pass
        if conn.closed:
            with self._lock:
                # One broken connection means the server went away: retire its siblings too.
                if conn.kms_generation == self._generation:
                    self._generation += 1
        else:
            self._idle.put(conn)
        self._slots.release()

    def close(self):
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return

    @contextmanager
    def connection(self):
        conn = self.acquire()
        try:
            yield conn
        finally:
            self.release(conn)


def get_db():
    """The request's connection, taken from the pool on first use."""
    if "db" not in g:
        g.db = current_app.extensions["kms"].pool.acquire()
    return g.db


def close_db(_error=None):
    conn = g.pop("db", None)
    if conn is not None:
        current_app.extensions["kms"].pool.release(conn)


@contextmanager
def transaction(conn):
    """One transaction: commit when the block ends, roll back on any error."""
    try:
        with conn.cursor() as cur:
            yield cur
        conn.commit()
    except BaseException:
        if not conn.closed:
            conn.rollback()
        raise


class Queries:
    """Named queries from sql/queries/*.sql, marked `-- name: query_name`."""

    def __init__(self, directory: Path = QUERIES_DIR):
        self._sql = {}
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


sql = Queries()


def migration_files() -> list[tuple[int, str, Path]]:
    found = []
    for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
        match = re.fullmatch(r"(\d+)_(\w+)\.sql", path.name)
        if match:
            found.append((int(match.group(1)), match.group(2), path))
    return found


def latest_schema_version() -> int:
    return max(version for version, _, _ in migration_files())


def migrate(dsn: str) -> list[str]:
    """Apply pending migrations in order, each in its own transaction; returns what was applied.

    An advisory lock makes concurrent start-ups take turns: the second one finds nothing left to do.
    """
    applied = []
    conn = connect(dsn, options="-c lock_timeout=0 -c statement_timeout=0", application_name="kms-migrate")
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_ID,))
            try:
                cur.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    " version integer PRIMARY KEY, name text NOT NULL,"
                    " applied_at timestamptz NOT NULL DEFAULT now())"
                )
                cur.execute("SELECT version FROM schema_migrations")
                done = {row[0] for row in cur.fetchall()}
                for version, name, path in migration_files():
                    if version in done:
                        continue
                    conn.autocommit = False
                    with transaction(conn) as tx:
                        tx.execute(path.read_text())
                        tx.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (version, name))
                    conn.autocommit = True
                    applied.append(f"{version:03d}_{name}")
            finally:
                conn.autocommit = True
                cur.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_ID,))
    finally:
        conn.close()
    return applied


def schema_version(conn) -> int:
    with transaction(conn) as cur:
        cur.execute("SELECT coalesce(max(version), 0) FROM schema_migrations")
        return cur.fetchone()[0]
