"""Placement: choosing, for a recipe's `placement`, the object `fit` talks to and the launcher
that runs it, after checking everything this machine must provide.

`placement_for(recipe)` is this process's placement (one device, pipeline stages, or its rank
under `torchrun`); `launcher_for(recipe)` checks the devices, CPUs, Ray Train and the stages (that
they cover the model in forward order) before any folder or process exists, and returns how
`surgery build` runs `fit`: in this process, in `workers` local processes, or on Ray Train.
`planned_devices` is the same choice as `surgery plan` shows it.

The pieces live one concern to a module, imported one way (nothing here imports training code):
`cluster` (torchrun, CPUs, Ray) → `devices` → `strategies` (`SingleDevice`,
`DistributedDataParallel`, `RayTrainWorker`) → `pipeline` (`PipelineStages`) → `launchers`
(`InProcess`, `LocalProcesses`) and `ray_train` (`RayTrain`, `train_on_ray`) → this module, which
re-exports the names callers import from `surgery.placement`.
"""

from __future__ import annotations

import torch
from torch import nn

from surgery.cluster import TorchrunRank, cpu_count, local_rank, ray_address, under_torchrun
from surgery.devices import resolve_device, resolve_device_kind
from surgery.errors import SurgeryError
from surgery.launchers import InProcess, LocalProcesses
from surgery.pipeline import MicroBatches, PipelineStages, check_forward_order, stage_assignment, stage_of
from surgery.ray_train import RayTrain, check_local_ray, check_ray_train
from surgery.schema import Recipe
from surgery.strategies import DistributedDataParallel, RayTrainWorker, SingleDevice

__all__ = [
    "DistributedDataParallel",
    "InProcess",
    "LocalProcesses",
    "MicroBatches",
    "PipelineStages",
    "RayTrain",
    "RayTrainWorker",
    "SingleDevice",
    "check_forward_order",
    "check_pipeline",
    "launcher_for",
    "placement_for",
    "planned_devices",
    "resolve_device",
    "resolve_device_kind",
    "stage_assignment",
    "uses_ray",
]


def uses_ray(recipe: Recipe) -> bool:
    """`ddp` runs on Ray Train: asked for, or a cluster named by RAY_ADDRESS (not under torchrun)."""
    placement = recipe.placement
    return placement.strategy == "ddp" and not under_torchrun() and (placement.engine == "ray" or bool(ray_address()))


def _check_ddp_local(recipe: Recipe) -> None:
    placement = recipe.placement
    device = resolve_device(placement.device)
    if device.type == "cuda" and placement.workers > torch.cuda.device_count():
        raise SurgeryError(
            f"placement.workers is {placement.workers} but this machine has {torch.cuda.device_count()} CUDA "
            "device(s); ddp runs one worker per GPU"
        )
    if device.type == "cpu" and placement.workers > cpu_count():
        raise SurgeryError(
            f"placement.workers is {placement.workers} but this machine has {cpu_count()} CPU core(s); "
            "ddp on CPU runs at most one worker per core"
        )


def _check_torchrun(recipe: Recipe) -> None:
    placement = recipe.placement
    me = TorchrunRank.from_env()
    world = me.world_size
    if placement.strategy != "ddp":
        raise SurgeryError(
            f"started under torchrun with WORLD_SIZE={world}, but placement.strategy is {placement.strategy!r}; "
            "use `--set placement.strategy=ddp`, or start surgery without torchrun"
        )
    if world != placement.workers:
        raise SurgeryError(
            f"torchrun started {world} processes but placement.workers is {placement.workers}; "
            f"use `--set placement.workers={world}` (data.batch_size is per worker)"
        )
    resolve_device(placement.device, me.local_rank)


def _pipeline_devices(recipe: Recipe) -> list[tuple[list[str], torch.device]]:
    return [(list(s.modules), resolve_device(s.device)) for s in recipe.placement.stages]


def check_pipeline(model: nn.Module, recipe: Recipe) -> dict[str, int]:
    """Stages that name existing modules, cover the model, and follow its forward order."""
    stages = [(list(s.modules), s.device) for s in recipe.placement.stages]
    where = stage_assignment(model, stages)
    check_forward_order(model, where)
    return where


def placement_for(recipe: Recipe) -> SingleDevice:
    """The placement object of `recipe.placement` for this process: one device, a pipeline, or
    (under `torchrun`) this process's rank of the ddp group."""
    strategy = recipe.placement.strategy
    if under_torchrun():
        _check_torchrun(recipe)
        return DistributedDataParallel.from_env(recipe)
    if strategy == "pipeline":
        return PipelineStages(_pipeline_devices(recipe), recipe.placement.micro_batches)
    if strategy == "ddp":
        raise SurgeryError("placement.strategy 'ddp' runs in worker processes; start it with `surgery build`")
    return SingleDevice(resolve_device(recipe.placement.device, local_rank()))


def planned_devices(model: nn.Module, recipe: Recipe) -> dict[str, str]:
    """Parameter and module name → the device (or pipeline stage) it lives on during training, as
    `surgery plan` shows it: for the machine the recipe targets, so no device is checked for here
    (a pipeline's stages are checked against the model)."""
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_modules() if n]
    placement = recipe.placement
    if placement.strategy == "pipeline":
        where = check_pipeline(model, recipe)
        return {n: f"stage{i}:{placement.stages[i].device}" for n in names if (i := stage_of(n, where)) is not None}
    device = placement.device
    if device == "auto":
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    if placement.strategy == "ddp":
        kind = device.split(":")[0]
        where_ = f"Ray Train {kind} ×{placement.workers}" if uses_ray(recipe) else f"{kind} ×{placement.workers}"
        return dict.fromkeys(names, f"{where_} (each)")
    return dict.fromkeys(names, device)


def launcher_for(recipe: Recipe) -> InProcess | LocalProcesses | RayTrain:
    """How `surgery build` runs `fit` for this recipe, after checking everything this machine must
    provide: any bad placement is a one-line SurgeryError here, before a folder or a process."""
    placement = recipe.placement
    if placement.strategy == "pipeline":
        from surgery.model import build_model

        _pipeline_devices(recipe)  # devices this machine lacks
        check_pipeline(build_model(recipe, load_weights=False), recipe)
    if under_torchrun() or placement.strategy != "ddp":
        return InProcess(placement_for(recipe))
    if uses_ray(recipe):
        check_ray_train(recipe)
        check_local_ray(recipe)  # a cluster named by RAY_ADDRESS is asked when the launcher connects
        return RayTrain(recipe)
    _check_ddp_local(recipe)
    return LocalProcesses(recipe)
