"""A restore from backup is a documented, audited path: served with the head file of the servers
that kept running, the restored chain is flagged (a restore looks exactly like a rollback), and
`kms audit acknowledge --head` with the head recorded at backup time re-anchors it; sealing
resumes. pg_dump and psql do the backup and the restore, as docs/DEPLOYMENT.md says."""
import re
import shutil
import subprocess
import time
import uuid

import psycopg2

from kms.serving.throwaway_postgres import _binaries
from tests.conftest import with_database


def tool(name: str) -> str:
    """The newest client there is (the embedded server's, or the system's): pg_dump refuses a
    server newer than itself; psql runs an older server's dump as it is."""
    try:
        bundled = _binaries() / name
        if bundled.exists():
            return str(bundled)
    except Exception:  # noqa: BLE001 - no embedded binaries: the system's
        pass
    return shutil.which(name)


def head_of(output: str) -> str:
    return re.search(r"head (\d+:[0-9a-f]{64})", output).group(1)


def sealed_later(runner, than: str) -> str:
    """Seal until the head moves past `than` (a transaction open elsewhere in the cluster holds
    sealing back until it ends); the new head."""
    deadline = time.monotonic() + 60
    while True:
        result = runner.invoke(args=["kms", "audit", "seal"])
        assert result.exit_code == 0, result.output
        head = re.search(r"head (\d+:[0-9a-f]{64})", result.output)
        if head and int(head.group(1).split(":")[0]) > int(than.split(":")[0]):
            return head.group(1)
        assert time.monotonic() < deadline, result.output
        time.sleep(0.5)


def test_a_dump_restored_is_flagged_until_acknowledged_then_sealing_resumes(make_app, tmp_path):
    head_file = tmp_path / "audit-head"
    app = make_app(AUDIT_HEAD_FILE=str(head_file))
    url = app.extensions["kms"].settings.database_url
    runner = app.test_cli_runner()
    runner.invoke(args=["kms", "signup-token", "--name", "before-backup"])
    at_backup = sealed_later(runner, "0:")
    dump = tmp_path / "kms.sql"
    subprocess.run([tool("pg_dump"), "--no-owner", "--file", str(dump), url], check=True, capture_output=True)
    runner.invoke(args=["kms", "signup-token", "--name", "after-backup"])
    sealed_later(runner, at_backup)

    restored_name = f"kms_restored_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{restored_name}"')
    restored_url = with_database(url, restored_name)
    try:
        subprocess.run([tool("psql"), "--quiet", "--file", str(dump), restored_url], check=True,
                       capture_output=True)
        restored = make_app(DATABASE_URL=restored_url, AUDIT_HEAD_FILE=str(head_file)).test_cli_runner()
        flagged = restored.invoke(args=["kms", "audit", "verify"])
        assert flagged.exit_code == 1 and "before the recorded head" in flagged.output, flagged.output
        assert restored.invoke(args=["kms", "audit", "seal"]).exit_code == 4
        assert restored.invoke(args=["kms", "audit", "verify", "--head", at_backup]).exit_code == 0
        acknowledged = restored.invoke(args=["kms", "audit", "acknowledge", "--head", at_backup])
        assert acknowledged.exit_code == 0, acknowledged.output
        restored.invoke(args=["kms", "signup-token", "--name", "after-restore"])
        sealed_later(restored, at_backup)
        assert restored.invoke(args=["kms", "audit", "verify"]).exit_code == 0
        with psycopg2.connect(restored_url) as conn, conn.cursor() as cur:
            cur.execute("SELECT target FROM audit_events WHERE action = 'audit.acknowledge'")
            assert cur.fetchall() == [(at_backup,)]
        conn.close()
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{restored_name}" WITH (FORCE)')
        admin.close()
