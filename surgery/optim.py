"""Optimizers and learning-rate schedules from the `OPTIMIZERS` and `SCHEDULERS` registries.

The optimizer holds every parameter, frozen ones included (`freeze.param_groups`), so gradual
unfreezing only flips `requires_grad`: no optimizer rebuild, and checkpoints keep one layout.
Frozen parameters have no gradient, and torch optimizers skip those.

Every schedule is a `LambdaLR` multiplier of each group's own lr (base lr × the group's
`lr_scale`), a pure function of the optimizer step, so resuming restores it from `last_epoch`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from surgery.registry import OPTIMIZERS, SCHEDULERS
from surgery.schema import Optimizer, Recipe, Scheduler

LrFactor = Callable[[int], float]


@OPTIMIZERS.implements("sgd")
def _sgd(groups: list[dict[str, Any]], opt: Optimizer) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        groups,
        lr=opt.lr,
        momentum=opt.momentum,
        nesterov=opt.nesterov,  # with momentum > 0: the recipe check refuses nesterov without it
        weight_decay=opt.weight_decay,
    )


@OPTIMIZERS.implements("adam")
def _adam(groups: list[dict[str, Any]], opt: Optimizer) -> torch.optim.Optimizer:
    return torch.optim.Adam(groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay)


@OPTIMIZERS.implements("adamw")
def _adamw(groups: list[dict[str, Any]], opt: Optimizer) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay)


@OPTIMIZERS.implements("rmsprop")
def _rmsprop(groups: list[dict[str, Any]], opt: Optimizer) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(groups, lr=opt.lr, momentum=opt.momentum, eps=opt.eps, weight_decay=opt.weight_decay)


def build_optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """The recipe's optimizer over `freeze.param_groups` (all parameters; lr = base × lr_scale)."""
    from surgery.freeze import param_groups

    opt = recipe.train.optimizer
    groups = []
    for group in param_groups(model, recipe):
        group = dict(group)
        group["lr"] = opt.lr * float(group.get("lr_scale", 1.0))
        groups.append(group)
    return OPTIMIZERS.get(opt.name)(groups, opt)


# --------------------------------------------------------------------------- schedules


def _warmup(sched: Scheduler, after: Callable[[float], float], total_steps: int) -> LrFactor:
    """Linear warmup over `warmup_steps`, then `after(progress)` with progress 0 → 1 over the rest."""
    warmup = sched.warmup_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        span = max(1, total_steps - warmup)
        return after(min(1.0, (step - warmup) / span))

    return factor


@SCHEDULERS.implements("constant")
def _constant(sched: Scheduler, lr: float, total_steps: int, steps_per_epoch: int) -> LrFactor:
    return _warmup(sched, lambda _: 1.0, total_steps)


@SCHEDULERS.implements("cosine")
def _cosine(sched: Scheduler, lr: float, total_steps: int, steps_per_epoch: int) -> LrFactor:
    floor = min(1.0, sched.min_lr / lr)
    return _warmup(sched, lambda p: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)), total_steps)


@SCHEDULERS.implements("linear")
def _linear(sched: Scheduler, lr: float, total_steps: int, steps_per_epoch: int) -> LrFactor:
    floor = min(1.0, sched.min_lr / lr)
    return _warmup(sched, lambda p: floor + (1 - floor) * (1 - p), total_steps)


@SCHEDULERS.implements("step")
def _step(sched: Scheduler, lr: float, total_steps: int, steps_per_epoch: int) -> LrFactor:
    def factor(step: int) -> float:
        if step < sched.warmup_steps:
            return (step + 1) / (sched.warmup_steps + 1)
        return sched.gamma ** ((step // max(1, steps_per_epoch)) // sched.step_epochs)

    return factor


@SCHEDULERS.implements("onecycle")
def _onecycle(sched: Scheduler, lr: float, total_steps: int, steps_per_epoch: int) -> LrFactor:
    # As torch's OneCycleLR (cosine, pct_start 0.3, div 25, final div 1e4), as a multiplier.
    rise = max(1, sched.warmup_steps or int(0.3 * total_steps))
    start, end = 1 / 25, max(sched.min_lr / lr, 1 / 25 / 1e4)

    def cos(a: float, b: float, p: float) -> float:
        return b + (a - b) * 0.5 * (1 + math.cos(math.pi * p))

    def factor(step: int) -> float:
        if step < rise:
            return cos(start, 1.0, step / rise)
        return cos(1.0, end, min(1.0, (step - rise) / max(1, total_steps - rise)))

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, recipe: Recipe, *, total_steps: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The recipe's schedule as a per-step `LambdaLR` (call `.step()` after each optimizer step)."""
    sched = recipe.train.scheduler
    factor = SCHEDULERS.get(sched.name)(sched, recipe.train.optimizer.lr, max(1, total_steps), steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Current lr per param group, keyed by the group's `name` (or its index)."""
    return {str(group.get("name", i)): float(group["lr"]) for i, group in enumerate(optimizer.param_groups)}
