"""Targets: a source's labels checked against the model's heads and turned into one tensor per head.

Sources call `class_targets` (class-per-folder labels) or `column_targets` (label columns of a
table); both check label names, class counts and tasks against the built model's heads.
"""

from __future__ import annotations

from typing import Any

import torch

from surgery.data_examples import Examples
from surgery.errors import DataError
from surgery.schema import Recipe


def head_columns(recipe: Recipe) -> dict[str, str]:
    """Head name -> the label column that trains it."""
    assert recipe.data is not None
    return {head.name: head.target or recipe.data.label_column for head in recipe.heads}


def _head_labels(recipe: Recipe, model: Any, name: str) -> list[str] | None:
    labels = model.head_info[name].labels
    if labels:
        return [str(x) for x in labels]
    head = next(h for h in recipe.heads if h.name == name)
    return [str(x) for x in head.labels] if head.labels else None


def class_targets(recipe: Recipe, model: Any, class_names: list[str], labels: torch.Tensor, where: str) -> Examples:
    """Targets for sources whose only label is a class (digits, image folders), checked against heads."""
    assert recipe.data is not None
    targets: dict[str, torch.Tensor] = {}
    names: dict[str, list[str]] = {}
    for name, column in head_columns(recipe).items():
        if column != recipe.data.label_column:
            raise DataError(
                f"head {name!r} trains on column {column!r}, but {where} has only class labels (data.label_column {recipe.data.label_column!r})"
            )
        info = model.head_info[name]
        task, out = info.task, info.out_features
        head_labels = _head_labels(recipe, model, name)
        if task == "regression":
            raise DataError(f"head {name!r} is a regression head, but {where} provides class labels")
        if task == "binary":
            if len(class_names) != 2 or out != 1:
                raise DataError(
                    f"head {name!r} is binary (1 output), but {where} has {len(class_names)} classes: {', '.join(class_names)}"
                )
            targets[name] = labels.to(torch.float32)
            names[name] = class_names
            continue
        if head_labels is not None:
            missing = sorted(set(class_names) - set(head_labels))
            if missing:
                raise DataError(
                    f"head {name!r} labels do not include the classes {', '.join(missing)} found in {where}"
                )
            remap = torch.tensor([head_labels.index(c) for c in class_names], dtype=torch.long)
            targets[name] = remap[labels]
            names[name] = head_labels
        else:
            targets[name] = labels.to(torch.long)
            names[name] = class_names
        if len(names[name]) != out:
            raise DataError(
                f"head {name!r} has {out} outputs, but {where} has {len(names[name])} classes ({', '.join(names[name][:12])}); set out_features: {len(names[name])}"
            )
    return Examples("image", [], targets, names)


def _int_like(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and value.strip().lstrip("-").isdigit()


def as_float(value: Any, column: str, where: str) -> float:
    """A cell as a number; a cell that isn't one is a DataError naming its column."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: column {column!r} holds {value!r}, which is not a number") from None


def column_targets(
    recipe: Recipe, model: Any, rows: dict[str, list[Any]], where: str
) -> tuple[dict[str, list[Any]], dict[str, list[str]]]:
    """Per head: the target values of every row (train+val together, so class maps agree), and class names."""
    targets: dict[str, list[Any]] = {}
    names: dict[str, list[str]] = {}
    for name, column in head_columns(recipe).items():
        values = rows[column]
        info = model.head_info[name]
        task, out = info.task, info.out_features
        if task == "regression" or (task == "binary" and out > 1):
            targets[name] = [
                [as_float(x, column, where) for x in v] if isinstance(v, list) else as_float(v, column, where)
                for v in values
            ]
            continue
        labels = _head_labels(recipe, model, name)
        if labels is None and not all(_int_like(v) for v in values):
            labels = sorted({str(v) for v in values})
        if labels is not None:
            unknown = sorted({str(v) for v in values} - set(labels))
            if unknown:
                raise DataError(
                    f"{where}: column {column!r} has values {', '.join(unknown[:5])} not among head {name!r} labels ({', '.join(labels[:12])})"
                )
            index = {label: i for i, label in enumerate(labels)}
            ids = [index[str(v)] for v in values]
            names[name] = labels
        else:
            ids = [int(v) for v in values]
        classes = 2 if task == "binary" else out
        bad = [v for v in ids if not 0 <= v < classes]
        if bad:
            raise DataError(f"{where}: column {column!r} has class {bad[0]} but head {name!r} has {classes} classes")
        if labels is not None and len(labels) > classes:
            raise DataError(
                f"head {name!r} has {classes} classes, but {where} column {column!r} has {len(labels)}: {', '.join(labels[:12])}"
            )
        targets[name] = [float(v) for v in ids] if task == "binary" else ids
    return targets, names


def target_tensors(targets: dict[str, list[Any]], model: Any) -> dict[str, torch.Tensor]:
    """`column_targets`' values as tensors of the dtype each head's loss takes."""
    out = {}
    for name, values in targets.items():
        dtype = torch.long if model.head_info[name].task == "multiclass" else torch.float32
        out[name] = torch.tensor(values, dtype=dtype)
    return out
