"""Pipeline stages (`strategy: pipeline`): consecutive modules of one model on several devices in
one process, each batch split into micro-batches that flow through the stages (GPipe).

The stage list is checked against the model before anything trains: every entry names a module
(or a range `a..b` of one module's children), the stages cover every parameter and buffer exactly
once, and one forward of example inputs visits them in the order listed. `surgery plan` asks the
same assignment where each parameter lives.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from surgery.errors import SurgeryError
from surgery.registry import did_you_mean
from surgery.strategies import SingleDevice


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
    uncovered = sorted(n for n in owned if stage_of(n, where) is None)
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


def stage_of(name: str, where: Mapping[str, int]) -> int | None:
    """The stage that holds `name` (a parameter, buffer or module path), if any."""
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
            if (i := stage_of(n, where)) is not None
        }

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
