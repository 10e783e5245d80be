"""Flood generators for bench/bench_floods.py and the flood tests: many keep-alive connections from
many loopback source addresses (127.0.0.2, 127.0.0.3, ...), each re-sending its request the moment
its answer comes (a flood ignores Retry-After). Bounded in time; loopback only."""
import asyncio
import socket
import threading
import time
from collections import Counter


def source_addresses(count: int, first: int = 2) -> list[str]:
    """Loopback addresses other than 127.0.0.1 (Linux answers the whole 127/8 on lo)."""
    return [f"127.0.{(n >> 8) & 255}.{n & 255}" for n in range(first, first + count)]


def request_bytes(method: str, path: str, body: bytes = b"", headers: dict | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: kms"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _read_answer(reader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    if length:
        await reader.readexactly(length)
    return status


async def _connection(host: str, port: int, source: str, request: bytes, until: float, statuses: Counter):
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, local_addr=(source, 0)), timeout=max(0.1, until - time.monotonic()))
        except (OSError, asyncio.TimeoutError):
            statuses["connect_failed"] += 1
            await asyncio.sleep(0.05)
            continue
        try:
            while time.monotonic() < until:
                writer.write(request)
                status = await asyncio.wait_for(_read_answer(reader), timeout=max(0.1, until - time.monotonic()))
                statuses[status] += 1
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ValueError):
            statuses["reset"] += 1
        finally:
            writer.close()


def flood(base_url: str, request: bytes, *, connections: int, sources: int, seconds: float) -> dict:
    """Run a flood for `seconds`: `connections` connections spread over `sources` addresses.
    Returns the answers by status, the rate and the generator's own CPU seconds."""
    host, port = base_url.rsplit("/", 1)[1].split(":")
    addresses = source_addresses(sources)
    statuses: Counter = Counter()
    cpu_before = time.thread_time()

    async def run():
        until = time.monotonic() + seconds
        await asyncio.gather(*(_connection(host, int(port), addresses[n % sources], request, until, statuses)
                               for n in range(connections)))

    started = time.monotonic()
    asyncio.run(run())
    elapsed = time.monotonic() - started
    answered = sum(count for key, count in statuses.items() if isinstance(key, int))
    return {"statuses": dict(statuses), "rate": answered / elapsed, "cpu_s": time.thread_time() - cpu_before,
            "seconds": elapsed}


def in_background(function, *args, **kwargs):
    """Start `function` in a thread; returns a callable that joins it and gives its result."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(value=function(*args, **kwargs)), daemon=True)
    thread.start()

    def join():
        thread.join()
        return result.get("value")
    return join


def idle_sockets(base_url: str, count: int, sources: int) -> list[socket.socket]:
    """Open `count` connections from `sources` addresses that never send a byte."""
    host, port = base_url.rsplit("/", 1)[1].split(":")
    opened = []
    for n, source in zip(range(count), source_addresses(sources) * (count // sources + 1)):
        sock = socket.socket()
        sock.setblocking(False)
        sock.bind((source, 0))
        try:
            sock.connect((host, int(port)))
        except BlockingIOError:
            pass
        opened.append(sock)
    return opened
