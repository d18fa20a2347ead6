"""Checks that span fields, run once every field validated on its own (`surgery.recipe` reports
their problems with the others, each at its path): unique head names, metric names that `fit`
reports, and settings only another placement strategy or search algorithm would use."""

from __future__ import annotations

import re
from typing import NamedTuple

from surgery.registry import did_you_mean
from surgery.sections.data_checks import data_problems
from surgery.sections.placement import Placement
from surgery.sections.recipe import Recipe
from surgery.sections.tuning import Tune


class Problem(NamedTuple):
    """A validation problem at a field path (tuple of keys and indices)."""

    path: tuple[str | int, ...]
    message: str


def metric_keys(recipe: Recipe) -> list[str]:
    """Every metric name `fit` reports, in the form `monitor` fields use."""
    keys = ["val/loss", "train/loss"]
    for head in recipe.heads:
        keys.append(f"val/{head.name}/loss")
        keys.extend(f"val/{head.name}/{m}" for m in head.metrics)
    return keys


def cross_check(recipe: Recipe) -> list[Problem]:
    """Checks that span fields (run after each field validated on its own)."""
    problems: list[Problem] = []
    seen: set[str] = set()
    for i, head in enumerate(recipe.heads):
        if head.name in seen:
            problems.append(Problem(("heads", i, "name"), f"duplicate head name {head.name!r}"))
        seen.add(head.name)
        if head.loss.label_smoothing and head.loss.name != "cross_entropy":
            problems.append(
                Problem(("heads", i, "loss", "label_smoothing"), "label_smoothing applies to cross_entropy only")
            )
    keys = metric_keys(recipe)

    def check_metric(path: tuple[str | int, ...], value: str) -> None:
        if value not in keys:
            problems.append(
                Problem(
                    path, f"unknown metric {value!r}{did_you_mean(value, keys)}; reported metrics are {', '.join(keys)}"
                )
            )

    check_metric(("train", "checkpoint", "monitor"), recipe.train.checkpoint.monitor)
    if recipe.train.early_stopping is not None:
        check_metric(("train", "early_stopping", "monitor"), recipe.train.early_stopping.monitor)
    if recipe.tune is not None:
        check_metric(("tune", "metric"), recipe.tune.metric)
        problems.extend(_tune_problems(recipe.tune))
    problems.extend(_placement_problems(recipe.placement))
    problems.extend(Problem(p.path, p.message) for p in data_problems(recipe))
    return problems


def _placement_problems(placement: Placement) -> list[Problem]:
    """Placement fields that only mean something for another strategy are errors, not ignored."""
    problems: list[Problem] = []
    strategy = placement.strategy

    def refuse(key: str, message: str) -> None:
        problems.append(Problem(("placement", key), message))

    if strategy == "pipeline":
        if len(placement.stages) < 2:
            refuse("stages", "strategy 'pipeline' needs at least two stages")
        if placement.engine == "ray":
            refuse("engine", "a pipeline runs in one process; `engine: ray` applies to `ddp`")
    elif placement.stages:
        refuse("stages", f"stages apply to strategy 'pipeline', not {strategy!r}")
    if strategy != "pipeline" and placement.micro_batches != 1:
        refuse("micro_batches", f"micro_batches apply to strategy 'pipeline', not {strategy!r}")
    if strategy != "ddp":
        if placement.workers != 1:
            refuse("workers", f"workers apply to strategy 'ddp', not {strategy!r}")
        if placement.max_failures:
            refuse("max_failures", f"max_failures apply to strategy 'ddp', not {strategy!r}")
        if strategy == "single" and placement.engine == "ray":
            refuse(
                "engine", "`engine: ray` runs `ddp` workers on Ray Train; use `strategy: ddp` (`workers: 1` for one)"
            )
    elif placement.max_failures and placement.engine != "ray":
        refuse(
            "max_failures",
            "worker restarts need `engine: ray` (Ray Train restarts them from the last checkpoint); "
            "a local ddp run that fails continues with `surgery build --resume`",
        )
    if strategy == "ddp" and re.fullmatch(r"cuda:[0-9]+|mps", placement.device):
        refuse("device", f"ddp gives each worker its own GPU; use `cuda`, `cpu` or `auto`, not {placement.device!r}")
    return problems


def _tune_problems(tune: Tune) -> list[Problem]:
    """Domains and schedulers the chosen search algorithm cannot carry out."""
    problems: list[Problem] = []
    for path, domain in tune.space.items():
        where = ("tune", "space", path)
        if tune.search == "grid" and domain.kind != "grid":
            problems.append(
                Problem(where, f"search 'grid' tries listed values only; write `grid: [...]` here (got {domain.kind})")
            )
        if tune.search in ("bohb", "optuna") and domain.kind == "grid":
            problems.append(
                Problem(where, f"search {tune.search!r} samples its own points; use `choice` instead of `grid`")
            )
    if tune.search == "bohb" and tune.scheduler not in (None, "hyperband"):
        problems.append(
            Problem(("tune", "scheduler"), "search 'bohb' runs with its own HyperBand (HyperBandForBOHB); drop this")
        )
    return problems
