"""The mechanics of one optimizer step: batches to the device, micro-batches grouped per step,
forward and backward under autocast with gradient accumulation (cut finer when memory runs out),
gradient clipping, the check that the step's loss and gradients are finite (a step that is not is
skipped and counted; `MAX_NONFINITE_IN_A_ROW` of them stop the run), and the window of logged
loss and throughput between logged steps.

These speak to a placement only for the device, no-sync and the all-rank out-of-memory vote, so
the same step runs on one device and on every DDP rank.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from surgery import oom
from surgery.errors import SurgeryError
from surgery.monitor import Progress, RunMonitor
from surgery.ranks import Placement
from surgery.schema import Recipe
from surgery.train_state import TrainState, diverged


def check_precision(precision: str, device_type: str) -> None:
    """`train.precision` this device can train in (fp16 needs CUDA's GradScaler and kernels)."""
    if precision == "fp16" and device_type != "cuda":
        raise SurgeryError(f"train.precision fp16 needs a CUDA device (this run is on {device_type}); use bf16 or fp32")


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The autocast context of `train.precision` (fp32: none)."""
    check_precision(precision, device.type)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def to_device(batch: tuple[Any, dict[str, torch.Tensor]], device: torch.device) -> tuple[Any, dict[str, torch.Tensor]]:
    """A batch on `device`: inputs are a tuple of model inputs, or a dict of cached head inputs."""
    inputs, targets = batch
    blocking = device.type == "cuda"
    moved = (
        {k: t.to(device, non_blocking=blocking) for k, t in inputs.items()}
        if isinstance(inputs, dict)
        else tuple(t.to(device, non_blocking=blocking) for t in inputs)
    )
    return moved, {k: t.to(device, non_blocking=blocking) for k, t in targets.items()}


def forward(net: Any, inputs: Any) -> dict[str, torch.Tensor]:
    """The model's outputs for model inputs, or the heads' alone for cached head inputs."""
    return net(head_inputs=inputs) if isinstance(inputs, dict) else net(*inputs)


def groups(loader_iter: Iterator[Any], first: int, total: int, accumulate: int) -> Iterator[list[Any]]:
    """Micro-batches grouped per optimizer step; group boundaries are fixed by position in the
    epoch (so a resumed epoch groups exactly as the uninterrupted one)."""
    group: list[Any] = []
    for position in range(first, total):
        group.append(next(loader_iter))
        if (position + 1) % accumulate == 0 or position + 1 == total:
            yield group
            group = []


def _accumulate(
    net: Any,
    model: Any,
    group: list[Any],
    split: int,
    recipe: Recipe,
    placement: Placement,
    scaler: Any,
    agreed: list[bool],
) -> tuple[torch.Tensor, int]:
    """Forward and backward of one optimizer step: each loaded batch of `group` cut into `split`
    micro-batches, each piece's loss weighted by its share, so the gradient is the step's mean.
    Returns the summed batch losses and the samples seen."""
    from surgery.heads import compute_losses

    device = placement.device
    loss_sum, samples = torch.zeros((), device=device), 0
    for i, batch in enumerate(group):
        inputs, targets = to_device(batch, device)
        parts = oom.pieces(inputs, targets, split)
        for j, (x, y, share) in enumerate(parts):
            last = i == len(group) - 1 and j == len(parts) - 1
            with placement.no_sync(net, last=last):
                with autocast(recipe.train.precision, device):
                    outputs = forward(net, x)
                    loss, _per_head = compute_losses(model, outputs, y, recipe)
                if last:  # every rank says it got here before the backward that synchronises them
                    if oom.any_rank(placement, False):
                        raise oom.PeerOutOfMemory
                    agreed[0] = True
                scaler.scale(loss / (len(group) / share)).backward()
            loss_sum += loss.detach().float() * share
        samples += oom.batch_size(targets)
    return loss_sum, samples


def train_step(
    net: Any,
    model: Any,
    group: list[Any],
    state: TrainState,
    recipe: Recipe,
    placement: Placement,
    scaler: Any,
    optimizer: Any,
    monitor: RunMonitor,
    progress: Progress,
) -> tuple[torch.Tensor, int]:
    """`_accumulate` at the run's micro-batch split; on out-of-memory, free the step's memory,
    cut micro-batches in half (accumulating twice as many: the same effective batch and learning
    rate), log it and retry the same step. `state.micro_split` keeps the split (checkpointed)."""
    batch = recipe.data.batch_size if recipe.data else 1
    while True:
        agreed, mine = [False], False
        try:
            return _accumulate(net, model, group, state.micro_split, recipe, placement, scaler, agreed)
        except torch.OutOfMemoryError as err:
            error, mine = str(err), True
        except oom.PeerOutOfMemory:
            error = "another rank ran out of memory"
        if mine and placement.world_size > 1:
            if agreed[0]:
                raise oom.unrecoverable(placement.device, state.step, error)
            oom.any_rank(placement, True)
        oom.free_memory(placement.device, optimizer)
        split = oom.next_split(state.micro_split, batch, device=placement.device, step=state.step, error=error)
        micro, accumulate = math.ceil(batch / split), recipe.train.accumulate * split
        progress.note(
            f"out of memory on {placement.device} at step {state.step + 1}: micro-batch {math.ceil(batch / state.micro_split)} → "
            f"{micro}, accumulating {accumulate} per step (effective batch {batch * recipe.train.accumulate} unchanged); "
            "retrying the step"
        )
        state.micro_split, state.oom_retries = split, state.oom_retries + 1
        monitor.scalars(
            state.step, {"train/micro_batch": micro, "train/oom_retries": state.oom_retries}, epoch=state.epoch
        )


def clip_gradients(model: Any, optimizer: Any, scaler: Any, clip: float | None) -> torch.Tensor | None:
    """The gradients' global norm (unscaled, before clipping), clipping them to `clip` if set;
    None when no parameter has a gradient. Measured every step: a non-finite norm is how a step
    that must be skipped is found."""
    scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return None
    if clip:
        # clip_grad_norm_ scales by clip / norm: with a non-finite norm it would write NaN into
        # every gradient, so clip only a step that will be taken
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if torch.isfinite(norm):
            torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
        return norm
    return torch.nn.utils.get_total_norm([p.grad for p in params])


# A run stops when this many optimizer steps in a row had a non-finite loss or gradient norm: one
# bad batch is skipped and training goes on; five in a row is a run that diverged.
MAX_NONFINITE_IN_A_ROW = 5


def nonfinite_part(
    loss_sum: torch.Tensor, grad_norm: torch.Tensor | None, placement: Placement, *, precision: str, scale: float
) -> str | None:
    """What was not finite in this step ("loss", "gradient norm"), or None when the step may be
    taken. The gradient norm, the same on every rank once DDP averaged the gradients, decides
    under several ranks (so they all skip together); one process also looks at its loss. In fp16,
    scaled gradients that overflow are GradScaler's own business while its scale is at least 1 (it
    skips the step and lowers the scale: that is how it calibrates), so they are not counted."""
    if placement.world_size == 1 and not bool(torch.isfinite(loss_sum)):
        return "loss"
    if grad_norm is not None and not bool(torch.isfinite(grad_norm)):
        if precision == "fp16" and scale >= 1.0:
            return None
        return "gradient norm"
    return None


def floating_buffers(model: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(buffer, copy) of the floating buffers of modules in training mode: a training forward
    updates BatchNorm statistics before anyone knows the step is non-finite, so a skipped step puts
    them back. Modules in eval mode (a frozen backbone's BatchNorm) change nothing and cost nothing."""
    return [
        (b, b.detach().clone())
        for module in model.modules()
        if module.training
        for b in module.buffers(recurse=False)
        if b.is_floating_point()
    ]


