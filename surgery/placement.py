"""Placement: where the model runs and how ranks cooperate, as one small object `fit` talks to.

`fit` never asks which strategy a recipe chose; it asks the placement for its device, rank and
world size, to prepare (wrap) and unwrap the model, to skip gradient sync on accumulation
micro-steps, to all-reduce metrics, to wait at a barrier and to report an epoch's results.
`surgery plan` asks the same object where each parameter lives, so plan and fit agree.

One implementation per strategy. `SingleDevice` is the base: every method is what a lone process
does, and the parallel strategies override only what differs: `DistributedDataParallel` (a rank
of a process group: local processes, `torchrun`), `RayTrainWorker` (a rank that Ray Train started,
reporting to it) and `PipelineStages` (the model split over devices, batches split into
micro-batches).

How a run is launched is the other half: `launcher_for(recipe)` checks everything this machine
must provide (devices, CPUs, Ray Train, stages that cover the model in forward order) before any
folder or process exists, then runs `fit` in this process, in `workers` local processes (torch's
elastic launcher, the one `torchrun` uses), or on Ray Train (`train_on_ray`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from surgery.errors import SurgeryError
from surgery.registry import did_you_mean
from surgery.schema import Recipe

T = TypeVar("T")


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

        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = resolve_device(recipe.placement.device, local_rank)
        if device.type == "cpu":  # processes share the cores (as torchrun's OMP_NUM_THREADS=1 does)
            local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
            torch.set_num_threads(max(1, _cpu_count() // local))
        elif device.type == "cuda":
            torch.cuda.set_device(device)
        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
        return cls(device, rank, world_size, owns_group=owns)

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
    group; every evaluated epoch is reported to Ray with the checkpoint rank 0 saved in the run
    folder (which is Ray's storage, so Ray registers it where it is instead of copying it)."""

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

    def report(self, epoch: int, metrics: Mapping[str, float], checkpoint: Path | None) -> None:
        import ray.train

        saved = ray.train.Checkpoint(str(checkpoint)) if checkpoint is not None else None
        ray.train.report(
            {**metrics, "epoch": epoch + 1},
            checkpoint=saved,
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD,
        )


# --------------------------------------------------------------------------- pipeline


