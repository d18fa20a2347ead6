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
    return {name: ",".join(columns) for name, columns in target_columns(recipe).items()}


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


def target_columns(recipe: Recipe) -> dict[str, tuple[str, ...]]:
    """Head name -> the column(s) that train it (several for a multi-output regression head)."""
    assert recipe.data is not None
    out = {}
    for head in recipe.heads:
        target = head.target or recipe.data.label_column
        out[head.name] = tuple(target) if isinstance(target, list) else (target,)
    return out


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


def head_labels(recipe: Recipe, model: Any, name: str) -> list[str] | None:
    """The class names a head was given (recipe `labels`, or the model's), None when the data decides."""
    return _head_labels(recipe, model, name)


def column_targets(
    recipe: Recipe, model: Any, values: dict[str, list[Any]], where: str
) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Per head: the target tensor of every row (train and val together, so class maps agree), and
    class names. `values` holds each head's parsed cells (`surgery.data_columns.parse_target`): a
    class name, a list of class names (multi-label), or a float / list of floats (regression)."""
    targets: dict[str, torch.Tensor] = {}
    names: dict[str, list[str]] = {}
    for name, cells in values.items():
        info = model.head_info[name]
        task, out = info.task, info.out_features
        if task == "regression":
            targets[name] = torch.tensor(cells, dtype=torch.float32)
            continue
        labels = _head_labels(recipe, model, name)
        if task == "multilabel":
            labels = labels or sorted({label for row in cells for label in row})
            _check_labels(labels, {label for row in cells for label in row}, name, out, where)
            index = {label: i for i, label in enumerate(labels)}
            hot = torch.zeros(len(cells), out, dtype=torch.float32)
            for row, row_labels in enumerate(cells):
                hot[row, [index[label] for label in row_labels]] = 1.0
            targets[name], names[name] = hot, labels
            continue
        if task == "binary" and labels is None and {str(v) for v in cells} <= {"0", "1"}:
            targets[name] = torch.tensor([float(v) for v in cells], dtype=torch.float32)
            continue
        if labels is None and task == "multiclass" and all(_int_like(v) for v in cells):
            ids = [int(v) for v in cells]
            bad = [v for v in ids if not 0 <= v < out]
            if bad:
                raise DataError(f"{where}: head {name!r} has class {bad[0]} but {out} classes")
            targets[name] = torch.tensor(ids, dtype=torch.long)
            continue
        found = {str(v) for v in cells}
        labels = labels or sorted(found)
        _check_labels(labels, found, name, 2 if task == "binary" else out, where)
        index = {label: i for i, label in enumerate(labels)}
        ids = [index[str(v)] for v in cells]
        dtype = torch.float32 if task == "binary" else torch.long
        targets[name], names[name] = torch.tensor(ids, dtype=dtype), labels
    return targets, names


def _check_labels(labels: list[str], found: set[str], name: str, classes: int, where: str) -> None:
    unknown = sorted(found - set(labels))
    if unknown:
        raise DataError(
            f"{where}: values {', '.join(unknown[:5])} are not among head {name!r} labels ({', '.join(labels[:12])})"
        )
    if len(labels) != classes:
        raise DataError(
            f"head {name!r} has {classes} {'classes' if classes > 1 else 'output'}, but {where} has {len(labels)}: "
            f"{', '.join(labels[:12])}; set out_features: {len(labels)}"
        )
