"""`surgery serve`: deploy bundles on a local Ray instance (or `RAY_ADDRESS`), or write the Ray
Serve config file that deploys them on a cluster."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from serve.config import (
    INGRESS_NAME,
    RAY_TIMEOUT_MARGIN_S,
    AppArgs,
    Machine,
    check_runtimes,
    deployment_options,
    model_deployment_name,
    model_settings,
    serve_section,
)
from serve.ingress import REPLICA_ENV, check_ingress, ingress_environment, state_folder
from serve.tokens import TOKEN_ENV, read_token
from surgery.bundle import read_manifest, resolve_bundle
from surgery.errors import SurgeryError
from surgery.runtimes import CHOICES

APP_NAME = "surgery"
# The Ray `surgery serve` starts for itself is a one-machine Ray, and listens on loopback only.
# Ray turns a node address of 127.0.0.1 into the machine's address so that other nodes can join
# (unless clusters are off, as on Windows and macOS): every gRPC server, the dashboard agent and
# the runtime-env agent then listened on that address, and the autoscaler monitor and the
# dashboard served Prometheus text, without auth, on every interface. With clusters off the node
# address stays 127.0.0.1 and every one of them binds it. Ray reads this when `ray` is imported.
LOOPBACK_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# Ray's metrics agent would serve Prometheus, without auth; the app has its own /metrics behind
# the token. Read by the raylet this starts (and `ray start`).
OWN_RAY_ENV = {"RAY_enable_metrics_collection": "0", **LOOPBACK_RAY_ENV, **REPLICA_ENV}
IMPORT_PATH = "serve.app:build_app"


def verify_bundles(bundles: list[str], formats: bool) -> None:
    """Load every bundle here, as a replica would (schema, hashes, paths, model, weights), so a
    bad one fails the command in seconds with its reason instead of failing replicas on Ray; with
    `formats`, check every format its manifest lists too (`build_app` does, where it runs)."""
    from surgery.bundle import load_bundle
    from surgery.formats import verify_formats

    for bundle in bundles:
        loaded = load_bundle(Path(bundle))
        if formats:
            verify_formats(loaded.path, loaded.manifest)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_config(args: dict[str, Any], host: str, port: int, machine: Machine) -> dict[str, Any]:
    """A Ray Serve config (the schema `serve run`/`serve deploy` read) deploying `args`, the
    recipes' settings capped for `machine`."""
    parsed = AppArgs.model_validate(args)
    check_runtimes(parsed)
    deployments = []
    timeouts = []
    sections = [(read_manifest(b)["name"], serve_section(b, machine)) for b in parsed.bundles]
    for name, section in sections:
        settings = model_settings(parsed, section)
        timeouts.append(settings["request_timeout_s"])
        options = deployment_options(parsed, section, settings)
        options["name"] = INGRESS_NAME if len(sections) == 1 else model_deployment_name(name)
        deployments.append(options)
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": port, "request_timeout_s": max(timeouts) + RAY_TIMEOUT_MARGIN_S},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": IMPORT_PATH,
                "args": {k: v for k, v in parsed.model_dump().items() if v is not None},
                "deployments": deployments,
            }
        ],
    }


