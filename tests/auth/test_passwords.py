"""Passwords (kms.auth.passwords): Argon2id with OWASP's parameters, the same work whether or not
a client exists, hashing at a lower CPU priority and bounded on the whole host, and logins admitted
to hashing a few at a time, a flood refused at once, before Flask."""
import json
import multiprocessing
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

from tests.conftest import (ADMIN_NAME, ADMIN_PASSWORD, CLIENT_PASSWORD, HttpClient, bearer, serve_in_thread,
                            stop_server)


def test_login_admission_queues_a_burst_and_turns_a_flood_away_at_once():
    """Two places, two waiting: a burst after a quiet spell waits its turn; once a source's login
    was refused, that source's next ones are refused at once (its flood holds no more threads than
    the places), while another source still waits for its turn."""
    from kms.auth.passwords import PasswordHasher
    from kms.errors import Throttled
    hasher = PasswordHasher(admitted=4, wait_s=0.5)  # a source's share: 2 places
    release = threading.Event()
    admitted, outcomes = threading.Barrier(5), []  # four holders and this thread

    def login(hold: bool, source: str):
        try:
            with hasher.admission(source):
                if hold:
                    admitted.wait()
                    release.wait()
            outcomes.append("ok")
        except Throttled as refused:
            outcomes.append(("429", refused.headers["Retry-After"]))

    def hold_places(source, count=2):
        threads = [threading.Thread(target=login, args=(True, source)) for _ in range(count)]
        for thread in threads:
            thread.start()
        return threads

    holders = hold_places("10.0.0.1") + hold_places("10.0.0.2")
    admitted.wait()  # all four places taken
    waiter = threading.Thread(target=login, args=(False, "10.0.0.3"))
    waiter.start()
    time.sleep(0.1)
    release.set()  # the burst drains: the waiter gets a place
    for thread in [*holders, waiter]:
        thread.join()
    assert outcomes.count("ok") == 5

    release.clear()
    admitted = threading.Barrier(5)
    holders = hold_places("10.0.0.1") + hold_places("10.0.0.2")
    admitted.wait()  # every place taken
    outcomes.clear()
    login(False, "10.0.0.1")  # over its share: refused at once, and 10.0.0.1 now floods
    started = time.monotonic()
    login(False, "10.0.0.1")  # refused at once, without waiting
    assert time.monotonic() - started < 0.1
    other = threading.Thread(target=login, args=(False, "10.0.0.3"))  # not flooding: waits its turn
    other.start()
    time.sleep(0.1)
    release.set()
    for thread in [*holders, other]:
        thread.join()
    assert outcomes[:2] == [("429", "1"), ("429", "1")]
    assert outcomes[2:].count("ok") == 5  # the four holders and the other source's login


def test_one_client_name_holds_at_most_its_share_of_the_places():
    """One client looping logins slows only itself: its name holds at most half the places."""
    from kms.auth.passwords import PasswordHasher
    from kms.errors import Throttled
    hasher = PasswordHasher(admitted=4, wait_s=0.2)
    with hasher.admission("10.0.0.1", "busy"), hasher.admission("10.0.0.2", "busy"):
        with pytest.raises(Throttled):
            with hasher.admission("10.0.0.3", "busy"):
                pass
        with hasher.admission("10.0.0.3", "quiet"):  # another name still gets a place
            pass


def test_hashes_run_at_a_lower_cpu_priority_than_requests(monkeypatch):
    import os
    from kms.auth import passwords as module
    hasher = module.PasswordHasher(admitted=2)
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen = []
    real = module.Argon2id.derive_phc_encoded

    def spy(self, password):
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return real(self, password)

    monkeypatch.setattr(module.Argon2id, "derive_phc_encoded", spy)
    hasher.hash("Some-passw0rd!")
    assert seen == [min(19, base + module.HASHING_NICENESS)]  # the hashing thread, not the caller
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base


@pytest.mark.real_password_hashing
def test_passwords_are_stored_as_argon2id_and_names_only_encrypted(client, auth, db):
    auth.new_client("billing-service")
    with db.cursor() as cur:
        cur.execute("SELECT password_hash, name_enc, name_hash FROM clients WHERE role = 'client'")
        password_hash, name_enc, name_hash = cur.fetchone()
        cur.execute("SELECT string_agg(t::text, ' ') FROM clients t")
        dump = cur.fetchone()[0]
    assert password_hash.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert CLIENT_PASSWORD not in dump and "billing-service" not in dump
    assert b"billing-service" not in bytes(name_enc)


@pytest.mark.real_password_hashing
def test_login_timing_does_not_reveal_whether_a_client_exists(make_app):
    # Limits raised so that 25 failures of one name are all checked (by default the 6th is a 429).
    server, base_url = serve_in_thread(make_app(LOGIN_MAX_FAILURES_PER_CLIENT=100,
                                                LOGIN_MAX_FAILURES_PER_ADDRESS=1000))
    try:
        with HttpClient(base_url) as http:
            def timed(name, expected=401):
                started = time.perf_counter()
                answer = http.post("/auth/login", json={"clientname": name, "password": "Wrong-passw0rd!"})
                assert answer.status_code == expected
                return time.perf_counter() - started

            timed(ADMIN_NAME)  # warm: connections, caches
            unknown, wrong, invalid = [], [], []
            for i in range(25):  # interleaved, so drift in the machine's speed hits both alike
                unknown.append(timed(f"ghost-{i}-svc"))
                wrong.append(timed(ADMIN_NAME))
                invalid.append(timed("x!", expected=400))  # refused before any hashing
    finally:
        stop_server(server)
    # The median of pair-wise ratios: a pause of the machine hits one pair, not the statistic.
    ratio = statistics.median(u / w for u, w in zip(unknown, wrong))
    assert 0.75 < ratio < 1.33, (ratio, unknown, wrong)
    # The control: the same statistic does tell apart a path that skips the hash.
    assert statistics.median(i / w for i, w in zip(invalid, wrong)) < 0.5


