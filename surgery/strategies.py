"""Strategies: the placement objects `fit` talks to, one per way of running a model.

`fit` never asks which strategy a recipe chose; it asks the placement for its device, rank and
world size, to prepare (wrap) and unwrap the model, to skip gradient sync on accumulation
micro-steps, to all-reduce metrics and to wait at a barrier (`surgery.ranks.Placement`).

`SingleDevice` is the base: every method is what a lone process does, and the parallel strategies
override only what differs: `DistributedDataParallel` (a rank of a process group: local
processes, `torchrun`) and `RayTrainWorker` (a rank that Ray Train started). Pipeline stages live
in `surgery.pipeline`. How a run is launched and where its epochs are reported is not a
strategy's business: see `surgery.launchers`, `surgery.ray_train` and `surgery.report`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from torch import nn

from surgery.cluster import TorchrunRank, cpu_count
from surgery.devices import resolve_device
from surgery.errors import SurgeryError
from surgery.schema import Recipe

T = TypeVar("T")


class SingleDevice:
    """The whole model on one device in one process (`strategy: single`)."""

    name = "single"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rank = 0
        self.world_size = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run folder: checkpoints, TensorBoard, metrics, the lock file."""
        return self.rank == 0

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Move the model where it trains and wrap it as the strategy needs; call again after the
        trainable set changes (gradual unfreezing), with the unwrapped model."""
        return model.to(self.device)

    def unwrap(self, model: nn.Module) -> Any:
        """The `SurgicalModel` inside whatever `prepare_model` wrapped it in (stable parameter names)."""
        return model

    def no_sync(self, model: nn.Module, last: bool) -> contextlib.AbstractContextManager[Any]:
        """Context for one accumulation micro-step's backward: gradients are synchronised only on
        the `last` micro-step of an optimizer step."""
        return contextlib.nullcontext()

    def all_reduce(self, values: Mapping[str, float], weight: float = 1.0) -> dict[str, float]:
        """Weighted mean of `values` over ranks (each rank's `weight` is its sample count)."""
        return dict(values)

    def barrier(self) -> None:
        """Wait until every rank got here (after rank 0 wrote a checkpoint)."""

    def parameter_devices(self, model: nn.Module) -> dict[str, str]:
        """Parameter name → where it lives while training (for `surgery plan`)."""
        return dict.fromkeys((n for n, _ in model.named_parameters()), str(self.device))

    def close(self) -> None:
        """Release what the strategy set up (process groups)."""


# --------------------------------------------------------------------------- data parallel


def _unreached_parameters(model: nn.Module, device: torch.device) -> bool:
    """Whether some trainable parameter gets no gradient from a forward (a backbone's classifier
    that no head reads): DDP must then look for unused parameters every step, or it hangs waiting
    for their gradients. Decided by one eval-mode forward of example inputs, which changes no
    weights, statistics or random state."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            outputs = model(*(t.to(device) for t in model.example_inputs(2)))  # type: ignore[operator]
            total = sum(o.float().sum() for o in outputs.values())
            if not isinstance(total, torch.Tensor) or not total.requires_grad:
                return True
            grads = torch.autograd.grad(total, trainable, allow_unused=True)
    finally:
        model.train(was_training)
    return any(g is None for g in grads)


class DistributedDataParallel(SingleDevice):
    """One rank of `strategy: ddp`: the whole model on this rank's device, wrapped in torch's
    `DistributedDataParallel`; gradients are averaged over ranks in the backward of the last
    accumulation micro-step. Gloo on CPU, NCCL on GPUs."""

    name = "ddp"

    def __init__(self, device: torch.device, rank: int, world_size: int, *, owns_group: bool) -> None:
        super().__init__(device)
        self.rank, self.world_size = rank, world_size
        self._owns_group = owns_group

    @classmethod
    def from_env(cls, recipe: Recipe) -> DistributedDataParallel:
        """Join the process group that `torchrun` (or `surgery build`'s own launcher) describes in
        RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT."""
        import torch.distributed as dist

        me = TorchrunRank.from_env()
        device = resolve_device(recipe.placement.device, me.local_rank)
        if device.type == "cpu":  # processes share the cores (as torchrun's OMP_NUM_THREADS=1 does)
            torch.set_num_threads(max(1, cpu_count() // me.local_world_size))
        elif device.type == "cuda":
            torch.cuda.set_device(device)
        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=me.rank, world_size=me.world_size)
        return cls(device, me.rank, me.world_size, owns_group=owns)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = self.unwrap(model).to(self.device)
        if self.world_size == 1 or not any(p.requires_grad for p in model.parameters()):
            return model  # nothing to synchronise
        return DDP(
            model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=_unreached_parameters(model, self.device),
            gradient_as_bucket_view=True,
        )

    def unwrap(self, model: nn.Module) -> Any:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return model.module if isinstance(model, DDP) else model

    def no_sync(self, model: nn.Module, last: bool) -> contextlib.AbstractContextManager[Any]:
        from torch.nn.parallel import DistributedDataParallel as DDP

        if last or not isinstance(model, DDP):
            return contextlib.nullcontext()
        return model.no_sync()

    def all_reduce(self, values: Mapping[str, float], weight: float = 1.0) -> dict[str, float]:
        import torch.distributed as dist

        keys = sorted(values)  # the same order on every rank
        device = self.device if self.device.type == "cuda" else torch.device("cpu")
        sums = torch.tensor([float(values[k]) * weight for k in keys] + [float(weight)], dtype=torch.float64)
        sums = sums.to(device)
        dist.all_reduce(sums)
        total = float(sums[-1]) or 1.0
        return {k: float(sums[i]) / total for i, k in enumerate(keys)}

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def on_main(self, make: Callable[[], T]) -> T:
        """`make()` on rank 0 only (creating the run folder), its result handed to every rank; an
        error there is raised on every rank (so no rank waits for a folder that never comes)."""
        import torch.distributed as dist

        box: list[Any] = [None]
        failure: Exception | None = None
        if self.is_main:
            try:
                box[0] = ("ok", make())
            except Exception as exc:
                failure = exc
                box[0] = ("error", exc if isinstance(exc, SurgeryError) else SurgeryError(f"rank 0 failed: {exc}"))
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        status, value = box[0]
        if failure is not None:
            raise failure
        if status == "error":
            raise value
        return value

    def close(self) -> None:
        import torch.distributed as dist

        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()


class RayTrainWorker(DistributedDataParallel):
    """A rank of `strategy: ddp` that Ray Train's `TorchTrainer` started: Ray made the process
    group and chose the device. (What it reports to Ray is `surgery.ray_train.RayTrainReport`'s
    business, not the strategy's.)"""

    name = "ddp on Ray Train"

    @classmethod
    def from_context(cls) -> RayTrainWorker:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        device = ray.train.torch.get_device()
        if device.type == "cpu":
            torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        return cls(device, context.get_world_rank(), context.get_world_size(), owns_group=False)