def _local_resources(replicas: int) -> dict[str, Any]:
    """CPUs reserved and torch threads for each replica sharing this machine's cores, and the
    threads a lone request may use while no other replica is busy (all of them)."""
    cores = os.cpu_count() or 1
    return {"num_cpus": min(1.0, cores / replicas), "threads": max(1, cores // replicas), "solo_threads": cores}


def _start_ray(detach: bool) -> None:
    import ray

    from surgery.cluster import ray_address, start_ray

    # surgery's one way of connecting to Ray; without RAY_ADDRESS, a Ray of our own on loopback:
    # never some other local instance (a test session, a notebook) whose Serve apps we would then
    # shut down on exit.
    if ray_address():
        start_ray(worker_logs=False)
        return
    own_ray_environment()
    if not detach:
        start_ray(worker_logs=False, node_ip="127.0.0.1")
        return
    # A detached server must outlive this process: start Ray the way `ray start` does, or reuse
    # the one an earlier `surgery serve --detach` started (redeploying replaces the app).
    ray_cli = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    done = subprocess.run(
        [
            ray_cli,
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0 and "already running" not in done.stderr + done.stdout:
        raise SurgeryError(f"`ray start --head` failed: {done.stderr.strip().splitlines()[-1:]}")
    ray.init(address="auto", include_dashboard=False, logging_level="WARNING", log_to_driver=False)


def own_ray_environment() -> None:
    """Set the environment of a Ray started from here (OWN_RAY_ENV), before `ray` reads it. Where
    `ray` is imported already (a process that imported Serve before), its constant is set too."""
    os.environ.update(OWN_RAY_ENV)
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


def _deploy(app: Any, host: str, port: int, timeout_s: float) -> None:
    from ray import serve

    serve.start(http_options={"host": host, "port": port, "request_timeout_s": timeout_s})
    try:
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    except Exception as exc:
        reason = _replica_failure() or next(
            (line for line in str(exc).splitlines() if "Error" in line), str(exc).splitlines()[0]
        )
        raise SurgeryError(f"deploying the models failed: {reason.strip()}") from None


_EXCEPTION_LINE = re.compile(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception|Interrupt|Exit)): ?(.*)$")


def failure_reason(deployment: str, message: str) -> str | None:
    """One line from a deployment's status message: the exception its replica's constructor
    raised (our own errors as their message alone)."""
    for line in reversed(message.strip().splitlines()):
        match = _EXCEPTION_LINE.match(line.strip())
        if match and not line.startswith("RuntimeError: Traceback"):
            name, text = match.groups()
            said = text if name in _SURGERY_ERRORS else f"{name}: {text}"
            return f"a replica of {deployment} could not start: {said}"
    return None


_SURGERY_ERRORS = {"SurgeryError", "BundleError", "RecipeError", "BuildError", "DataError"}


def _replica_failure() -> str | None:
    from ray import serve

    try:
        app = serve.status().applications.get(APP_NAME)
    except Exception:
        return None
    for name, deployment in app.deployments.items() if app else []:
        if reason := failure_reason(name, deployment.message or ""):
            return reason
    return None


def _shutdown() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def serve_command(
    targets: list[Path],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    replicas: int | None = None,
    max_batch_size: int | None = None,
    batch_wait_ms: float | None = None,
    token_file: Path | None = None,
    detach: bool = False,
    ingress: str = "auto",
    config_out: Path | None = None,
    runtime: str | None = None,
) -> None:
    """Serve bundles (or run folders) over HTTP until Ctrl-C, or write a Serve config file."""
    if not targets:
        raise SurgeryError("give at least one bundle or run folder to serve")
    check_ingress(ingress)
    if runtime is not None and runtime not in CHOICES:
        raise SurgeryError(f"unknown --runtime {runtime!r}; choose one of {', '.join(CHOICES)}")
    bundles = [str(resolve_bundle(t)) for t in targets]
    verify_bundles(bundles, formats=config_out is not None)
    args: dict[str, Any] = {"bundles": bundles}
    for key, value in (
        ("replicas", replicas),
        ("max_batch_size", max_batch_size),
        ("batch_wait_ms", batch_wait_ms),
        ("runtime", runtime),
    ):
        if value is not None:
            args[key] = value
    token = read_token(token_file)
    if token is None and not _is_loopback(host):
        print(
            f"warning: serving on {host} without a bearer token: anyone who can reach this port can use the models "
            f"(pass --token-file or set {TOKEN_ENV})",
            file=sys.stderr,
        )
    if config_out is not None:
        if token_file is not None:  # the path, never the secret, goes into a config file
            args["token_file"] = str(Path(token_file).resolve())
        config = serve_config(args, host, port, Machine(None, None))  # it runs where it is deployed
        Path(config_out).write_text(
            f"# Ray Serve config written by `surgery serve`: `serve run {config_out}` or `serve deploy {config_out}`.\n"
            f"# Without token_file, replicas require the bearer token in ${TOKEN_ENV} when it is set in their environment.\n"
            + yaml.safe_dump(config, sort_keys=False)
        )
        print(f"wrote {config_out}")
        return

    if not os.environ.get("RAY_ADDRESS"):
        own_ray_environment()  # before `serve.app` imports Ray
    if token is not None:
        args["token_sha256"] = hashlib.sha256(token.encode()).hexdigest()
    config = serve_config(args, host, port, Machine.here())
    if not os.environ.get("RAY_ADDRESS"):
        total = sum(
            d.get("num_replicas") or d.get("autoscaling_config", {}).get("max_replicas", 1)
            for d in config["applications"][0]["deployments"]
        )
        args.update(_local_resources(total))
    from serve.app import build_app

    app = build_app(args)  # reads every manifest: a bad bundle fails here, before Ray starts
    timeout_s = config["http_options"]["request_timeout_s"]

    ingress_env: dict[str, str] = {}
    if not os.environ.get("RAY_ADDRESS"):  # a cluster's ingress is the cluster's business
        ingress_env = ingress_environment(ingress, port)
        os.environ.update(ingress_env)
    _start_ray(detach)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        _deploy(app, host, port, timeout_s)
        _announce(bundles, host, port, detach)
        if detach:
            return
        while True:
            time.sleep(1)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM, during deployment or while serving
        print("shutting down", flush=True)
    finally:
        if not detach:
            _shutdown()
            if state := state_folder(ingress_env):  # HAProxy's state: ours, and done with
                shutil.rmtree(state, ignore_errors=True)


def _announce(bundles: list[str], host: str, port: int, detach: bool) -> None:
    base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    for bundle in bundles:
        name = read_manifest(bundle)["name"]
        print(f"serving {name}: POST {base}/v1/models/{name}:predict")
    print(f"docs: {base}/docs")
    if detach:
        print(
            "running in the background; stop it with `RAY_AUTH_MODE=token serve shutdown -y` (the app; Ray's CLI "
            "needs the token mode said) or `ray stop` (Ray itself)"
        )
    else:
        print("press Ctrl-C to stop")
    sys.stdout.flush()
