"""Fetching what a library or a shared model points at: plain http(s) GETs, streamed, each bounded
three ways so that no server can hold a command or fill a disk: a byte limit (a `Content-Length`
over it is refused before reading, a body that grows past it is cut off), a deadline for the
whole download, and a floor on the speed (a server trickling bytes, or never answering, is cut
off after `LOW_SPEED_WINDOW_S`). A read that blocks is interrupted by shutting the socket down,
so the limits hold even while waiting for headers. Also the hash everything fetched is checked by,
and the error every part of the library raises. No torch.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import http.client
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from surgery.errors import SurgeryError

FETCH_TIMEOUT_S = 20.0  # one connect or read
DEFAULT_DEADLINE_S = 120.0  # a whole download, unless the caller says otherwise
LOW_SPEED_BYTES_S = 1024  # slower than this on average ...
LOW_SPEED_WINDOW_S = 30.0  # ... over this long cuts a download off
_CHUNK = 1 << 20


class LibraryError(SurgeryError):
    """A reference that resolves to nothing, or a library or file that fails verification."""


class FetchError(LibraryError):
    """A download that failed. `offline` is true when no server answered at all (no network, a
    refused connection, no reply): only then may a cached copy stand in for what was asked for."""

    def __init__(self, message: str, *, offline: bool = False) -> None:
        super().__init__(message)
        self.offline = offline


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def fetch(url: str, limit: int, *, deadline_s: float = DEFAULT_DEADLINE_S) -> bytes:
    """GET `url` (http/https only), refusing bodies over `limit` bytes or slower than the limits."""
    buffer = bytearray()
    _download(url, limit, deadline_s, buffer.extend)
    return bytes(buffer)


def fetch_to_file(url: str, path: Path, limit: int, *, deadline_s: float = DEFAULT_DEADLINE_S) -> None:
    """GET `url` into `path`, streamed, with the limits of `fetch`."""
    with Path(path).open("wb") as f:
        _download(url, limit, deadline_s, f.write)


def _size(n: int) -> str:
    return f"{n >> 30} GiB" if n >= 1 << 30 else f"{n >> 20} MiB" if n >= 1 << 20 else f"{n} bytes"


class _Watchdog:
    """Cuts a download off (shuts its sockets down) at its deadline, or when fewer than
    LOW_SPEED_BYTES_S arrived on average over the last LOW_SPEED_WINDOW_S."""

    def __init__(self, deadline_s: float) -> None:
        self.deadline_s = deadline_s
        self.received = 0
        self.answered = False  # a server sent a status line
        self.reason: str | None = None
        self._sockets: list[socket.socket] = []
        self._done = threading.Event()
        self._lock = threading.Lock()

    def track(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._sockets.append(sock)
            if self.reason is not None:
                _shutdown(sock)
        return sock

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        thread = threading.Thread(target=self._watch, name="surgery-fetch-watchdog", daemon=True)
        thread.start()
        try:
            yield
        finally:
            self._done.set()
            thread.join()

    def _watch(self) -> None:
        start = time.monotonic()
        window = LOW_SPEED_WINDOW_S
        samples: collections.deque[tuple[float, int]] = collections.deque([(start, 0)])
        while not self._done.wait(min(0.5, window / 4)):
            now = time.monotonic()
            samples.append((now, self.received))
            while len(samples) > 1 and samples[1][0] <= now - window:
                samples.popleft()
            if now - start > self.deadline_s:
                self._cut(f"not done after {self.deadline_s:g} s")
            elif samples[0][0] <= now - window and self.received - samples[0][1] < LOW_SPEED_BYTES_S * window:
                self._cut(f"slower than {LOW_SPEED_BYTES_S} bytes/s for {window:g} s")
            if self.reason is not None:
                return

    def _cut(self, reason: str) -> None:
        with self._lock:
            self.reason = reason
            for sock in self._sockets:
                _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _watched(cls: type[http.client.HTTPConnection]) -> Callable[..., http.client.HTTPConnection]:
    def make(*args: Any, watch: _Watchdog, **kwargs: Any) -> http.client.HTTPConnection:
        conn = cls(*args, **kwargs)
        create = conn._create_connection  # every socket the connection opens (TLS wraps it after)
        conn._create_connection = lambda *a, **k: watch.track(create(*a, **k))
        return conn

    return make


class _HTTP(urllib.request.HTTPHandler):
    def __init__(self, watch: _Watchdog) -> None:
        super().__init__()
        self.watch = watch

    def http_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(functools.partial(_watched(http.client.HTTPConnection), watch=self.watch), req)


class _HTTPS(urllib.request.HTTPSHandler):
    def __init__(self, watch: _Watchdog) -> None:
        super().__init__()
        self.watch = watch

    def https_open(self, req: urllib.request.Request) -> Any:
        make = functools.partial(_watched(http.client.HTTPSConnection), watch=self.watch)
        return self.do_open(make, req, context=self._context)


def _opener(watch: _Watchdog) -> urllib.request.OpenerDirector:
    """http and https only, redirects included (no ftp or file handlers to be redirected to)."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.UnknownHandler(),
        _HTTP(watch),
        _HTTPS(watch),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPRedirectHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


def _download(url: str, limit: int, deadline_s: float, sink: Callable[[bytes], Any]) -> None:
    if not is_url(url):
        raise FetchError(f"{url}: only http:// and https:// URLs can be fetched")
    watch = _Watchdog(deadline_s)
    request = urllib.request.Request(url, headers={"User-Agent": "surgery"})
    too_big = f"{url}: larger than the {_size(limit)} limit; refusing it"
    try:
        with watch.running(), _opener(watch).open(request, timeout=FETCH_TIMEOUT_S) as response:
            watch.answered = True
            length = response.headers.get("Content-Length", "")
            if length.strip().isascii() and length.strip().isdigit() and int(length) > limit:
                raise FetchError(too_big)
            while chunk := response.read1(_CHUNK):
                watch.received += len(chunk)
                if watch.received > limit:
                    raise FetchError(too_big)
                sink(chunk)
    except urllib.error.HTTPError as err:
        raise FetchError(f"{url}: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as err:
        if watch.reason is not None:
            raise FetchError(f"{url}: {watch.reason}; cut off", offline=not watch.answered) from None
        reason = str(getattr(err, "reason", None) or err) or type(err).__name__
        raise FetchError(f"{url}: cannot fetch ({reason})", offline=not watch.answered) from None
    if watch.reason is not None:  # the socket was shut down between reads: the body ended early
        raise FetchError(f"{url}: {watch.reason}; cut off", offline=False)


__all__ = [
    "DEFAULT_DEADLINE_S",
    "FETCH_TIMEOUT_S",
    "LOW_SPEED_BYTES_S",
    "LOW_SPEED_WINDOW_S",
    "FetchError",
    "LibraryError",
    "fetch",
    "fetch_to_file",
    "is_url",
    "sha256_bytes",
]