@contextmanager
def every_login_place_taken(app):
    """Both login places of the test server (admitted = max(2, SERVER_THREADS // 4)) held."""
    passwords = app.extensions["kms"].passwords
    release, held = threading.Event(), []

    def hold_a_place(source):
        with passwords.admission(source):
            held.append(1)
            release.wait(15)

    # from two other sources: a source holds at most half the places
    holders = [threading.Thread(target=hold_a_place, args=(f"10.9.9.{n}",)) for n in range(2)]
    for holder in holders:
        holder.start()
    try:
        while len(held) < 2:
            time.sleep(0.01)
        yield passwords
    finally:
        release.set()
        for holder in holders:
            holder.join()


@pytest.mark.own_app
def test_during_a_flood_logins_are_refused_before_flask_with_the_same_answer(app, client, live_server, captured_logs):
    with every_login_place_taken(app) as passwords:
        body = {"clientname": ADMIN_NAME, "password": ADMIN_PASSWORD}
        waited = client.post("/auth/login", json=body)  # no flood yet: it waits for a place, then 429
        assert waited.status_code == 429
        assert passwords.flooded("127.0.0.1")
        started = time.monotonic()
        with HttpClient(live_server) as another:  # the first one's connection is on hold for a second
            shed = another.post("/auth/login", json=body)
        assert time.monotonic() - started < 0.5  # refused at once, in the middleware
        assert shed.status_code == 429 and shed.headers["Retry-After"] == "1"
        assert shed.json() == {**waited.json(), "requestId": shed.headers["X-Request-ID"]}
        assert shed.headers["Content-Type"] == "application/json"
    metrics = client.get("/metrics").text
    assert 'kms_logins_total{outcome="throttled"} 2.0' in metrics
    lines = [json.loads(line) for line in captured_logs.getvalue().splitlines()]
    # the refusal in the route has its access line; the one in the flood is summed up instead
    assert [line["requestId"] for line in lines if line.get("requestId") in
            (waited.headers["X-Request-ID"], shed.headers["X-Request-ID"])] == [waited.headers["X-Request-ID"]]
    assert [line["refused"] for line in lines if line["msg"].startswith("logins refused in a flood")] == [1]
    assert not passwords.flooded("127.0.0.1")  # places free again: logins go through
    assert client.post("/auth/login", json={"clientname": ADMIN_NAME, "password": ADMIN_PASSWORD}).status_code == 200


@pytest.mark.real_password_hashing
def test_key_requests_keep_answering_during_a_login_flood(client, auth):
    """SERVER_THREADS=4 admits 2 logins at a time: key requests still find free threads."""
    token = auth.new_client()
    body = {"clientname": ADMIN_NAME, "password": ADMIN_PASSWORD}
    statuses, lookups = [], []
    deadline = time.monotonic() + 3
    with ThreadPoolExecutor(16) as pool:
        while time.monotonic() < deadline:
            logins = [pool.submit(client.post, "/auth/login", json=body) for _ in range(14)]
            started = time.monotonic()
            assert client.get("/keys", headers=bearer(token)).status_code == 200
            lookups.append(time.monotonic() - started)
            statuses += [future.result() for future in logins]
    codes = [r.status_code for r in statuses]
    assert 200 in codes and set(codes) <= {200, 429}
    assert all(r.headers["Retry-After"] == "1" for r in statuses if r.status_code == 429)
    assert max(lookups) < 1.5, lookups


def _hold_the_only_hashing_slot(gate, held, release):
    gate.hashing.acquire()
    held.set()
    release.wait(10)
    gate.hashing.release()


@pytest.mark.parametrize("shared", [True, False])
def test_password_hashing_is_bounded_across_worker_processes(shared):
    from kms.auth.passwords import HashGate, PasswordHasher
    from kms.errors import Throttled
    context = multiprocessing.get_context("fork")
    gate = HashGate(concurrency=1, shared=shared)  # as a server's parent makes it, before forking
    held, release = context.Event(), context.Event()
    other_worker = context.Process(target=_hold_the_only_hashing_slot, args=(gate, held, release))
    other_worker.start()
    try:
        assert held.wait(10)
        hasher = PasswordHasher(gate=gate, wait_s=0.3)
        if shared:  # the other worker holds the host's only slot: this one may not hash too
            with pytest.raises(Throttled):
                hasher.verify("Some-passw0rd!", None)
        else:  # the control: with a gate per process, both would hash at once
            assert hasher.verify("Some-passw0rd!", None) is False
    finally:
        release.set()
        other_worker.join(10)
    assert PasswordHasher(gate=gate, wait_s=2).verify("Some-passw0rd!", None) is False  # the slot is free again
