"""One split of training data before preprocessing (`Examples`), and the seeded hold-out split.

What every data source returns; nothing here reads files or knows a source's format
(`read_source` hands the recipe to its registered source).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from surgery.errors import DataError
from surgery.registry import DATA_SOURCES


@dataclass
class Examples:
    """One split before preprocessing.

    `kind` says what `inputs` holds: "image" (PIL images or image file paths), "text" (strings),
    or "tensor" (a tuple of tensors, one per model input, first dimension = samples).
    """

    kind: str
    inputs: Any
    targets: dict[str, torch.Tensor]
    class_names: dict[str, list[str]] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why) left out (`on_bad_file: skip`)

    def __len__(self) -> int:
        return len(self.inputs[0]) if self.kind == "tensor" else len(self.inputs)

    def subset(self, indices: Sequence[int] | torch.Tensor) -> Examples:
        index = torch.as_tensor(indices if isinstance(indices, torch.Tensor) else list(indices), dtype=torch.long)
        if self.kind == "tensor":
            inputs: Any = tuple(_rows(t, index) for t in self.inputs)
        else:
            inputs = _rows(self.inputs, index)
        targets = {name: t[index] for name, t in self.targets.items()}
        return Examples(self.kind, inputs, targets, self.class_names, self.skipped)


def read_source(recipe: Any, model: Any) -> tuple[Examples, Examples]:
    """(train, val) from the recipe's data source, with Python's cycle collector paused: a source
    builds an object or more per row and no cycles, and each full collection walks them all, which
    made start-up grow faster than the table (200k rows: 2.4 s with it, 1.3 s without)."""
    assert recipe.data is not None
    with _collector_paused():
        return DATA_SOURCES.get(recipe.data.source)(recipe, model)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _rows(inputs: Any, index: torch.Tensor) -> Any:
    """Some rows of a tensor, a list, or a lazily read column (`surgery.data_hf.ArrowRows`: still lazy)."""
    if isinstance(inputs, torch.Tensor):
        return inputs[index]
    if hasattr(inputs, "subset"):
        return inputs.subset(index)
    return [inputs[i] for i in index.tolist()]


def split_examples(examples: Examples, val_split: float, seed: int) -> tuple[Examples, Examples]:
    """Seeded hold-out split (independent of the training seed)."""
    n = len(examples)
    n_val = max(1, round(n * val_split))
    if n_val >= n:
        raise DataError(f"data.val_split {val_split} leaves no training samples out of {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return examples.subset(order[n_val:].sort().values), examples.subset(order[:n_val].sort().values)


def strata(examples: Examples) -> torch.Tensor | None:
    """The class of each sample by the first single-label head (what stratified subsets keep)."""
    for target in examples.targets.values():
        if target.dim() == 1 and (target.dtype == torch.long or ((target == 0) | (target == 1)).all()):
            return target.long()
    return None


def limit_examples(examples: Examples, limit: int, seed: int) -> Examples:
    """At most `limit` samples: a seeded subset in which each class keeps its share (stratified),
    in the original order, so `limit_train: 8` of class-sorted data is not eight of class 0."""
    n = len(examples)
    if limit >= n:
        return examples
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    classes = strata(examples)
    if classes is None:
        return examples.subset(order[:limit].sort().values)
    # Rank each sample within its class (in the seeded order), as a fraction of the class size:
    # the `limit` smallest fractions take every class in proportion to its size.
    keys = torch.empty(n, dtype=torch.float64)
    jitter = torch.rand(n, generator=gen, dtype=torch.float64)
    for c in classes.unique().tolist():
        members = order[classes[order] == c]
        keys[members] = (torch.arange(len(members), dtype=torch.float64) + jitter[members]) / len(members)
    chosen = torch.argsort(keys)[:limit]
    return examples.subset(chosen.sort().values)


def class_counts(examples: Examples) -> dict[str, dict[str, int]]:
    """Samples per class for each classification head (label-list heads count each label)."""
    counts: dict[str, dict[str, int]] = {}
    for head, target in examples.targets.items():
        names = examples.class_names.get(head)
        if target.dim() == 2 and names and target.shape[1] == len(names):
            totals = target.sum(0).long().tolist()
        elif target.dim() == 1 and (target.dtype == torch.long or names):
            size = len(names) if names else int(target.max().item()) + 1 if len(target) else 0
            totals = torch.bincount(target.long(), minlength=size).tolist()
        else:
            continue
        labels = names or [str(i) for i in range(len(totals))]
        counts[head] = {labels[i]: int(c) for i, c in enumerate(totals) if i < len(labels)}
    return counts
