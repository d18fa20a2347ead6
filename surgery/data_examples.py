"""One split of training data before preprocessing (`Examples`), and the seeded hold-out split.

What every data source returns; nothing here reads files or knows a source's format.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from surgery.errors import DataError


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

    def subset(self, indices: Sequence[int]) -> Examples:
        index = torch.as_tensor(list(indices), dtype=torch.long)
        if self.kind == "tensor":
            inputs: Any = tuple(t[index] for t in self.inputs)
        else:
            inputs = [self.inputs[i] for i in indices]
        targets = {name: t[index] for name, t in self.targets.items()}
        return Examples(self.kind, inputs, targets, self.class_names, self.skipped)


def split_examples(examples: Examples, val_split: float, seed: int) -> tuple[Examples, Examples]:
    """Seeded hold-out split (independent of the training seed)."""
    n = len(examples)
    n_val = max(1, round(n * val_split))
    if n_val >= n:
        raise DataError(f"data.val_split {val_split} leaves no training samples out of {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return examples.subset(sorted(order[n_val:])), examples.subset(sorted(order[:n_val]))
