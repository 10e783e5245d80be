"""Fixtures: a real PostgreSQL (TEST_DATABASE_URL, or a private throwaway server), a KMS app and
a real HTTP server (waitress on a free port) to send real requests to.

The app and its server are shared by the whole session: before each test that uses them (`app`,
`client`, `auth`, `live_server`, `runner`), the database's rows are put back as they were right
after the app started (the first admin, the secrets' check values, its audit event), so every test
starts from the same state. A test that needs an app of its own asks make_app() for one (with
settings of its own) or is marked own_app (it reads the app's metrics, floods its login places);
another_app() makes a second app over the shared one's database, as a second server process."""
import http.client
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest
import requests
from prometheus_client.mmap_dict import MmapedDict

from kms.app import create_app
from kms.auth import passwords
from kms.cli import kms_cli
from kms.config import SECRET_VARIABLES, generate_secret
from kms.observability.logs import JsonFormatter
from kms.serving.http import create_server
from kms.serving.throwaway_postgres import _free_port

ROOT = Path(__file__).resolve().parent.parent  # the checkout
KMS_COMMAND = str(Path(sys.executable).parent / "kms")  # the console script `pip install` made
ADMIN_NAME = "root-admin"
ADMIN_PASSWORD = "Root-admin-passw0rd"
CLIENT_PASSWORD = "Client-passw0rd!"
WRONG_PASSWORD = "Wrong-passw0rd!"
APP_TABLES = ("clients, sessions, signup_tokens, login_failures, keys, key_versions, secret_checks, audit_events, "
              "legacy_signup_tokens_used, import_sources, imported_clients, imported_keys, audit_chain_state, kek_holders, "
              "grants")


# What kms.auth.passwords hashes with: OWASP's Argon2id parameters.
REAL_PASSWORD_HASHING = {"MEMORY_KIB": passwords.MEMORY_KIB, "ITERATIONS": passwords.ITERATIONS}


@pytest.fixture(scope="session", autouse=True)
def cheap_password_hashing():
    """Argon2id at its lowest cost (8 KiB, one pass) in this process. Nearly every test signs up and
    logs in, and at OWASP's cost each hash took a core for 25 ms to 100 ms; the PHC string records
    the cost, so hashes of either cost verify alike. Tests of hashing itself (its parameters, its
    timing, floods of logins) are marked real_password_hashing and hash at the real cost, and so do
    servers started as processes of their own."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(passwords, "MEMORY_KIB", 8)
        patch.setattr(passwords, "ITERATIONS", 1)
        yield


@pytest.fixture(autouse=True)
def password_hashing_as_marked(request, monkeypatch):
    """OWASP's cost again, for a test marked real_password_hashing (set before its app is made)."""
    if request.node.get_closest_marker("real_password_hashing"):
        for name, value in REAL_PASSWORD_HASHING.items():
            monkeypatch.setattr(passwords, name, value)


def bare_env(**settings) -> dict:
    """The environment of a shell with nothing of ours configured, plus `settings`: for running
    the KMS's commands as a user would."""
    env = {name: value for name, value in os.environ.items()
           if name in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "SYSTEMROOT")}
    # Not the default file in the working directory, which every test's database would share: a
    # test that serves names a file of its own (ServerProcess does).
    env["AUDIT_HEAD_FILE"] = "off"
    env.update(settings)
    return env


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


