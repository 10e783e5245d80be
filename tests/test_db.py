"""The connection pool, against a real PostgreSQL."""
import threading
import time

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
