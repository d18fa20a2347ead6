"""Pieces of `surgery serve` that need no Ray: the core claim between replicas and the private
HAProxy ingress set-up."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import typing
from pathlib import Path

import pytest

from serve.cores import CoreClaim
from serve.ingress import MAX_STATE_DIR, haproxy_binary, haproxy_environment, ingress_environment
from surgery.errors import SurgeryError


def test_a_forward_takes_the_whole_machine_only_while_no_other_replica_runs(tmp_path):
    path = tmp_path / "cores.lock"
    a, b, c = CoreClaim(path), CoreClaim(path), CoreClaim(path)  # three replicas, one machine
    with a.claim(whole=True) as alone:
        assert alone
        with b.claim(whole=False) as other:  # a share never waits, even behind a whole-machine forward
            assert not other
        with b.claim(whole=True) as other:
            assert not other
    with a.claim(whole=False) as alone:
        assert not alone
        with b.claim(whole=True) as other:  # someone is busy on their share: stay on yours
            assert not other
    with c.claim(whole=True) as alone:  # all released
        assert alone


def test_claims_never_block_a_forward(tmp_path):
    path = tmp_path / "cores.lock"
    holder, other = CoreClaim(path), CoreClaim(path)
    results: list[bool] = []

    def forward() -> None:
        for whole in (True, False):
            with other.claim(whole) as alone:
                results.append(alone)

    with holder.claim(whole=True):
        worker = threading.Thread(target=forward)
        worker.start()
        worker.join(timeout=5)
    assert not worker.is_alive() and results == [False, False]


def _fake_haproxy(tmp_path: Path) -> Path:
    fake = tmp_path / "fake-haproxy"
    fake.write_text(
        f"#!{sys.executable}\nimport sys\nargs = sys.argv[1:]\nprint(' '.join(args))\n"
        "print(open(args[args.index('-f') + 1]).read())\n"
    )
    fake.chmod(0o755)
    return fake


@pytest.fixture
def state_name():
    """A state folder name of this test's own; the folder is removed afterwards."""
    import shutil
    import tempfile

    name = f"t{os.getpid()}"
    yield name
    for root in {Path(tempfile.gettempdir()), Path("/tmp")}:
        path = root / f"surgery-{os.getuid()}-{name}"
        if path.is_symlink():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)


def test_haproxy_is_started_with_every_wildcard_listener_on_loopback(tmp_path, monkeypatch, state_name):
    monkeypatch.setattr("serve.ingress.haproxy_binary", lambda: str(_fake_haproxy(tmp_path)))
    env = haproxy_environment(state_name)
    state = Path(env["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"]).parent
    assert state.stat().st_mode & 0o777 == 0o700 and len(str(state)) <= MAX_STATE_DIR
    for key in ("SOCKET_PATH", "METRICS_SOCKET_PATH", "SERVER_STATE_FILE"):
        assert Path(env[f"RAY_SERVE_HAPROXY_{key}"]).parent == state
    ports = {env[f"RAY_SERVE_{k}"] for k in ("HAPROXY_STATS_PORT", "HAPROXY_METRICS_PORT", "FALLBACK_PROXY_HTTP_PORT")}
    assert len(ports) == 3 and "8404" not in ports

    config = state / "node" / "haproxy.cfg"  # where Ray writes it: a folder per node inside ours
    config.parent.mkdir()
    config.write_text(
        "defaults\n    mode http\n    timeout client 3600s\n    timeout http-keep-alive 90s\n"
        "frontend prometheus\n    bind :9101\nfrontend http_frontend\n    bind 0.0.0.0:8000\n"
        "listen stats\n  bind *:8404\n  stats enable\n"
    )
    done = subprocess.run(
        [env["RAY_SERVE_HAPROXY_BINARY_PATH"], "-db", "-f", str(config), "-sf", "123"],
        capture_output=True,
        text=True,
        check=True,
    )
    args, _, rewritten = done.stdout.partition("\n")
    # HAProxy is started on Ray's own file (rewritten in place): its command line names that file,
    # which is how Ray finds its HAProxy processes to signal and count them
    assert args == f"-db -f {config} -sf 123" and config.read_text() == rewritten.removesuffix("\n")
    assert "bind 127.0.0.1:9101" in rewritten and "bind 127.0.0.1:8404" in rewritten
    assert "bind 0.0.0.0:8000" in rewritten  # the request listener keeps the host the user chose
    # a slow or idle client is cut off: Ray's hour-long client timeout and missing request timeout replaced
    defaults = rewritten.split("frontend")[0]
    for line in ("timeout client 60s", "timeout http-request 10s", "timeout http-keep-alive 10s"):
        assert f"    {line}\n" in defaults
    assert "3600s" not in rewritten and "90s" not in rewritten and "option http-buffer-request" in defaults
    again = subprocess.run(  # a reload (or a second wrapper) rewrites it again: nothing changes
        [env["RAY_SERVE_HAPROXY_BINARY_PATH"], "-db", "-f", str(config)], capture_output=True, text=True, check=True
    )
    assert again.stdout.partition("\n")[2] == rewritten and rewritten.count("tcp-request connection reject") == 1
    # one client address may hold at most the per-client limit of the request listener's connections
    frontend = rewritten.split("frontend http_frontend\n")[1].split("listen")[0]
    assert "tcp-request connection track-sc0 src" in frontend
    assert "tcp-request connection reject if { sc0_conn_cur gt 1024 }" in frontend


