"""Numbered migrations: applied once, in order, each in a transaction, safe from parallel starts."""
import multiprocessing

import psycopg2

from kms import db


def applied_versions(url):
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT version FROM schema_migrations ORDER BY version")
            return [row[0] for row in cur.fetchall()]
    finally:
        conn.close()


def test_migrate_applies_every_file_once(new_database):
    url = new_database()
    first = db.migrate(url)
    assert first == [f"{v:03d}_{name}" for v, name, _ in db.migration_files()]
    assert db.migrate(url) == []
    assert applied_versions(url) == [v for v, _, _ in db.migration_files()]


def _migrate_in_process(url, barrier, results):
    barrier.wait()
    results.put(db.migrate(url))


def test_two_processes_migrating_at_once_apply_each_migration_once(new_database):
    url = new_database()
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    processes = [context.Process(target=_migrate_in_process, args=(url, barrier, results)) for _ in range(2)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert sorted(outcomes, key=len) == [[], [f"{v:03d}_{name}" for v, name, _ in db.migration_files()]]
    assert applied_versions(url) == [v for v, _, _ in db.migration_files()]


def test_a_failing_migration_rolls_back_entirely(new_database, tmp_path, monkeypatch):
    url = new_database()
    db.migrate(url)
    bad = tmp_path / "999_broken.sql"
    bad.write_text("CREATE TABLE half_done (id int); SELECT * FROM no_such_table;")
    files = db.migration_files() + [(999, "broken", bad)]
    monkeypatch.setattr(db, "migration_files", lambda: files)
    try:
        db.migrate(url)
    except psycopg2.Error:
        pass
    else:
        raise AssertionError("the broken migration should fail")
    conn = psycopg2.connect(url)
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass('half_done')")
        assert cur.fetchone()[0] is None
    conn.close()
    assert 999 not in applied_versions(url)
