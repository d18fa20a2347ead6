"""Targets: a source's labels checked against the model's heads and turned into one tensor per head.

Sources call `class_targets` (class-per-folder labels) or `column_targets` (label columns of a
table); both check label names, class counts and tasks against the built model's heads.
"""

from __future__ import annotations

from array import array
from typing import Any

import numpy as np
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


class TargetCells:
    """One head's parsed cells (`surgery.data_columns.parse_target`) without a Python object per row:
    class names and label lists are coded by first appearance (`codes` index `uniques`), numbers
    are packed as float64, so a dataset of millions of rows costs 8 bytes a row here."""

    def __init__(self, numeric: bool) -> None:
        self.numeric = numeric
        self.codes = array("q")
        self.uniques: list[Any] = []
        self._index: dict[Any, int] = {}
        self.numbers = array("d")
        self.shapes: set[bool] = set()  # True: rows are lists of numbers, False: single numbers
        self.rows = 0

    def append(self, value: Any) -> None:
        self.rows += 1
        if self.numeric:
            is_list = isinstance(value, list)
            self.shapes.add(is_list)
            self.numbers.extend(value) if is_list else self.numbers.append(value)
            return
        key = tuple(value) if isinstance(value, list) else value
        code = self._index.get(key)
        if code is None:
            code = self._index[key] = len(self.uniques)
            self.uniques.append(key)
        self.codes.append(code)

    def index(self) -> torch.Tensor:
        """Each row's code into `uniques`."""
        return torch.from_numpy(np.frombuffer(self.codes, dtype=np.int64).copy())

    def numbers_tensor(self, name: str, where: str) -> torch.Tensor:
        if len(self.shapes) > 1:
            raise DataError(f"{where}: head {name!r} has rows of one number and rows of a list of numbers")
        values = torch.from_numpy(np.frombuffer(self.numbers, dtype=np.float64).copy()).to(torch.float32)
        return values.reshape(self.rows, -1) if self.shapes == {True} and self.rows else values


def column_targets(
    recipe: Recipe, model: Any, values: dict[str, TargetCells], where: str
) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Per head: the target tensor of every row (train and val together, so class maps agree), and
    class names. `values` holds each head's parsed cells (`surgery.data_columns.parse_target`): a
    class name, a list of class names (multi-label), or a float / list of floats (regression).
    Every decision reads the distinct values only; rows are their codes."""
    targets: dict[str, torch.Tensor] = {}
    names: dict[str, list[str]] = {}
    for name, cells in values.items():
        info = model.head_info[name]
        task, out = info.task, info.out_features
        if task == "regression":
            targets[name] = cells.numbers_tensor(name, where)
            continue
        labels = _head_labels(recipe, model, name)
        uniques, codes = cells.uniques, cells.index()
        if task == "multilabel":
            found = {label for row in uniques for label in row}
            labels = labels or sorted(found)
            _check_labels(labels, found, name, out, where)
            index = {label: i for i, label in enumerate(labels)}
            hot = torch.zeros(len(uniques), out, dtype=torch.float32)
            for code, row_labels in enumerate(uniques):
                hot[code, [index[label] for label in row_labels]] = 1.0
            targets[name], names[name] = hot[codes], labels
            continue
        if task == "binary" and labels is None and {str(v) for v in uniques} <= {"0", "1"}:
            targets[name] = torch.tensor([float(v) for v in uniques], dtype=torch.float32)[codes]
            continue
        if labels is None and task == "multiclass" and all(_int_like(v) for v in uniques):
            ids = [int(v) for v in uniques]  # in order of first appearance: the first bad one is the first row's
            bad = [v for v in ids if not 0 <= v < out]
            if bad:
                raise DataError(f"{where}: head {name!r} has class {bad[0]} but {out} classes")
            targets[name] = torch.tensor(ids, dtype=torch.long)[codes]
            continue
        found = {str(v) for v in uniques}
        labels = labels or sorted(found)
        _check_labels(labels, found, name, 2 if task == "binary" else out, where)
        index = {label: i for i, label in enumerate(labels)}
        dtype = torch.float32 if task == "binary" else torch.long
        targets[name] = torch.tensor([index[str(v)] for v in uniques], dtype=dtype)[codes]
        names[name] = labels
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