def create_database(server_url: str, name: str) -> str:
    conn = psycopg2.connect(server_url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')  # a generated name, never input
    conn.close()
    return with_database(server_url, name)


def drop_database(server_url: str, name: str):
    conn = psycopg2.connect(server_url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()


@pytest.fixture(scope="session")
def pg_server():
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield url
        return
    from kms.serving.throwaway_postgres import ThrowawayPostgres
    server = ThrowawayPostgres().start()
    try:
        yield server.dsn
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def new_database(pg_server):
    """Make a fresh, empty database; all are dropped at the end of the session."""
    made = []

    def make() -> str:
        name = f"kms_test_{uuid.uuid4().hex[:12]}"
        made.append(name)
        return create_database(pg_server, name)

    yield make
    for name in made:
        drop_database(pg_server, name)


@pytest.fixture(scope="session")
def database_url(new_database):
    return new_database()


@pytest.fixture(scope="session")
def secrets_env():
    return {name: generate_secret() for name in SECRET_VARIABLES}


@pytest.fixture(scope="session")
def base_env(database_url, secrets_env):
    return {
        **secrets_env,
        "DATABASE_URL": database_url,
        "SERVER_THREADS": "4",
        "MASTER_ADMIN_USERNAME": ADMIN_NAME,
        "MASTER_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "AUDIT_SEAL_INTERVAL": "0",
        "AUDIT_HEAD_FILE": "off",  # a test that needs one names its own
        # Tests read the metrics right after what they count, and send many tokenless requests
        # from one address; tests/test_floods.py turns both defenses back on and attacks them.
        "PROBE_CACHE": "0",
        "SERVER_UNVERIFIED_RATE": "0",
    }


def clear_tables(database_url: str):
    conn = psycopg2.connect(database_url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT to_regclass('clients') IS NOT NULL")
            if cur.fetchone()[0]:
                # audit_events is append-only (a trigger); a superuser's replica role bypasses it.
                cur.execute("SET session_replication_role = replica")
                cur.execute(f"TRUNCATE {APP_TABLES} RESTART IDENTITY CASCADE")
                # As migration 007 leaves it: no chain started; the app signs it when it starts.
                cur.execute("INSERT INTO audit_chain_state (started) VALUES (false)")
    finally:
        conn.close()


def new_app(env: dict, **overrides):
    app = create_app({**env, **{k: str(v) for k, v in overrides.items()}})
    app.config["TESTING"] = True
    app.cli.add_command(kms_cli)  # `kms ...` commands through app.test_cli_runner(), on this app's KMS
    return app


def close_app(app):
    """Close the app's pool, once (a second close would wait for connections that never come back)."""
    kms = app.extensions.pop("kms", None)
    if kms is not None:
        kms.close()


USES_SHARED_APP = pytest.StashKey[bool]()


@pytest.fixture
def make_app(request, base_env):
    """Build apps against the test database, emptied first (at the first call); closed at the end
    of the test. Not in a test that uses the shared app: another_app() builds over its rows."""
    apps = []

    def make(**overrides):
        if request.node.stash.get(USES_SHARED_APP, False):
            raise pytest.UsageError("make_app() would empty the shared app's database: use another_app()")
        if not apps:
            clear_tables(base_env["DATABASE_URL"])
        app = new_app(base_env, **overrides)
        apps.append(app)
        return app

    yield make
    for app in apps:
        close_app(app)


@pytest.fixture
def another_app(app, base_env):
    """Build further apps over the database of this test's app, rows kept, as another server
    process would (with settings of their own); closed at the end of the test."""
    apps = []

    def make(**overrides):
        other = new_app({**base_env, "DATABASE_URL": app.extensions["kms"].settings.database_url}, **overrides)
        apps.append(other)
        return other

    yield make
    for other in apps:
        close_app(other)


class SharedApp:
    """The app and server the tests share, and the database rows it had right after it started."""

    def __init__(self, app, database_url: str):
        self.app = app
        self.server, self.base_url = serve_in_thread(app)
        app.config["TEST_SERVER_URL"] = self.base_url
        # The rows as they are now, kept in temporary tables of a connection of its own.
        self._conn = psycopg2.connect(database_url)
        tables = [table.strip() for table in APP_TABLES.split(",")]
        restore = ["SET LOCAL session_replication_role = replica"]  # past audit_events' triggers
        restore += [f"DELETE FROM {table}" for table in tables]
        with self._conn, self._conn.cursor() as cur:
            for table in tables:
                # Columns the database fills in with the writing transaction's id (audit_events.txid)
                # get the restoring transaction's, as the rows of a newly started app would have
                # one just older than the test's: a row kept with its first id would make the
                # sealer meet transaction ids of several digit counts, which it chains in text order.
                cur.execute("SELECT string_agg(quote_ident(column_name), ', ' ORDER BY ordinal_position) "
                            "FROM information_schema.columns WHERE table_schema = 'public' AND table_name = %s "
                            "AND coalesce(column_default, '') NOT LIKE 'pg_current_xact_id()%%'", (table,))
                columns = cur.fetchone()[0]
                cur.execute(f"CREATE TEMPORARY TABLE kept_{table} AS SELECT {columns} FROM {table}")
                if cur.rowcount:
                    restore.append(f"INSERT INTO {table} ({columns}) OVERRIDING SYSTEM VALUE "
                                   f"SELECT {columns} FROM kept_{table}")
            cur.execute("SELECT format('SELECT setval(%L, %s, %L)', schemaname || '.' || sequencename, "
                        "coalesce(last_value, start_value), last_value IS NOT NULL) FROM pg_sequences "
                        "WHERE schemaname = 'public'")
            restore += [row[0] for row in cur.fetchall()]
        self._restore = ";\n".join(restore)

    def reset(self):
        """Every row of the app's tables as it was when the app had started, sequences too."""
        with self._conn, self._conn.cursor() as cur:
            cur.execute(self._restore)
        # The rows put back are older copies of rows a test may have changed: forgotten, as a
        # newly started app would not know of the changes either.
        self.app.extensions["kms"].revisions.forget_all()

    def close(self):
        stop_server(self.server)
        self._conn.close()
        close_app(self.app)


@pytest.fixture(scope="session")
def shared_app(base_env):
    clear_tables(base_env["DATABASE_URL"])
    shared = SharedApp(new_app(base_env), base_env["DATABASE_URL"])
    yield shared
    shared.close()


@pytest.fixture
def app(request):
    """This test's app: the shared one, its rows put back as they were when it started; or, for a
    test marked own_app (with the settings the marker names, if any) or real_password_hashing, one
    of its own (see make_app)."""
    own = request.node.get_closest_marker("own_app")
    if own or request.node.get_closest_marker("real_password_hashing"):
        return request.getfixturevalue("make_app")(**(own.kwargs if own else {}))
    shared = request.getfixturevalue("shared_app")
    request.node.stash[USES_SHARED_APP] = True
    shared.reset()
    return shared.app


class HttpClient(requests.Session):
    """requests against a live server, with paths relative to its base URL."""

    def __init__(self, base_url: str):
        super().__init__()
        self.base_url = base_url

    def request(self, method, url, *args, **kwargs):
        kwargs.setdefault("timeout", 30)
        return super().request(method, self.base_url + url, *args, **kwargs)


def serve_in_thread(app, threads: int = 8):
    """waitress on a free port, in a thread that runs the server's loop one pass at a time (as
    kms.serving.server does), so that stop_server() can end it and close every socket from that
    same thread."""
    server = create_server(app, app.extensions["kms"].settings, host="127.0.0.1", port=0, threads=threads)
    server.kms_stop = threading.Event()

    def run():
        while not server.kms_stop.is_set():
            server.poll(0.05)
        server.task_dispatcher.shutdown(timeout=5)
        for dispatcher in list(server._map.values()):
            dispatcher.close()

    server.kms_thread = threading.Thread(target=run, daemon=True)
    server.kms_thread.start()
    return server, f"http://127.0.0.1:{server.effective_port}"


def stop_server(server):
    """Stop a test server for good: workers, listening socket and every open connection (left to
    the garbage collector, those would surface later as unclosed-socket warnings)."""
    server.kms_stop.set()
    server.kms_thread.join(timeout=10)


@pytest.fixture
def live_server(app):
    """The base URL of a server for this test's app: the shared server, or one of its own."""
    if "TEST_SERVER_URL" in app.config:
        yield app.config["TEST_SERVER_URL"]
        return
    server, base_url = serve_in_thread(app)
    yield base_url
    stop_server(server)


@pytest.fixture
def client(live_server):
    with HttpClient(live_server) as session:
        yield session


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def tamper(db, statement, params=None):
    """Run `statement` on the connection `db` as a database writer who also got past the triggers
    (a superuser's replica role) would; returns the rows it returns, if any."""
    with db.cursor() as cur:
        cur.execute("SET session_replication_role = replica")
        cur.execute(statement, params)
        return cur.fetchall() if cur.description else None


def envelope(response, status: int, code: str | None = None) -> dict:
    """Assert that `response` is an error answer with `status`, in the envelope every error has:
    error, message and requestId, the id the X-Request-ID header carries (and `code` as its error,
    if given). Returns the body."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) >= {"error", "message", "requestId"}
    assert body["requestId"] == response.headers["X-Request-ID"]
    if code:
        assert body["error"] == code
    return body


class AuthActions:
    def __init__(self, client: HttpClient):
        self._client = client
        self._admin_token = None

    def login(self, clientname: str, password: str) -> str:
        response = self._client.post("/auth/login", json={"clientname": clientname, "password": password})
        assert response.status_code == 200, response.text
        return response.json()["token"]

    @property
    def admin_token(self) -> str:
        if self._admin_token is None:
            self._admin_token = self.login(ADMIN_NAME, ADMIN_PASSWORD)
        return self._admin_token

    def signup_token(self, clientname: str) -> str:
        response = self._client.post("/auth/signup/generate", json={"clientname": clientname},
                                     headers=bearer(self.admin_token))
        assert response.status_code == 200, response.text
        return response.json()["token"]

    def new_client(self, clientname: str | None = None, password: str = CLIENT_PASSWORD) -> str:
        """Register a client through the API and return its access token."""
        clientname = clientname or f"svc-{uuid.uuid4().hex[:8]}"
        response = self._client.post("/auth/signup", json={"token": self.signup_token(clientname),
                                                          "password": password})
        assert response.status_code == 200, response.text
        return response.json()["token"]

    def client_id(self, clientname: str) -> str:
        response = self._client.get("/clients", headers=bearer(self.admin_token))
        return next(c["id"] for c in response.json()["clients"] if c["clientname"] == clientname)


@pytest.fixture
def auth(client):
    return AuthActions(client)


@pytest.fixture
def db(database_url):
    """A direct connection to the test database, for looking at (and tampering with) rows."""
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    yield conn
    conn.close()


@pytest.fixture
def captured_logs():
    """Everything the server logs during the test, as the JSON lines it writes (the test's own
    HTTP client, urllib3, logs the URLs it requests: that is the caller's side, left out)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(lambda record: not record.name.startswith("urllib3"))
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield stream
    root.removeHandler(handler)
    root.setLevel(previous)


@pytest.fixture
def auth_for():
    """Run `action(client, token)` as a new client against a live server for `app`."""
    def run(app, action):
        server, base_url = serve_in_thread(app, threads=2)
        try:
            with HttpClient(base_url) as http:
                return action(http, AuthActions(http).new_client())
        finally:
            stop_server(server)
    return run


class ServerProcess:
    """`kms serve` in a process of its own, on a free port."""

    def __init__(self, env: dict, tmp_path: Path, workers: int = 1):
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.tmp_path = tmp_path
        environment = bare_env()
        environment.update(env, SERVER_PORT=str(self.port), TMPDIR=str(tmp_path))
        if env.get("AUDIT_HEAD_FILE") is None:
            environment["AUDIT_HEAD_FILE"] = str(tmp_path / "audit-head")
        self.log = open(tmp_path / f"server-{self.port}.log", "w")
        self.process = subprocess.Popen([KMS_COMMAND, "serve", "--workers", str(workers)], env=environment,
                                        stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 60
        while True:
            assert self.process.poll() is None, (tmp_path / f"server-{self.port}.log").read_text()
            try:
                if requests.get(self.base + "/readyz", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.1)
        if workers > 1:
            self.wait_for_workers(workers)
            # and each serving: a worker samples its pool into the metrics as it starts its loop
            threads = int(env.get("SERVER_THREADS", "16"))
            while metric(self.base, "kms_db_pool_connections") != workers * threads:
                assert time.monotonic() < deadline + 30, "the workers did not all start serving"
                time.sleep(0.1)

    def children(self, named: str) -> list[int]:
        found = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    fields = (proc / "stat").read_text().rsplit(") ", 1)[1].split()
                    comm = (proc / "comm").read_text().strip()
                except OSError:
                    continue
                if int(fields[1]) == self.process.pid and fields[0] != "Z" and comm.startswith(named):
                    found.append(int(proc.name))
        return sorted(found)

    def workers(self) -> list[int]:
        return self.children("kms-worker-")

    def wait_for_workers(self, count: int, exclude=(), timeout=30) -> list[int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = self.workers()
            if len(pids) == count and not set(pids) & set(exclude):
                return pids
            time.sleep(0.1)
        raise AssertionError(f"workers: {self.workers()}")

    def metrics_dir(self) -> Path:
        return next(self.tmp_path.glob("kms-metrics-*"))

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def metric(base: str, line_start: str) -> float:
    for line in requests.get(base + "/metrics", timeout=10).text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def served_by_pid(metrics_dir: Path, route: str) -> dict[int, float]:
    """Requests to `route` each worker counted, read from their own metric files."""
    counts = {}
    for path in metrics_dir.glob("counter_*.db"):
        if not path.stem.split("_")[1].isdigit():  # what dead workers counted, merged
            continue
        pid = int(path.stem.split("_")[1])
        for key, value, *_rest in MmapedDict.read_all_values_from_file(str(path)):
            if key.startswith('["kms_http_requests"') and f'"route": "{route}"' in key:
                counts[pid] = counts.get(pid, 0) + value
    return counts


def post_from(base_url: str, source: str, path: str, body: dict) -> int:
    """POST `body` as JSON from another loopback address (Linux answers all of 127/8), on a
    connection of its own: the answer's status."""
    host, port = base_url.rsplit("/", 1)[1].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30, source_address=(source, 0))
    try:
        connection.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def closed_by_peer(sock) -> bool:
    """Whether the server closed this connection (without blocking to find out)."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)
