"""Fetching under attack: servers on 127.0.0.1 that trickle bytes, never answer, send endless
bodies or claim huge ones are cut off, each with one line, within the limits (lowered here so the
suite takes seconds)."""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from surgery import library_fetch
from surgery.library_fetch import FetchError, fetch, fetch_to_file

Handler = Callable[[http.server.BaseHTTPRequestHandler], None]


@pytest.fixture
def server() -> Iterator[Callable[[Handler], str]]:
    """Call it with a function that answers a GET; get back a URL on 127.0.0.1 that runs it."""
    servers = []

    def start(answer: Handler) -> str:
        class One(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with contextlib.suppress(OSError):  # the client cut us off, as it should
                    answer(self)

            def log_message(self, *args: object) -> None:
                pass

        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), One)
        httpd.daemon_threads = True
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}/file"

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(autouse=True)
def quick_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(library_fetch, "LOW_SPEED_WINDOW_S", 1.0)
    monkeypatch.setattr(library_fetch, "LOW_SPEED_BYTES_S", 1024)
    monkeypatch.setattr(library_fetch, "FETCH_TIMEOUT_S", 5.0)


def _trickle(every_s: float, length: int = 10_000) -> Handler:
    def answer(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(length))
        h.end_headers()
        for _ in range(length):
            h.wfile.write(b"x")
            h.wfile.flush()
            time.sleep(every_s)

    return answer


def test_a_trickling_server_is_cut_off(server) -> None:
    url = server(_trickle(0.05))  # 20 bytes/s, each read well inside the per-read timeout
    start = time.monotonic()
    with pytest.raises(FetchError, match=r"slower than 1024 bytes/s for 1 s; cut off") as err:
        fetch(url, 1 << 20)
    assert time.monotonic() - start < 4
    assert not err.value.offline and "\n" not in str(err.value)


def test_the_whole_download_has_a_deadline(server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(library_fetch, "LOW_SPEED_BYTES_S", 1)  # fast enough for the speed floor
    url = server(_trickle(0.01))
    start = time.monotonic()
    with pytest.raises(FetchError, match=r"not done after 1.5 s; cut off"):
        fetch(url, 1 << 20, deadline_s=1.5)
    assert time.monotonic() - start < 4


def test_a_server_that_never_answers_is_cut_off_as_offline(server) -> None:
    url = server(lambda h: time.sleep(30))
    start = time.monotonic()
    with pytest.raises(FetchError, match="cut off") as err:
        fetch(url, 1 << 20)
    assert time.monotonic() - start < 4 and err.value.offline  # no answer: a cached copy may stand in


def test_an_endless_body_is_cut_off_at_the_limit(server, tmp_path) -> None:
    def endless(h: http.server.BaseHTTPRequestHandler) -> None:
        h.protocol_version = "HTTP/1.0"
        h.send_response(200)
        h.end_headers()
        while True:
            h.wfile.write(b"\0" * 65536)

    url = server(endless)
    with pytest.raises(FetchError, match=r"larger than the 2 MiB limit; refusing it"):
        fetch_to_file(url, tmp_path / "out", 2 << 20)
    assert (tmp_path / "out").stat().st_size <= 2 << 20


def test_a_claimed_length_over_the_limit_is_refused_before_reading(server) -> None:
    def huge(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(10 << 30))
        h.end_headers()
        time.sleep(30)

    url = server(huge)
    start = time.monotonic()
    with pytest.raises(FetchError, match=r"larger than the 1 MiB limit"):
        fetch(url, 1 << 20)
    assert time.monotonic() - start < 2


def test_http_errors_are_not_offline(server) -> None:
    def missing(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_error(404)

    with pytest.raises(FetchError, match="HTTP 404") as err:
        fetch(server(missing), 1 << 20)
    assert not err.value.offline


def test_a_refused_connection_is_offline() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens once it is closed
    with pytest.raises(FetchError, match="cannot fetch") as err:
        fetch(f"http://127.0.0.1:{port}/index.json", 1 << 20)
    assert err.value.offline


def test_only_http_urls_and_no_redirect_to_other_schemes(server) -> None:
    with pytest.raises(FetchError, match="only http"):
        fetch("file:///etc/passwd", 1 << 20)

    def to_ftp(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(302)
        h.send_header("Location", "ftp://127.0.0.1/x")
        h.end_headers()

    with pytest.raises(FetchError):
        fetch(server(to_ftp), 1 << 20)
