"""The connection pool, against a real PostgreSQL."""
import threading

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
    pool.release(taken.pop())
    assert pool.acquire() is not None


def test_threads_never_share_a_connection(pool):
    in_use, lock, errors = set(), threading.Lock(), []

    def work():
        for _ in range(200):
            try:
                conn = pool.acquire()
            except ServiceUnavailable:
                continue  # a slow machine; the point is what happens to the ones handed out
            with lock:
                if id(conn) in in_use:
                    errors.append("shared")
                in_use.add(id(conn))
            with lock:
                in_use.discard(id(conn))
            pool.release(conn)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    held = [pool.acquire() for _ in range(3)]  # every slot came back, and only those
    assert len({id(conn) for conn in held}) == 3
    with pytest.raises(ServiceUnavailable):
        pool.acquire()
