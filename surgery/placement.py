"""Placement: where the model runs and how ranks cooperate, as one small object `fit` talks to.

`fit` never asks which strategy a recipe chose; it asks the placement for its device, rank and
world size, to prepare (wrap) and unwrap the model, to skip gradient sync on accumulation
micro-steps, to all-reduce metrics, to wait at a barrier and to report an epoch's results.
`surgery plan` asks the same object where each parameter lives, so plan and fit agree.

One implementation per strategy. `SingleDevice` is the base: every method is what a lone process
does, and the parallel strategies override only what differs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgery.errors import SurgeryError
from surgery.schema import Recipe


def resolve_device(setting: str, local_rank: int = 0) -> torch.device:
    """`placement.device` → a torch device; `auto` is CUDA (this process's local rank) if present,
    else CPU. Asking for a device this machine lacks is an error, never a silent fallback."""
    if setting == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SurgeryError(f"placement.device is {setting!r} but CUDA is not available here; use `auto` or `cpu`")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        elif device.index >= torch.cuda.device_count():
            raise SurgeryError(
                f"placement.device is {setting!r} but this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SurgeryError("placement.device is 'mps' but MPS is not available here; use `auto` or `cpu`")
    return device


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

    def report(self, epoch: int, metrics: Mapping[str, float], checkpoint: Path | None) -> None:
        """Hand an evaluated epoch's metrics (and its checkpoint, if one was saved) to whoever
        launched the run: nothing locally; Ray Train or Ray Tune when they did."""

    def parameter_devices(self, model: nn.Module) -> dict[str, str]:
        """Parameter name → where it lives while training (for `surgery plan`)."""
        return dict.fromkeys((n for n, _ in model.named_parameters()), str(self.device))

    def close(self) -> None:
        """Release what the strategy set up (process groups)."""


def refused_strategy(recipe: Recipe) -> str | None:
    """Why this build cannot carry out `placement.strategy`, or None when it can."""
    strategy = recipe.placement.strategy
    if strategy == "single":
        return None
    return (
        f"placement.strategy {strategy!r} is not available in this version of surgery; "
        "use `single` (one device), or train on one device and keep the recipe for a later version"
    )


def placement_for(recipe: Recipe) -> SingleDevice:
    """The placement object of `recipe.placement` for this process."""
    if reason := refused_strategy(recipe):
        raise SurgeryError(reason)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return SingleDevice(resolve_device(recipe.placement.device, local_rank))


def planned_devices(model: nn.Module, recipe: Recipe) -> dict[str, str]:
    """Parameter name → the device (or pipeline stage) it lives on during training, as `surgery
    plan` shows it: for the machine the recipe targets, so no device is checked for here."""
    from surgery.freeze import match_params

    names = [n for n, _ in model.named_parameters()]
    placement = recipe.placement
    if placement.strategy == "pipeline":
        where = dict.fromkeys(names, f"stage0:{placement.stages[0].device}")
        for i, stage in enumerate(placement.stages):
            for glob in stage.params:
                for n in match_params(glob, names):
                    where[n] = f"stage{i}:{stage.device}"
        return where
    device = placement.device
    if device == "auto":
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    if placement.strategy == "ddp":
        return dict.fromkeys(names, f"{device.split(':')[0]} ×{placement.workers} (each)")
    return dict.fromkeys(names, device)
