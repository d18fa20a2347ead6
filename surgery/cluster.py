"""The environment a process finds itself in: `torchrun`'s variables, the CPU cores it may use,
and the Ray cluster it works with (`RAY_ADDRESS`'s, or a local one of its own).

Detection is kept apart from what is done with it (Lightning Fabric's cluster environments), so
choosing a placement, joining a process group and starting Ray read the same answers. No torch
and no training code: `serve/` starts its Ray here too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


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


def local_rank() -> int:
    """This process's rank on its machine (0 when no launcher set LOCAL_RANK)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def ray_address() -> str | None:
    """The Ray cluster named by RAY_ADDRESS, if any."""
    return os.environ.get("RAY_ADDRESS") or None


def start_ray(*, worker_logs: bool, node_ip: str | None = None) -> bool:
    """Connect to Ray, the one way surgery does it: the Ray this process is already connected to,
    else `RAY_ADDRESS`'s cluster, else a local Ray of our own (`address="local"`: never another
    `ray start` instance found on this machine, such as a detached `surgery serve`). No dashboard,
    no usage stats, warnings only. `worker_logs`: print the workers' output here (a Ray Train
    build shows its rank 0's progress; Tune's trials would interleave theirs). `node_ip`: the
    address a local Ray binds to. True when this call connected, so the caller shuts Ray down."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    settings = {"logging_level": "WARNING", "log_to_driver": worker_logs}
    address = ray_address()
    if address:  # a dashboard is the cluster's own business
        ray.init(address=address, **settings)
    elif node_ip:
        ray.init(address="local", include_dashboard=False, _node_ip_address=node_ip, **settings)
    else:
        ray.init(address="local", include_dashboard=False, **settings)
    return True