def restore_buffers(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for buffer, copy in saved:
            buffer.copy_(copy)


def count_nonfinite(state: TrainState, what: str, precision: str, progress: Progress, monitor: RunMonitor) -> None:
    """Count a skipped non-finite step (TensorBoard `train/nonfinite_steps`, the summary); stop
    the run with one line when `MAX_NONFINITE_IN_A_ROW` came in a row."""
    step = state.step + 1
    state.nonfinite_steps += 1
    state.nonfinite_in_a_row += 1
    monitor.scalars(step, {"train/nonfinite_steps": state.nonfinite_steps}, epoch=state.epoch)
    if state.nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
        raise diverged(f"step {step} had a non-finite {what} ({state.nonfinite_in_a_row} steps in a row)", precision)
    progress.note(f"step {step}: non-finite {what} ({precision}); step skipped, weights unchanged")


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The scalar of each parameter group's learning rate, named by its `lr_scale`."""
    lrs: dict[str, float] = {}
    for group in optimizer.param_groups:
        lrs[f"lr/scale_{group.get('lr_scale', 1.0):g}"] = float(group["lr"])
    return lrs


@dataclass
class LogWindow:
    """Training loss and samples since the last logged step: what the next log line averages.
    The loss stays on the device (summed there) until it is logged."""

    loss: torch.Tensor
    batches: int = 0
    samples: int = 0
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def on(cls, device: torch.device) -> LogWindow:
        return cls(torch.zeros((), device=device))

    def add(self, loss_sum: torch.Tensor, batches: int, samples: int) -> None:
        self.loss += loss_sum
        self.batches += batches
        self.samples += samples

    def mean_loss(self) -> float:
        return float(self.loss) / max(1, self.batches)

    def throughput(self) -> float:
        """Samples per second since the window opened."""
        return self.samples / max(1e-9, time.perf_counter() - self.started)

    def reset(self) -> None:
        self.loss.zero_()
        self.batches, self.samples, self.started = 0, 0, time.perf_counter()
