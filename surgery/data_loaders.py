"""Loaders: a recipe's data source, augmentations and order put together for one process's rank."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from surgery.data_augment import build_augmentations
from surgery.data_dataset import Collate, ExampleDataset
from surgery.data_examples import Examples, class_counts, limit_examples, read_source
from surgery.data_order import EpochBatchSampler
from surgery.errors import DataError
from surgery.inputs import InputSpec
from surgery.ranks import Rank
from surgery.schema import Recipe


@dataclass
class TrainingData:
    """What `fit` iterates: loaders, the sampler that owns the data order, and discovered classes."""

    train: DataLoader
    val: DataLoader
    sampler: EpochBatchSampler
    class_names: dict[str, list[str]]
    kind: str
    num_train: int
    num_val: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # unreadable files left out: (file, why)


def data_report(source: str, train: Examples, val: Examples) -> str:
    """One line per split: samples, per-class counts, and rows or files left out."""
    lines = []
    for split, examples in (("train", train), ("val", val)):
        counts = class_counts(examples)
        per_class = "; ".join(
            f"{head}: "
            + ", ".join(f"{label} {n}" for label, n in list(c.items())[:12])
            + (" ..." if len(c) > 12 else "")
            for head, c in counts.items()
        )
        lines.append(f"data {source} {split}: {len(examples)} samples" + (f" ({per_class})" if per_class else ""))
    skipped = list(dict.fromkeys([*train.skipped, *val.skipped]))
    if skipped:
        lines.append(f"data {source}: {len(skipped)} rows/files left out (first: {skipped[0][0]}: {skipped[0][1]})")
    return "\n".join(lines)


def auto_num_workers(setting: str | int, device: torch.device) -> int:
    """`auto`: 4 per GPU, capped by the CPU count; 0 on CPU (the main process is the fastest there)."""
    if setting != "auto":
        return int(setting)
    if device.type != "cuda":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4 * max(1, torch.cuda.device_count()), cpus - 1))


def load_examples(recipe: Recipe, model: Any) -> tuple[Examples, Examples]:
    """The recipe's training and validation examples (after `limit_train`/`limit_val`), as
    training sees them; bad data is a DataError here."""
    data = recipe.data
    if data is None:
        raise DataError("the recipe has no `data:` section; `surgery build` needs training data")
    train, val = read_source(recipe, model)
    if data.limit_train:
        train = limit_examples(train, data.limit_train, data.split_seed)
    if data.limit_val:
        val = limit_examples(val, data.limit_val, data.split_seed)
    if len(train) == 0 or len(val) == 0:
        raise DataError(
            f"data source {data.source!r} gave {len(train)} training and {len(val)} validation samples; both need at least one"
        )
    return train, val


def load_data(recipe: Recipe, model: Any, placement: Rank) -> TrainingData:
    """Build train/val loaders for the recipe's data and the built model, for this process's
    `placement` (its device, and its rank's shard of each epoch); bad data is a DataError here."""
    train, val = load_examples(recipe, model)
    data = recipe.data
    assert data is not None  # load_examples refused a recipe without data
    fit_input = getattr(getattr(model, "backbone", None), "fit_input", None)
    if callable(fit_input):  # a backbone that normalises its input from the training split (tabular)
        fit_input(train)
    if placement.is_main and recipe.monitor.progress != "none":  # `progress: none` asks for a quiet run
        print(data_report(data.source, train, val), file=sys.stderr)
    spec: InputSpec = model.input_spec
    augmentations = build_augmentations(data.augment, spec)
    rank, world_size, device = placement.rank, placement.world_size, placement.device
    sampler = EpochBatchSampler(
        len(train),
        data.batch_size,
        shuffle=data.shuffle,
        drop_last=data.drop_last,
        seed=recipe.train.seed,
        rank=rank,
        world_size=world_size,
    )
    workers = auto_num_workers(data.num_workers, device)
    pin = device.type == "cuda" if data.pin_memory == "auto" else bool(data.pin_memory)
    collate = Collate(model.tokenizer, spec)
    common: dict[str, Any] = {
        "num_workers": workers,
        "pin_memory": pin,
        "collate_fn": collate,
        "persistent_workers": False,
        # A private generator: creating an iterator must not consume the global RNG.
        "generator": torch.Generator().manual_seed(recipe.train.seed),
    }
    train_loader = DataLoader(
        ExampleDataset(train, spec, augmentations, recipe.train.seed), batch_sampler=sampler, **common
    )
    val_loader = DataLoader(
        ExampleDataset(val, spec), batch_size=data.eval_batch_size or data.batch_size, shuffle=False, **common
    )
    names = {**train.class_names, **val.class_names}
    skipped = list(dict.fromkeys([*train.skipped, *val.skipped]))
    return TrainingData(train_loader, val_loader, sampler, names, train.kind, len(train), len(val), skipped)