def _move(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (tuple, list)):
        return type(value)(_move(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    return value


def _to_stage(device: torch.device) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return _move(args, device), _move(kwargs, device)

    return hook


class MicroBatches(nn.Module):
    """Runs a batch through the staged model as `chunks` micro-batches, in order, and gathers the
    outputs on the first stage's device (where the targets are). Kernel launches are asynchronous,
    so while a later stage works on micro-batch i the earlier one already starts on i+1 (GPipe);
    one backward over the gathered outputs accumulates every micro-batch's gradients."""

    def __init__(self, model: nn.Module, chunks: int, out_device: torch.device) -> None:
        super().__init__()
        self.model = model
        self.chunks = chunks
        self.out_device = out_device

    def forward(self, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.chunks == 1:
            return _move(self.model(*inputs), self.out_device)
        parts = list(zip(*(t.chunk(self.chunks) for t in inputs), strict=True))
        outputs = [self.model(*part) for part in parts]
        return {k: torch.cat([o[k].to(self.out_device) for o in outputs]) for k in outputs[0]}


def _children_range(model: nn.Module, entry: str) -> list[str]:
    first, last = entry.split("..")
    parent, _, a = first.rpartition(".")
    parent_b, _, b = last.rpartition(".")
    if parent != parent_b:
        raise SurgeryError(
            f"stage range {entry!r}: both ends must be children of one module ({parent!r} ≠ {parent_b!r})"
        )
    names = [n for n, _ in _submodule(model, parent, entry).named_children()]
    for end in (a, b):
        if end not in names:
            raise SurgeryError(
                f"stage range {entry!r}: {parent or 'the model'} has no module {end!r}{did_you_mean(end, names)}"
            )
    i, j = names.index(a), names.index(b)
    if i > j:
        raise SurgeryError(f"stage range {entry!r} runs backwards: {b!r} comes before {a!r} in {parent or 'the model'}")
    prefix = f"{parent}." if parent else ""
    return [prefix + n for n in names[i : j + 1]]


def _submodule(model: nn.Module, path: str, entry: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        raise SurgeryError(
            f"stage entry {entry!r}: the model has no module {path!r}{did_you_mean(path, names)}"
        ) from None


def stage_assignment(model: nn.Module, stages: list[tuple[list[str], Any]]) -> dict[str, int]:
    """Module (or directly owned parameter) path → stage index, with every parameter and buffer of
    the model covered exactly once; a bad stage list is a SurgeryError naming the problem."""
    owned = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    where: dict[str, int] = {}
    for index, (entries, _device) in enumerate(stages):
        for entry in entries:
            if ".." in entry:
                paths = _children_range(model, entry)
            elif entry in owned:
                paths = [entry]
            else:
                _submodule(model, entry, entry)
                paths = [entry]
            for path in paths:
                for other in where:
                    if path == other or path.startswith(other + ".") or other.startswith(path + "."):
                        raise SurgeryError(
                            f"stage {index} names {path!r}, which overlaps {other!r} of stage {where[other]}"
                        )
                where[path] = index
    uncovered = sorted(n for n in owned if _stage_of(n, where) is None)
    if uncovered:
        modules = sorted({_widest_uncovered(n, owned, set(uncovered)) for n in uncovered})
        shown = ", ".join(modules[:6]) + (f" and {len(modules) - 6} more" if len(modules) > 6 else "")
        raise SurgeryError(f"placement.stages leave parts of the model on no stage: {shown}")
    return where


def _widest_uncovered(name: str, owned: set[str], uncovered: set[str]) -> str:
    """The outermost module around `name` that is uncovered as a whole (for the error)."""
    while "." in name:
        parent = name.rpartition(".")[0]
        if any(n.startswith(parent + ".") and n not in uncovered for n in owned):
            break
        name = parent
    return name


def _owner(name: str, where: Mapping[str, int]) -> str | None:
    """The stage entry (module or parameter path) that covers `name`."""
    while name:
        if name in where:
            return name
        name = name.rpartition(".")[0]
    return None


def _stage_of(name: str, where: Mapping[str, int]) -> int | None:
    owner = _owner(name, where)
    return None if owner is None else where[owner]


def _staged_modules(model: nn.Module, where: Mapping[str, int]) -> list[tuple[str, nn.Module]]:
    """Every module on a stage that holds weights of its own (parameters or buffers), and each
    stage entry's module: where activations must be on the stage's device."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if name
        and _owner(name, where) is not None
        and (
            name in where
            or any(True for _ in module.parameters(recurse=False))
            or any(True for _ in module.buffers(recurse=False))
        )
    ]


def check_forward_order(model: nn.Module, where: Mapping[str, int]) -> None:
    """Stages must run in the order they are listed: one forward of example inputs records which
    stage each module that runs belongs to."""
    calls: list[str] = []
    handles = [
        module.register_forward_pre_hook(lambda m, a, name=name: calls.append(name))
        for name, module in _staged_modules(model, where)
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model(*model.example_inputs(2))  # type: ignore[operator]
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    owners = [o for o in (_owner(name, where) for name in calls) if o is not None]
    for path_a, path_b in itertools.pairwise(owners):
        if where[path_b] < where[path_a]:
            raise SurgeryError(
                f"placement.stages are out of forward order: {path_b!r} (stage {where[path_b]}) runs after "
                f"{path_a!r} (stage {where[path_a]})"
            )


class PipelineStages(SingleDevice):
    """`strategy: pipeline`: consecutive modules on each stage's device, activations moved to the
    next stage's device as they enter it, each batch split into `micro_batches`. One process."""

    name = "pipeline"

    def __init__(self, stages: list[tuple[list[str], torch.device]], micro_batches: int) -> None:
        super().__init__(stages[0][1])  # inputs, targets and gathered outputs live on the first stage
        self.stages = stages
        self.micro_batches = micro_batches
        self._hooks: list[Any] = []

    def prepare_model(self, model: nn.Module) -> nn.Module:
        model = self.unwrap(model)
        where = stage_assignment(model, self.stages)
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        for path, index in where.items():
            device = self.stages[index][1]
            if path in params or path in buffers:
                tensor = params[path] if path in params else buffers[path]
                tensor.data = tensor.data.to(device)  # a tensor its (split) module owns directly
                continue
            model.get_submodule(path).to(device)
        for name, module in _staged_modules(model, where):
            device = self.stages[where[_owner(name, where)]][1]  # type: ignore[index]
            self._hooks.append(module.register_forward_pre_hook(_to_stage(device), with_kwargs=True))
        return MicroBatches(model, self.micro_batches, self.device)

    def unwrap(self, model: nn.Module) -> Any:
        return model.model if isinstance(model, MicroBatches) else model

    def parameter_devices(self, model: nn.Module) -> dict[str, str]:
        model = self.unwrap(model)
        where = stage_assignment(model, self.stages)
        return {
            n: f"stage{i}:{self.stages[i][1]}"
            for n, _ in model.named_parameters()
            if (i := _stage_of(n, where)) is not None
        }

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


# --------------------------------------------------------------------------- checks


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def uses_ray(recipe: Recipe) -> bool:
    """`ddp` runs on Ray Train: asked for, or a cluster named by RAY_ADDRESS (not under torchrun)."""
    placement = recipe.placement
    return (
        placement.strategy == "ddp"
        and not _under_torchrun()
        and (placement.engine == "ray" or bool(os.environ.get("RAY_ADDRESS")))
    )


def _check_ddp_local(recipe: Recipe) -> None:
    placement = recipe.placement
    device = resolve_device(placement.device)
    if device.type == "cuda" and placement.workers > torch.cuda.device_count():
        raise SurgeryError(
            f"placement.workers is {placement.workers} but this machine has {torch.cuda.device_count()} CUDA "
            "device(s); ddp runs one worker per GPU"
        )
    if device.type == "cpu" and placement.workers > _cpu_count():
        raise SurgeryError(
            f"placement.workers is {placement.workers} but this machine has {_cpu_count()} CPU core(s); "
            "ddp on CPU runs at most one worker per core"
        )


def _check_torchrun(recipe: Recipe) -> None:
    placement = recipe.placement
    world = int(os.environ["WORLD_SIZE"])
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
    resolve_device(placement.device, int(os.environ.get("LOCAL_RANK", "0")))


def _check_ray(recipe: Recipe) -> None:
    try:
        import ray.train
        import ray.train.torch  # noqa: F401
    except ImportError:
        raise SurgeryError(
            "placement.engine is 'ray' (or RAY_ADDRESS is set) but Ray Train is not installed; "
            "`pip install 'ray[train]'`, or use `engine: local`"
        ) from None


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
    if _under_torchrun():
        _check_torchrun(recipe)
        return DistributedDataParallel.from_env(recipe)
    if strategy == "pipeline":
        return PipelineStages(_pipeline_devices(recipe), recipe.placement.micro_batches)
    if strategy == "ddp":
        raise SurgeryError("placement.strategy 'ddp' runs in worker processes; start it with `surgery build`")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return SingleDevice(resolve_device(recipe.placement.device, local_rank))


def planned_devices(model: nn.Module, recipe: Recipe) -> dict[str, str]:
    """Parameter and module name → the device (or pipeline stage) it lives on during training, as
    `surgery plan` shows it: for the machine the recipe targets, so no device is checked for here
    (a pipeline's stages are checked against the model)."""
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_modules() if n]
    placement = recipe.placement
    if placement.strategy == "pipeline":
        where = check_pipeline(model, recipe)
        return {n: f"stage{i}:{placement.stages[i].device}" for n in names if (i := _stage_of(n, where)) is not None}
    device = placement.device
    if device == "auto":
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    if placement.strategy == "ddp":
        kind = device.split(":")[0]
        where_ = f"Ray Train {kind} ×{placement.workers}" if uses_ray(recipe) else f"{kind} ×{placement.workers}"
        return dict.fromkeys(names, f"{where_} (each)")
    return dict.fromkeys(names, device)


# --------------------------------------------------------------------------- launchers


class InProcess:
    """`fit` in this process: one device, a pipeline, or one rank under `torchrun`."""

    def __init__(self, placement: SingleDevice) -> None:
        self.placement = placement

    @property
    def is_main(self) -> bool:
        return self.placement.is_main

    def on_main(self, make: Callable[[], T]) -> T:
        on_main = getattr(self.placement, "on_main", None)
        return on_main(make) if on_main else make()

    def fit(self, recipe: Recipe, run_dir: Path, *, resume: bool, force: bool) -> None:
        from surgery.train import fit

        fit(recipe, run_dir, resume=resume, force=force, placement=self.placement)

    def close(self) -> None:
        self.placement.close()


class LocalProcesses:
    """`ddp` on this machine: `workers` processes started by torch's elastic launcher (what
    `torchrun` runs), each calling `fit` as one rank; a worker that dies takes the others down
    (`surgery build --resume` continues from the last checkpoint)."""

    is_main = True

    def __init__(self, recipe: Recipe) -> None:
        self.workers = recipe.placement.workers

    def on_main(self, make: Callable[[], T]) -> T:
        return make()

    def fit(self, recipe: Recipe, run_dir: Path, *, resume: bool, force: bool) -> None:
        import logging
        import uuid

        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.launcher.api import LaunchConfig, elastic_launch

        logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=self.workers,
            run_id=str(uuid.uuid4()),
            rdzv_backend="c10d",
            rdzv_endpoint="127.0.0.1:0",
            max_restarts=0,  # restarting a killed group hung in our tests: Ray Train does restarts
            monitor_interval=0.1,
            start_method="spawn",
            local_addr="127.0.0.1",
        )
        try:
            elastic_launch(config, _local_worker)(recipe, str(run_dir), resume, force)
        except ChildFailedError as exc:
            raise SurgeryError(_first_failure(exc)) from None

    def close(self) -> None:
        pass


def _first_failure(exc: Any) -> str:
    rank, failure = min(exc.failures.items(), key=lambda item: item[1].timestamp)
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", message)
    text = str(message).strip().splitlines()
    line = text[0] if text else f"exit code {failure.exitcode}"
    return f"ddp worker {rank} failed: {line}"


def _has_checkpoint(run_dir: Path) -> bool:
    from surgery import checkpoint as ckpt

    try:
        ckpt.find_last(run_dir)
    except SurgeryError:
        return False
    return True


def _local_worker(recipe: Recipe, run_dir: str, resume: bool, force: bool) -> None:
    """One local ddp rank (a spawned process): join the group, fit, leave."""
    from torch.distributed.elastic.multiprocessing.errors import record

    try:
        record(_local_rank_fit)(recipe, run_dir, resume, force)
    except SurgeryError:
        raise SystemExit(1) from None  # recorded for the launcher's one-line error; no traceback here


def _local_rank_fit(recipe: Recipe, run_dir: str, resume: bool, force: bool) -> None:
    from surgery.train import fit

    placement = DistributedDataParallel.from_env(recipe)
    try:
        fit(recipe, Path(run_dir), resume=resume, force=force, placement=placement)
    finally:
        placement.close()


class RayTrain:
    """`ddp` on Ray Train: see `train_on_ray`."""

    is_main = True

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe

    def on_main(self, make: Callable[[], T]) -> T:
        return make()

    def fit(self, recipe: Recipe, run_dir: Path, *, resume: bool, force: bool) -> None:
        train_on_ray(recipe, run_dir, resume=resume, force=force)

    def close(self) -> None:
        pass


def _ray_worker(config: dict[str, Any]) -> None:
    """One Ray Train rank: `fit` with a placement that reports to Ray. Restarted after a worker
    failure, it continues from the last checkpoint (Ray's reported one, or a newer step checkpoint
    in the run folder)."""
    import ray.train

    from surgery.train import fit

    run_dir = Path(config["run_dir"])
    restarted = ray.train.get_checkpoint() is not None or _has_checkpoint(run_dir)
    placement = RayTrainWorker.from_context()
    fit(config["recipe"], run_dir, resume=config["resume"] or restarted, force=config["force"], placement=placement)


def train_on_ray(
    recipe: Recipe,
    run_dir: Path,
    *,
    resume: bool = False,
    force: bool = False,
    callbacks: Sequence[Any] = (),
) -> Any:
    """Run `fit` for `recipe` on Ray Train's `TorchTrainer` (`placement.workers` workers, one GPU
    each when the device is CUDA) into `run_dir`, which must already exist: it is the run's Ray
    storage (`storage_path` its parent, `name` its name), so Ray's checkpoints are the run's own.
    `placement.max_failures` restarts the workers from the last checkpoint after one dies.

    Uses the Ray this process is connected to, else `RAY_ADDRESS`'s cluster, else a local Ray
    (stopped again afterwards). `callbacks` are Ray Train callbacks: Ray Tune passes
    `ray.tune.integration.ray_train.TuneReportCallback()` to receive every epoch's report.
    Returns Ray's `Result`; a failed run raises SurgeryError with the first error's message."""
    _check_ray(recipe)
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    placement = recipe.placement
    use_gpu = resolve_device_kind(placement.device) == "cuda"
    started = not ray.is_initialized()
    if started:
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, logging_level="WARNING")
        else:  # a Ray of our own: never another `ray start` instance found on this machine (a detached serve)
            ray.init(address="local", include_dashboard=False, logging_level="WARNING")
    try:
        _check_ray_resources(placement.workers, use_gpu)
        run_dir = Path(run_dir).resolve()
        trainer = TorchTrainer(
            _ray_worker,
            train_loop_config={"recipe": recipe, "run_dir": str(run_dir), "resume": resume, "force": force},
            scaling_config=ray.train.ScalingConfig(
                num_workers=placement.workers, use_gpu=use_gpu, resources_per_worker={"CPU": 1}
            ),
            run_config=ray.train.RunConfig(
                storage_path=str(run_dir.parent),
                name=run_dir.name,
                failure_config=ray.train.FailureConfig(max_failures=placement.max_failures),
                callbacks=list(callbacks) or None,
            ),
        )
        try:
            return trainer.fit()
        except ray.train.TrainingFailedError as exc:
            raise SurgeryError(f"Ray Train failed: {_ray_error_line(exc)}") from None
    finally:
        if started:
            ray.shutdown()


def resolve_device_kind(setting: str) -> str:
    """`cuda` or `cpu` for a ddp worker (`auto`: CUDA when this machine, the driver, has it)."""
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting.split(":")[0]


def _check_ray_resources(workers: int, use_gpu: bool) -> None:
    import ray

    resources = ray.cluster_resources()
    kind = "GPU" if use_gpu else "CPU"
    have = int(resources.get(kind, 0))
    if workers > have:
        raise SurgeryError(
            f"placement.workers is {workers} but the Ray cluster has {have} {kind}(s); "
            f"each Ray Train worker takes one {kind}"
        )


def _ray_error_line(exc: BaseException) -> str:
    text = str(exc)
    for line in text.splitlines():
        if "SurgeryError" in line or "Error:" in line:
            return line.strip()
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def launcher_for(recipe: Recipe) -> InProcess | LocalProcesses | RayTrain:
    """How `surgery build` runs `fit` for this recipe, after checking everything this machine must
    provide: any bad placement is a one-line SurgeryError here, before a folder or a process."""
    placement = recipe.placement
    if placement.strategy == "pipeline":
        from surgery.model import build_model

        _pipeline_devices(recipe)  # devices this machine lacks
        check_pipeline(build_model(recipe, load_weights=False), recipe)
    if _under_torchrun() or placement.strategy != "ddp":
        return InProcess(placement_for(recipe))
    if uses_ray(recipe):
        _check_ray(recipe)
        return RayTrain(recipe)
    _check_ddp_local(recipe)
    return LocalProcesses(recipe)
