"""The environment a process finds itself in: `torchrun`'s variables, the CPU cores it may use,
and the Ray cluster it works with (`RAY_ADDRESS`'s, or a local one of its own).

Detection is kept apart from what is done with it (Lightning Fabric's cluster environments), so
choosing a placement, joining a process group and starting Ray read the same answers. No torch
and no training code: `serve/` starts its Ray here too.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery.errors import SurgeryError


def cpu_count() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def under_torchrun() -> bool:
    """Whether `torchrun` (or `surgery build`'s own elastic launcher) started this process as a rank."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


@dataclass(frozen=True)
class TorchrunRank:
    """This process's rank as `torchrun` describes it in RANK, WORLD_SIZE, LOCAL_RANK and
    LOCAL_WORLD_SIZE (the rendezvous itself is MASTER_ADDR/MASTER_PORT, read by torch)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @classmethod
    def from_env(cls) -> TorchrunRank:
        world_size = int(os.environ["WORLD_SIZE"])
        return cls(
            rank=int(os.environ["RANK"]),
            world_size=world_size,
            local_rank=local_rank(),
            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size))),
        )


def report_rank_error(message: str) -> bool:
    """A one-line error of this process: under `torchrun`, record it where torchrun's failure
    summary reads it (TORCHELASTIC_ERROR_FILE) and say whether this rank prints it too: rank 0
    alone, so every rank finding the same problem does not print it once each. Elsewhere: print."""
    if not under_torchrun():
        return True
    if path := os.environ.get("TORCHELASTIC_ERROR_FILE"):
        import json
        import time

        with contextlib.suppress(OSError):
            Path(path).write_text(json.dumps({"message": message, "timestamp": int(time.time())}))
    return os.environ.get("RANK") == "0"


def local_rank() -> int:
    """This process's rank on its machine (0 when no launcher set LOCAL_RANK)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def ray_address() -> str | None:
    """The Ray cluster named by RAY_ADDRESS, if any."""
    return os.environ.get("RAY_ADDRESS") or None


def ray_is_connected() -> bool:
    """Whether this process is already connected to Ray (a Tune trial, a test's Ray), without
    importing Ray when nothing has."""
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def ray_token_available() -> bool:
    """Whether this process has a Ray cluster token, where Ray's own loader looks for one:
    `RAY_AUTH_TOKEN`, the file `RAY_AUTH_TOKEN_PATH` names, or `~/.ray/auth_token` (which
    `ray start` and a local `ray.init` write)."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return True
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(named) if named else Path.home() / ".ray" / "auth_token"
    try:
        return bool(path.read_text().strip())
    except (OSError, UnicodeDecodeError):
        return False


def use_ray_token() -> None:
    """Turn Ray's token authentication on for this process when a token is at hand and
    RAY_AUTH_MODE does not say otherwise: what `ray start` does. `ray.init(address=...)` never
    does it (only a cluster it finds itself), so without this a `ray start --head` cluster, which
    requires its token by default, refuses `RAY_ADDRESS=host:port surgery ...`."""
    if "RAY_AUTH_MODE" in os.environ or not ray_token_available():
        return
    os.environ["RAY_AUTH_MODE"] = "token"  # inherited by the processes this one starts, too
    _reload_ray_config()


def _reload_ray_config() -> None:
    """Ray reads its config once per process: have it read RAY_AUTH_MODE again (as `ray start` does)."""
    try:
        from ray._raylet import Config

        Config.initialize("")
    except (ImportError, AttributeError):
        pass


CONNECT_HINT = (
    "if the cluster requires its token (the default for `ray start`), give it to this process: "
    "RAY_AUTH_TOKEN=<token> or RAY_AUTH_TOKEN_PATH=<file> (`ray get-auth-token` on the head prints it)"
)


def start_ray(*, worker_logs: bool, node_ip: str | None = None) -> bool:
    """Connect to Ray, the one way surgery does it: the Ray this process is already connected to,
    else `RAY_ADDRESS`'s cluster (with its token, as Ray's CLI finds it: `use_ray_token`), else a
    local Ray of our own (`address="local"`: never another `ray start` instance found on this
    machine, such as a detached `surgery serve`). No dashboard, no usage stats, warnings only.
    `worker_logs`: print the workers' output here (a Ray Train build shows its rank 0's
    progress; Tune's trials would interleave theirs). `node_ip`: the address a local Ray binds
    to. True when this call connected, so the caller shuts Ray down.

    Ray's own connection noise (a refused token is retried and logged for 20 s) goes to a log
    file; a cluster that cannot be reached is one line naming it and the fix."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    settings = {"logging_level": "WARNING", "log_to_driver": worker_logs}
    address = ray_address()
    if address:  # a dashboard is the cluster's own business
        use_ray_token()
        _connect(address, settings)
        return True
    if "RAY_AUTH_MODE" not in os.environ:  # token auth, Ray's default for a Ray it starts: said, it is not warned about
        os.environ["RAY_AUTH_MODE"] = "token"
        _reload_ray_config()
    if node_ip:
        ray.init(address="local", include_dashboard=False, _node_ip_address=node_ip, **settings)
    else:
        ray.init(address="local", include_dashboard=False, **settings)
    return True


def _connect(address: str, settings: dict[str, Any]) -> None:
    import ray

    from surgery.quiet import noise_to

    log = Path(tempfile.gettempdir()) / f"surgery-ray-connect-{os.getpid()}.log"
    try:
        with noise_to(log):
            ray.init(address=address, **settings)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        said = log.read_text(errors="replace") if log.is_file() else ""
        if "InvalidAuthToken" in said or "Unauthenticated" in said or "authentication" in str(exc).lower():
            reason = "it refused this process's token" if ray_token_available() else "it requires a token"
        else:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SurgeryError(
            f"could not connect to the Ray cluster at RAY_ADDRESS={address}: {reason}; {CONNECT_HINT} (Ray's log: {log})"
        ) from None
    log.unlink(missing_ok=True)