def test_an_inherited_wrapper_is_passed_over_not_wrapped_again(monkeypatch, state_name):
    """`surgery serve` started from a process that set up HAProxy itself (a test session, another
    `surgery serve`) inherits its wrapper in RAY_SERVE_HAPROXY_BINARY_PATH: wrapping it again
    rewrote the configuration twice (a duplicate stick table: HAProxy refused to start)."""
    monkeypatch.delenv("RAY_SERVE_HAPROXY_BINARY_PATH", raising=False)
    real = haproxy_binary()
    assert real is not None and "surgery-" not in real
    parent = haproxy_environment(state_name)["RAY_SERVE_HAPROXY_BINARY_PATH"]
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", parent)
    assert haproxy_binary() == real
    Path(parent).unlink()  # the parent has cleaned up its state folder
    assert haproxy_binary() == real
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", "/bin/true")  # a user's own choice stands
    assert haproxy_binary() == "/bin/true"


def test_the_per_client_connection_limit_is_configurable(tmp_path, monkeypatch, state_name):
    monkeypatch.setattr("serve.ingress.haproxy_binary", lambda: str(_fake_haproxy(tmp_path)))
    config = tmp_path / "haproxy.cfg"
    config.write_text("defaults\n    mode http\nfrontend http_frontend\n    bind 127.0.0.1:8000\n")

    def rewritten() -> str:
        env = haproxy_environment(state_name)
        done = subprocess.run([env["RAY_SERVE_HAPROXY_BINARY_PATH"], "-f", str(config)], capture_output=True, text=True)
        return done.stdout

    monkeypatch.setenv("SURGERY_SERVE_MAX_CONNECTIONS_PER_CLIENT", "8")
    assert "reject if { sc0_conn_cur gt 8 }" in rewritten()
    monkeypatch.setenv("SURGERY_SERVE_MAX_CONNECTIONS_PER_CLIENT", "0")
    assert "tcp-request" not in rewritten()
    monkeypatch.setenv("SURGERY_SERVE_MAX_CONNECTIONS_PER_CLIENT", "lots")
    with pytest.raises(SurgeryError, match="SURGERY_SERVE_MAX_CONNECTIONS_PER_CLIENT must be a whole number"):
        haproxy_environment(state_name)


def test_haproxy_state_folder_must_be_our_own(tmp_path, monkeypatch, state_name):
    import tempfile

    monkeypatch.setattr("serve.ingress.haproxy_binary", lambda: "/bin/true")
    (Path(tempfile.gettempdir()) / f"surgery-{os.getuid()}-{state_name}").symlink_to(tmp_path)
    with pytest.raises(SurgeryError, match="not a folder of this user's"):
        haproxy_environment(state_name)


