"""Stopping drops nothing: every request whose bytes reached the server before the stop signal is
answered, then its connection closed (kms/serving/server.py). Real processes, real signals, raw
sockets: requests sent on connections of their own (parallel) and several on one connection
(pipelined), the signal right after the last byte is sent, with one worker and with two."""
import signal
import socket
import time

import pytest

from tests.serving.test_workers import servers  # noqa: F401 - the fixture

PARALLEL = 12
PIPELINED = 10


def request_bytes(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: kms\r\n\r\n".encode()


def read_answers(sock: socket.socket, count: int) -> list[int]:
    """The statuses of up to `count` answers on `sock`, in order (fewer when the server closed the
    connection cleanly after them); a reset raises ConnectionResetError."""
    sock.settimeout(60)
    reader = sock.makefile("rb")
    statuses = []
    try:
        for _ in range(count):
            status_line = reader.readline()
            if not status_line:
                break
            statuses.append(int(status_line.split()[1]))
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            reader.read(length)
    finally:
        reader.close()
    return statuses


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["SIGTERM", "SIGINT", "SIGHUP"])
def test_every_request_sent_before_the_stop_signal_is_answered(servers, workers, stop):  # noqa: F811
    server = servers(workers=workers)
    host, port = "127.0.0.1", server.port
    parallel = [socket.create_connection((host, port)) for _ in range(PARALLEL)]
    pipelined = socket.create_connection((host, port))
    time.sleep(0.3)  # accepted (or not) as the server likes: both are tried across runs
    late = [socket.create_connection((host, port)) for _ in range(PARALLEL)]  # still in the backlog, likely
    for number, sock in enumerate(parallel + late):
        sock.sendall(request_bytes("/readyz" if number % 2 else "/healthz"))
    pipelined.sendall(b"".join(request_bytes("/readyz" if n % 2 else "/healthz") for n in range(PIPELINED)))
    server.process.send_signal(stop)

    resets, unanswered = 0, 0
    for sock, expected in [(s, 1) for s in parallel + late] + [(pipelined, PIPELINED)]:
        try:
            statuses = read_answers(sock, expected)
        except ConnectionResetError:
            resets += 1
            continue
        finally:
            sock.close()
        assert all(status == 200 for status in statuses), statuses
        unanswered += expected - len(statuses)
    assert (resets, unanswered) == (0, 0)
    assert server.process.wait(timeout=60) == 0
