"""A lean HTTP/1.1 load generator for the serving benchmarks.

The benchmarks run their clients on the machine under test. httpx spends 2-3 ms of CPU per request
there, so on a 2-core machine the load generator took most of a core and the benchmark measured
the client as much as the servers (whichever server made the client work less per request won).
This client writes each request as prepared bytes over keep-alive connections and reads the answer
with a minimal parser (status line, headers, Content-Length body), on uvloop when it is installed:
about 0.05 ms of CPU per request, so nearly all of the machine is left to the servers, as it would
be with clients on other machines.

    rps, latencies = load(url, bodies, headers, clients, seconds, on_response=None)
    async with Connection(url) as c: status, headers, body = await c.post(body, headers)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

Response = tuple[int, dict[str, str], bytes]  # status, headers (lower-case names), body


class LoadError(RuntimeError):
    pass


class Connection:
    """One keep-alive HTTP/1.1 connection posting to one URL."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port, self.path, self.netloc = parts.hostname, parts.port or 80, parts.path, parts.netloc
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

        self.reconnects = 0  # connections the server closed between requests (`Connection: close`)

    async def __aenter__(self) -> Connection:
        await self._open()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self._close()

    async def _open(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    def request(self, body: bytes, headers: dict[str, str]) -> bytes:
        """The bytes of a POST of `body` (prepare once, send many times)."""
        lines = [f"POST {self.path} HTTP/1.1", f"Host: {self.netloc}", f"Content-Length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    async def send(self, request: bytes) -> Response:
        """Send prepared request bytes and read the answer. A server that said `Connection: close`
        (HAProxy does while a reload drains its old process) gets a new connection first."""
        if self._writer is None:
            await self._open()
        assert self._reader is not None and self._writer is not None
        self._writer.write(request)
        head = await self._reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        headers = {}
        for line in head[:-4].split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower().decode()] = value.strip().decode()
        if "content-length" not in headers:
            raise LoadError(f"response without Content-Length: {head[:200]!r}")
        body = await self._reader.readexactly(int(headers["content-length"]))
        if headers.get("connection", "").lower() == "close":
            self._close()
        return status, headers, body

    async def post(self, body: bytes, headers: dict[str, str]) -> Response:
        return await self.send(self.request(body, headers))


async def _load(
    url: str,
    bodies: list[bytes],
    headers: dict[str, str],
    clients: int,
    seconds: float,
    on_response: Callable[[Response], None] | None,
) -> tuple[float, list[float]]:
    latencies: list[float] = []

    async def client(i: int, stop: float) -> None:
        async with Connection(url) as connection:
            requests = [connection.request(body, headers) for body in bodies]
            k = i
            while time.perf_counter() < stop:
                began = time.perf_counter()
                response = await connection.send(requests[k % len(requests)])
                latencies.append(time.perf_counter() - began)
                if response[0] != 200:
                    raise LoadError(f"HTTP {response[0]}: {response[2][:200]!r}")
                if on_response is not None:
                    on_response(response)
                k += clients

    begin = time.perf_counter()
    await asyncio.gather(*(client(i, begin + seconds) for i in range(clients)))
    return len(latencies) / (time.perf_counter() - begin), latencies


def run(coro: Any) -> Any:
    """Run a coroutine on uvloop when installed (as uvicorn does), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def load(
    url: str,
    bodies: list[bytes],
    headers: dict[str, str],
    clients: int,
    seconds: float,
    on_response: Callable[[Response], None] | None = None,
) -> tuple[float, list[float]]:
    """Requests/s and per-request latencies (s) with `clients` keep-alive connections posting
    `bodies` in turn for `seconds`; any answer but 200 stops the run with its body."""
    return run(_load(url, bodies, headers, clients, seconds, on_response))