def test_haproxy_state_folder_is_short_enough_for_socket_paths(tmp_path, monkeypatch, state_name):
    monkeypatch.setattr("serve.ingress.haproxy_binary", lambda: "/bin/true")
    env = haproxy_environment(state_name, state_root=tmp_path / ("d" * 80))
    state = Path(env["RAY_SERVE_HAPROXY_SOCKET_PATH"]).parent
    assert state == Path("/tmp") / f"surgery-{os.getuid()}-{state_name}" and len(str(state)) <= MAX_STATE_DIR


def test_ingress_choice(monkeypatch):
    assert ingress_environment("proxy", 8000) == {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    monkeypatch.setattr("serve.ingress.haproxy_binary", lambda: None)
    assert ingress_environment("auto", 8000) == {}  # no HAProxy installed: Ray's proxy serves
    with pytest.raises(SurgeryError, match="needs HAProxy"):
        ingress_environment("haproxy", 8000)
    with pytest.raises(SurgeryError, match="unknown --ingress 'nginx'"):
        ingress_environment("nginx", 8000)


def _fake_forward(seconds: dict[int, float]):
    calls: list[int] = []

    def forward(threads: int) -> float:
        calls.append(threads)
        return seconds[threads]

    return forward, calls


def test_a_lone_request_keeps_to_its_share_only_where_more_threads_are_slower():
    from serve.runtime import SOLO_TIMING_BUDGET_S, faster_threads

    small, _ = _fake_forward({1: 0.0010, 2: 0.0016})  # waking a second thread costs more than it does
    assert faster_threads(small, 1, 2) == (1, {"1": 1.0, "2": 1.6})
    close, _ = _fake_forward({1: 0.0100, 2: 0.0105})  # a close call (a busy machine slows 2 threads more) keeps both
    assert faster_threads(close, 1, 2)[0] == 2
    wide, _ = _fake_forward({1: 0.040, 2: 0.022})
    assert faster_threads(wide, 1, 2) == (2, {"1": 40.0, "2": 22.0})
    big, calls = _fake_forward({1: SOLO_TIMING_BUDGET_S * 3, 2: 0.0})  # too slow to time: threads pay there
    assert faster_threads(big, 1, 2) == (2, {"1": SOLO_TIMING_BUDGET_S * 3000}) and calls == [1]


def test_whole_machine_claims_take_turns(tmp_path):
    first, second = CoreClaim(tmp_path / "cores.lock"), CoreClaim(tmp_path / "cores.lock")
    with first.whole_machine(wait_s=1) as held:
        assert held
        with second.whole_machine(wait_s=0.05) as also:
            assert not also  # gave up waiting: carries on without it
    with second.whole_machine(wait_s=0.05) as held:
        assert held


# --------------------------------------------------------------------------- a recipe's serve settings, capped


def test_a_recipes_serve_settings_are_capped_by_the_machine():
    from serve.config import MAX_BODY_MB, MAX_REQUEST_TIMEOUT_S, Machine, capped_section
    from surgery.schema import Serve

    greedy = Serve(replicas=64, max_body_mb=100000, request_timeout_s=1e8, batch_wait_ms=1e9, max_batch_size=10**9)
    section, notes = capped_section(greedy, Machine(cpus=2, memory_bytes=64 * 2**30), weights_bytes=2**20)
    assert (section.replicas, section.max_body_mb, section.request_timeout_s) == (2, MAX_BODY_MB, MAX_REQUEST_TIMEOUT_S)
    assert section.batch_wait_ms == 1000 and section.max_batch_size == 1024
    assert len(notes) == 5 and all("\n" not in note for note in notes)
    assert "serve.replicas 64 capped to 2 (2 CPUs here)" in notes

    heavy, notes = capped_section(Serve(replicas=8), Machine(cpus=64, memory_bytes=5 * 2**30), weights_bytes=2**30)
    assert heavy.replicas == 2 and "serve.replicas 8 capped to 2 (5.0 GiB free, ~2.5 GiB each)" in notes

    scaling = Serve(autoscaling={"min_replicas": 10, "max_replicas": 64})
    section, notes = capped_section(scaling, Machine(cpus=4, memory_bytes=None), weights_bytes=0)
    assert (section.autoscaling.min_replicas, section.autoscaling.max_replicas) == (4, 4) and len(notes) == 2

    modest = Serve(replicas=2, max_body_mb=8, request_timeout_s=60)
    assert capped_section(modest, Machine(cpus=2, memory_bytes=2**34), 2**20) == (modest, [])
    cluster, notes = capped_section(Serve(replicas=64), Machine(None, None), 2**30)  # the cluster places replicas
    assert cluster.replicas == 64 and notes == []


# --------------------------------------------------------------------------- the OpenAPI document


def test_openapi_documents_the_statuses_each_route_answers_and_never_422():
    import json

    from serve.http import openapi_document

    document = openapi_document()
    assert '"422"' not in json.dumps(document) and "ValidationError" not in json.dumps(document)
    operations = {(m.upper(), p): op for p, ops in document["paths"].items() for m, op in ops.items()}
    statuses = {key: set(op["responses"]) for key, op in operations.items()}
    assert statuses[("POST", "/v1/models/{name}:predict")] == {
        "200",
        "400",
        "401",
        "404",
        "408",
        "413",
        "415",
        "500",
        "504",
    }
    assert statuses[("POST", "/v2/models/{name}/infer")] == {"200", "400", "401", "404", "408", "413", "500", "504"}
    for (_, path), codes in statuses.items():
        if path in ("/healthz", "/v2/health/live", "/v2/health/ready"):
            assert codes == {"200"}, path  # probes: no token, nothing to find
            continue
        assert "401" in codes, path
        assert ("{name}" in path) == ("404" in codes), path
    error = operations[("POST", "/v1/models/{name}:predict")]["responses"]["413"]["content"]["application/json"]
    assert document["components"]["schemas"][error["schema"]["$ref"].rsplit("/", 1)[1]]["required"] == ["error"]
    assert list(operations[("GET", "/metrics")]["responses"]["200"]["content"]) == ["text/plain"]


# --------------------------------------------------------------------------- every error is JSON, HAProxy's too


class _TextErrors:
    """A backend answering what Ray's replica HTTP server and uvicorn may: errors in text, the
    app's own errors in JSON, and a 200 in text (which must pass untouched)."""

    ANSWERS: typing.ClassVar[dict[str, tuple[int, str | None, bytes]]] = {
        "/app/text408": (408, "text/plain", b"Request 1 timed out after 30.0s."),
        "/app/text503": (503, "text/plain; charset=utf-8", b"Back pressure"),
        "/app/text500": (500, None, b"Internal Server Error"),
        "/app/html400": (400, "text/html", b"<html>Invalid HTTP request received.</html>"),
        "/app/json408": (408, "application/json", b'{"error": "request body not received within 30 s"}'),
        "/app/ok": (200, "text/plain", b"fine"),
    }

    def __enter__(self) -> int:
        import http.server
        import threading

        answers = self.ANSWERS

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, media, body = answers[self.path]
                self.send_response(status)
                if media:
                    self.send_header("Content-Type", media)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self.server.server_address[1]

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _ray_like_config(folder: Path, port: int, backend: int, dead: int) -> Path:
    """What Ray's HAProxy template writes, cut down: its text errorfile, its text 404 and health check."""
    (folder / "500.http").write_text(
        "HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\nContent-Length: 21\r\n\r\nInternal Server Error"
    )
    config = folder / "node" / "haproxy.cfg"
    config.parent.mkdir()
    config.write_text(
        f"""global
    maxconn 100
defaults
    mode http
    timeout connect 1s
    timeout client 3600s
    timeout server 5s
    errorfile 502 {folder}/500.http
    errorfile 503 {folder}/500.http
    errorfile 504 {folder}/500.http
frontend http_frontend
    bind 127.0.0.1:{port}
    acl healthcheck path -i /-/healthz
    http-request return status 503 content-type text/plain string "Service Unavailable" if healthcheck
    acl is_app path_beg /app/
    acl is_dead path_beg /dead/
    use_backend app if is_app
    use_backend dead if is_dead
    default_backend default_backend
backend default_backend
    http-request return status 404 content-type text/plain lf-string "Path \\'%[path]\\' not found. Ping http://.../-/routes for available routes."
backend app
    server s1 127.0.0.1:{backend}
backend dead
    server s1 127.0.0.1:{dead}
"""
    )
    return config


def _raw(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
            if b"\r\n\r\n" in received:
                head, _, body = received.partition(b"\r\n\r\n")
                headers = dict(line.split(": ", 1) for line in head.decode("latin-1").split("\r\n")[1:] if ": " in line)
                headers = {k.lower(): v for k, v in headers.items()}
                if len(body) >= int(headers.get("content-length", 10**9)):
                    return int(head.split(b" ")[1]), headers, body
    raise AssertionError(f"no whole response: {received[:200]!r}")


def _get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    return _raw(port, f"GET {path} HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n".encode())


def test_every_error_through_haproxy_is_a_json_body(tmp_path, state_name, free_port):
    """The real HAProxy, on a configuration like Ray's as our wrapper rewrites it: its own errors,
    Ray's text answers and a server's text errors all reach the client as {"error": ...}."""
    import json
    import time

    from serve.haproxy_config import ERRORS, RAY_TIMEOUT_MESSAGE

    env = haproxy_environment(state_name, http_request_timeout_s=1)
    port, dead = free_port(), free_port()
    with _TextErrors() as backend:
        config = _ray_like_config(tmp_path, port, backend, dead)
        haproxy = subprocess.Popen(
            [env["RAY_SERVE_HAPROXY_BINARY_PATH"], "-db", "-f", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 20
            while True:
                assert haproxy.poll() is None, haproxy.stdout.read().decode()
                try:
                    _get(port, "/app/ok")
                    break
                except OSError:
                    assert time.monotonic() < deadline, "HAProxy did not start"
                    time.sleep(0.1)
            expected = {
                "/app/text408": (504, RAY_TIMEOUT_MESSAGE),  # Ray's timeout: the app's 504, in JSON
                "/app/text503": (503, ERRORS[503]),
                "/app/text500": (500, ERRORS[500]),
                "/app/html400": (400, ERRORS[400]),
                "/app/json408": (408, "request body not received within 30 s"),  # the app's own: untouched
                "/nothing/here": (404, "Not Found"),  # Ray's text 404 for an unrouted path
                "/-/healthz": (503, ERRORS[503]),
                "/dead/x": (503, ERRORS[503]),  # no server up: HAProxy's own 503
            }
            for path, (status, message) in expected.items():
                got, headers, body = _get(port, path)
                assert (got, headers.get("content-type")) == (status, "application/json"), (path, got, body)
                assert json.loads(body) == {"error": message}, path
            status, headers, body = _get(port, "/app/ok")  # what is not an error passes untouched
            assert (status, headers["content-type"], body) == (200, "text/plain", b"fine")
            slow = b"POST /app/ok HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"  # body never finished
            status, headers, body = _raw(port, slow)
            assert (status, headers["content-type"], json.loads(body)) == (
                408,
                "application/json",
                {"error": ERRORS[408].format(http_request_s=1)},
            )
            # A request HAProxy cannot parse at all (or whose headers never end) is refused by its
            # connection layer before a request exists, and HAProxy 2.8 answers those with its
            # built-in page whatever `errorfile` says (haproxy/haproxy#3032, fixed in 3.2)
            assert _raw(port, b"GET /app/ok HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n")[0] == 400
        finally:
            haproxy.terminate()
            haproxy.wait(timeout=10)
