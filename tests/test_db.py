"""The connection pool, against a real PostgreSQL."""
import threading
import time

import psycopg2
import psycopg2.errors
import pytest

from kms import db
from kms.errors import ServiceUnavailable


@pytest.fixture
def pool(database_url):
    pool = db.ConnectionPool(database_url, size=3, acquire_timeout=0.2)
    pool.warm()
    yield pool
    pool.close()


def backend_pid(conn) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        return cur.fetchone()[0]


def test_the_connection_released_last_serves_next(pool):
    first, second = pool.acquire(), pool.acquire()
    pool.release(first)
    pool.release(second)
    assert pool.acquire() is second
    assert pool.acquire() is first


def test_one_request_at_a_time_keeps_to_one_server_process(pool):
    pids = set()
    for _ in range(10):
        with pool.connection() as conn:
            pids.add(backend_pid(conn))
    assert len(pids) == 1


def test_an_exhausted_pool_answers_busy_and_recovers(pool):
    taken = [pool.acquire() for _ in range(3)]
    with pytest.raises(ServiceUnavailable):
        pool.acquire()
    released = taken.pop()
    pool.release(released)
    assert pool.acquire() is released


def test_threads_never_share_a_connection(database_url):
    pool = db.ConnectionPool(database_url, size=3, acquire_timeout=30)  # nobody gives up waiting
    pool.warm()
    holders, lock, shared, acquired = {}, threading.Lock(), [], []

    def work(worker):
        for _ in range(100):
            conn = pool.acquire()
            with lock:
                if id(conn) in holders:
                    shared.append((holders[id(conn)], worker))
                holders[id(conn)] = worker
            backend_pid(conn)  # hold it over a round trip, so an overlap would have time to happen
            with lock:
                del holders[id(conn)]
                acquired.append(worker)
            pool.release(conn)

    try:
        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert shared == []
        assert len(acquired) == 800  # every acquisition happened: none was skipped
        assert pool.waiting == 0 and pool.in_use == 0
        held = [pool.acquire() for _ in range(3)]  # every slot came back, and only those
        assert len({id(conn) for conn in held}) == 3
        pool.acquire_timeout = 0.1
        with pytest.raises(ServiceUnavailable):
            pool.acquire()
        for conn in held:
            pool.release(conn)
    finally:
        pool.close()


def test_the_pool_reports_what_is_in_use_and_who_waits(pool):
    taken = [pool.acquire(), pool.acquire()]
    assert pool.in_use == 2 and pool.waiting == 0
    taken.append(pool.acquire())
    waiter = threading.Thread(target=lambda: pool.release(pool.acquire()))
    pool.acquire_timeout = 5
    waiter.start()
    deadline = time.monotonic() + 5
    while pool.waiting != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool.waiting == 1
    pool.release(taken.pop())
    waiter.join(5)
    assert pool.waiting == 0 and pool.in_use == 2
    for conn in taken:
        pool.release(conn)


@pytest.fixture
def scratch(pool):
    """A connection with a temporary table, and another to watch it from."""
    with pool.connection() as conn, pool.connection() as watcher:
        with conn.cursor() as cur:
            cur.execute("CREATE TEMP TABLE scratch (n integer PRIMARY KEY, note text)")
        conn.commit()
        try:
            yield conn, watcher
        finally:
            conn.rollback()
            with conn.cursor() as cur:
                cur.execute("DROP TABLE scratch")
            conn.commit()


def last_sent(watcher, conn) -> str:
    """What the connection's server process last received, in one message (one round trip)."""
    pid = conn.get_backend_pid()
    with watcher.cursor() as cur:
        cur.execute("SELECT query FROM pg_stat_activity WHERE pid = %s", (pid,))
        return cur.fetchone()[0]


def test_deferred_statements_go_in_order_with_the_next_one_in_one_round_trip(scratch):
    conn, watcher = scratch
    with db.transaction(conn) as cur:
        cur.defer("INSERT INTO scratch VALUES (1, %(note)s)", {"note": "100% %(n)s %s"})
        cur.defer("INSERT INTO scratch VALUES (2, 'second')")
        cur.execute("SELECT string_agg(n || '=' || note, ' | ' ORDER BY n) FROM scratch WHERE n > %(above)s",
                    {"above": 0})
        assert cur.fetchone()[0] == "1=100% %(n)s %s | 2=second"  # both ran first; values kept as sent
        sent = last_sent(watcher, conn)
        assert sent.startswith("BEGIN") and sent.index("(1,") < sent.index("(2,") < sent.index("string_agg")
    assert last_sent(watcher, conn) == "COMMIT"  # nothing was left for it to carry


def test_a_block_of_deferred_statements_sends_them_with_its_commit(scratch):
    conn, watcher = scratch
    with db.transaction(conn) as cur:
        cur.defer("INSERT INTO scratch VALUES (3, 'with the commit')")
        assert "(3," not in last_sent(watcher, conn)  # not sent yet
    sent = last_sent(watcher, conn)
    assert sent.startswith("BEGIN") and sent.endswith("COMMIT") and "(3," in sent
    with conn.cursor() as cur:
        cur.execute("SELECT note FROM scratch WHERE n = 3")
        assert cur.fetchone() == ("with the commit",)
    conn.rollback()


def test_an_error_in_a_deferred_statement_rolls_back_the_whole_transaction(scratch):
    conn, _ = scratch
    with pytest.raises(psycopg2.errors.UniqueViolation):
        with db.transaction(conn) as cur:
            cur.execute("INSERT INTO scratch VALUES (4, 'sent at once')")
            cur.defer("INSERT INTO scratch VALUES (4, 'the same key again')")  # fails at the COMMIT
    assert conn.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE  # usable again
    with db.transaction(conn) as cur:
        cur.execute("SELECT count(*) FROM scratch WHERE n = 4")
        assert cur.fetchone()[0] == 0


def test_deferred_statements_of_a_block_that_fails_first_are_never_sent(scratch):
    conn, watcher = scratch
    with pytest.raises(RuntimeError):
        with db.transaction(conn) as cur:
            cur.defer("INSERT INTO scratch VALUES (5, 'never')")
            raise RuntimeError("the block gave up before any round trip")
    assert "(5," not in last_sent(watcher, conn)
    with db.transaction(conn) as cur:
        cur.execute("SELECT count(*) FROM scratch WHERE n = 5")
        assert cur.fetchone()[0] == 0
