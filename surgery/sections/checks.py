"""Checks that span fields, run once every field validated on its own (`surgery.recipe` reports
their problems with the others, each at its path): unique head names, metric names that `fit`
reports, and settings only another backbone source, input kind, placement strategy or search
algorithm would use (a field that would be ignored is refused, never silently dropped)."""

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
    problems.extend(_backbone_problems(recipe))
    problems.extend(_input_problems(recipe))
    problems.extend(_augment_problems(recipe))
    optimizer = recipe.train.optimizer
    if optimizer.nesterov and (optimizer.name != "sgd" or optimizer.momentum == 0):
        problems.append(
            Problem(
                ("train", "optimizer", "nesterov"),
                f"nesterov momentum applies to sgd with momentum > 0, not {optimizer.name} with momentum "
                f"{optimizer.momentum:g}",
            )
        )
    if recipe.export.batch_size is not None and recipe.export.dynamic_batch:
        problems.append(
            Problem(
                ("export", "batch_size"),
                "batch_size fixes the batch of graphs without a dynamic batch axis; set dynamic_batch: false, or remove it",
            )
        )
    autoscaling = recipe.serve.autoscaling
    if autoscaling is not None and autoscaling.min_replicas > autoscaling.max_replicas:
        problems.append(
            Problem(
                ("serve", "autoscaling", "min_replicas"),
                f"min_replicas {autoscaling.min_replicas} is above max_replicas {autoscaling.max_replicas}",
            )
        )
    return problems


def _reads_text(recipe: Recipe) -> bool:
    """Whether the model reads text (transformers backbones are text encoders); else images."""
    return recipe.backbone.source == "transformers"


def _backbone_problems(recipe: Recipe) -> list[Problem]:
    """Backbone fields that the chosen source or origin of weights would ignore."""
    backbone, problems = recipe.backbone, []
    if backbone.revision is not None:
        if backbone.source != "transformers":
            problems.append(
                Problem(
                    ("backbone", "revision"),
                    f"revision picks a Hugging Face hub revision (source transformers); "
                    f"{backbone.source} weights have none: remove it",
                )
            )
        elif backbone.name.startswith("package:"):
            problems.append(
                Problem(("backbone", "revision"), "a `package:` model is the folder its package ships; remove revision")
            )
    if backbone.sha256 is not None and not backbone.weights:
        problems.append(
            Problem(
                ("backbone", "sha256"), "sha256 pins the `weights:` file, and there is none; set weights or remove it"
            )
        )
    return problems


def image_channels(recipe: Recipe) -> int:
    """The channels an image model reads: `input.channels`, else the last `input_channels`
    surgery, else `backbone.kwargs.in_chans`, else 3 (every timm and torchvision model's)."""
    if recipe.input is not None and recipe.input.channels is not None:
        return recipe.input.channels
    ops = [op.input_channels for op in recipe.surgery if op.input_channels is not None]
    if ops:
        return ops[-1]
    in_chans = recipe.backbone.kwargs.get("in_chans")
    return in_chans if isinstance(in_chans, int) and not isinstance(in_chans, bool) else 3


def _input_problems(recipe: Recipe) -> list[Problem]:
    """`input:` fields the model's kind of input (text or image) has no use for; `mean`/`std` of
    a length that fits neither one value for every channel nor one per channel."""
    over, problems = recipe.input, []
    if over is None:
        return problems
    if _reads_text(recipe):
        for key in ("size", "channels", "mean", "std"):
            if getattr(over, key) is not None:
                problems.append(
                    Problem(("input", key), f"{key} is an image setting; this model reads text (set max_length)")
                )
        return problems
    if over.max_length is not None:
        problems.append(Problem(("input", "max_length"), "max_length is a text setting; this model reads images"))
    channels = image_channels(recipe)
    for key in ("mean", "std"):
        values = getattr(over, key)
        if values is not None and len(values) not in (1, channels):
            give = "give 1" if channels == 1 else f"give 1 (every channel) or {channels} (one per channel)"
            what = f"{channels} channel" + ("s" if channels > 1 else "")
            problems.append(Problem(("input", key), f"{key} has {len(values)} values for {what}; {give}"))
    return problems


def _augment_problems(recipe: Recipe) -> list[Problem]:
    """Augmentations the data's inputs cannot take: every one on text, and all but
    `gaussian_noise` on feature vectors (a flip would reverse the vector, a crop cut it)."""
    data, problems = recipe.data, []
    if data is None:
        return problems
    for i, augmentation in enumerate(data.augment):
        where = ("data", "augment", i, augmentation.kind)
        if _reads_text(recipe):
            problems.append(Problem(where, "augmentations transform images; this model reads text: remove it"))
        elif data.feature_columns and augmentation.kind != "gaussian_noise":
            problems.append(
                Problem(
                    where,
                    f"{augmentation.kind} transforms images; data.feature_columns gives feature vectors, "
                    "where only gaussian_noise applies",
                )
            )
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
