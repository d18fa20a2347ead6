"""Columns -> examples: which cells are the model's input (image paths, text, feature columns) and
which train each head (class names, label lists, numbers), for every table-like source.

A cell that cannot be used (empty, not a number, an image path leaving `image_root`, a missing
file) is a bad row at `file:row:column`: the first one stops the build (`on_bad_row: error`) or
every one is left out and counted (`on_bad_row: skip`). Nothing here reads a file format.
"""

from __future__ import annotations

import json
import math
import os
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from surgery.data_examples import Examples, split_examples
from surgery.data_table_read import BadRow
from surgery.data_targets import TargetCells, column_targets, target_columns
from surgery.errors import DataError
from surgery.inputs import InputSpec
from surgery.schema import Recipe


@dataclass
class Columns:
    """One split's cells: `cells[column]` has one value per row (a list, or a lazy sequence such as
    decoded `datasets` images), `where(row, column)` names a cell, `root` is where relative image
    paths start, `bad` the rows the reader could not split.

    `lazy`, when set (`surgery.data_hf.ArrowSplit`), reads the split itself: `cells` is then empty,
    `lazy.pieces(self)` gives the cells a chunk at a time for the checks, and `lazy.inputs(rows)`
    the kept rows' inputs, read on access (None when they must be held, e.g. image paths)."""

    name: str
    cells: dict[str, Sequence[Any]]
    rows: int
    where_of: Any
    root: Path | None = None
    bad: Sequence[BadRow] = ()
    lazy: Any = None

    def where(self, row: int, column: str) -> str:
        return str(self.where_of(row, column))

    def pieces(self) -> Iterator[tuple[int, Columns]]:
        """(first row, cells) chunks of this split: the whole of an in-memory table."""
        if self.lazy is None:
            yield 0, self
        else:
            yield from self.lazy.pieces(self)


def input_columns(recipe: Recipe, kind: str, source: str) -> list[str]:
    """The columns the model's input reads, refusing a data section that names none for its kind."""
    data = recipe.data
    assert data is not None
    if kind == "image":
        if not data.image_column:
            raise DataError(
                f"the model takes images: set data.image_column to the {source} column of image paths"
                + (" (or an `Image` feature)" if source == "hf" else "")
            )
        return [data.image_column]
    if kind == "text":
        if not data.text_column:
            raise DataError(f"the model takes text: set data.text_column to the {source} column holding it")
        return [data.text_column]
    if not data.feature_columns:
        raise DataError(
            f"the model takes a feature vector: set data.feature_columns to the {source} columns holding it"
        )
    return list(data.feature_columns)


def needed_columns(recipe: Recipe, kind: str, source: str) -> list[str]:
    """Input columns, then every head's target columns, each once."""
    targets = [c for columns in target_columns(recipe).values() for c in columns]
    return list(dict.fromkeys(input_columns(recipe, kind, source) + targets))


def columns_examples(recipe: Recipe, model: Any, parts: list[Columns], source: str) -> tuple[Examples, Examples]:
    """Train and val examples from one (then split by `val_split`) or two column sets."""
    data = recipe.data
    assert data is not None
    spec: InputSpec = model.input_spec
    inputs_of = input_columns(recipe, spec.kind, source)
    if spec.kind == "vector" and spec.features and len(inputs_of) != spec.features:
        raise DataError(
            f"data.feature_columns has {len(inputs_of)} columns, but the model takes {spec.features} features"
        )
    heads = target_columns(recipe)
    values = {name: TargetCells(model.head_info[name].task == "regression") for name in heads}
    inputs: list[Any] = []  # per part: a list of held inputs, or the lazily read kept rows
    skipped: list[tuple[str, str]] = []
    for part in parts:
        bad = list(part.bad)
        kept, held = array("q"), []
        for first, piece in part.pieces():
            for row in range(piece.rows):
                try:
                    item = _input(piece, row, inputs_of, spec.kind, data.image_root)
                    row_values = {
                        name: parse_target(piece, row, columns, model.head_info[name], data.label_separator)
                        for name, columns in heads.items()
                    }
                except _Bad as err:
                    bad.append(err.row)
                    continue
                for name, value in row_values.items():
                    values[name].append(value)
                kept.append(first + row)
                if part.lazy is None or not part.lazy.reads_inputs:
                    held.append(item)
        if bad and data.on_bad_row == "error":
            more = f" ({len(bad)} bad rows in {part.name})" if len(bad) > 1 else ""
            raise DataError(f"{bad[0]}{more}; set `data.on_bad_row: skip` to leave such rows out")
        skipped.extend((b.where, b.why) for b in bad)
        lazy = part.lazy.inputs(kept) if part.lazy is not None and part.lazy.reads_inputs else None
        if lazy is None and spec.kind == "vector":
            lazy = torch.tensor(held, dtype=torch.float32).reshape(len(held), len(inputs_of))
        inputs.append(held if lazy is None else lazy)
    if not any(len(x) for x in inputs):
        raise DataError(
            f"{source}: no usable rows in {parts[0].name}"
            + (f" (first: {skipped[0][0]}: {skipped[0][1]})" if skipped else "")
        )
    targets, names = column_targets(recipe, model, values, f"data {source}")
    kind = "tensor" if spec.kind == "vector" else spec.kind
    if len(parts) == 1:
        examples = Examples(kind, (inputs[0],) if kind == "tensor" else inputs[0], targets, names, skipped)
        return split_examples(examples, data.val_split, data.split_seed)
    size = len(inputs[0])
    split = []
    for part_inputs, rows in zip(inputs, (slice(0, size), slice(size, None)), strict=True):
        part_targets = {name: t[rows] for name, t in targets.items()}
        split.append(Examples(kind, (part_inputs,) if kind == "tensor" else part_inputs, part_targets, names, skipped))
    return split[0], split[1]


@dataclass(frozen=True)
class LazyImage:
    """An image decoded only when a batch needs it (a row of a memory-mapped `datasets` column)."""

    column: Any
    row: int

    def load(self) -> Any:
        return self.column[self.row]


class _Bad(Exception):
    def __init__(self, row: BadRow) -> None:
        super().__init__(str(row))
        self.row = row


def _cell(part: Columns, row: int, column: str) -> Any:
    value = part.cells[column][row]
    if value is None or (isinstance(value, str) and not value.strip()):
        raise _Bad(BadRow(part.where(row, column), "empty cell"))
    if isinstance(value, float) and math.isnan(value):
        raise _Bad(BadRow(part.where(row, column), "missing value (NaN)"))
    return value


def _number(part: Columns, row: int, column: str, value: Any) -> float:
    if isinstance(value, bool):
        return float(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _Bad(BadRow(part.where(row, column), f"{str(value)[:40]!r} is not a number")) from None
    if not math.isfinite(number):
        raise _Bad(BadRow(part.where(row, column), f"{value!r} is not a finite number"))
    return number


def _input(part: Columns, row: int, columns: list[str], kind: str, image_root: str | None) -> Any:
    if kind == "vector":
        return [_number(part, row, c, _cell(part, row, c)) for c in columns]
    column = columns[0]
    if kind == "image" and not isinstance(part.cells[column], list):
        return LazyImage(part.cells[column], row)  # decoded `datasets` images: read when the batch needs it
    value = _cell(part, row, column)
    if kind == "text":
        if not isinstance(value, str):
            raise _Bad(BadRow(part.where(row, column), f"expected text, got {type(value).__name__}"))
        return value
    if not isinstance(value, str):
        return value  # an image object (a `datasets` Image feature read eagerly)
    return _image_path(part, row, column, value, image_root)


def _image_path(part: Columns, row: int, column: str, value: str, image_root: str | None) -> Path:
    """An image path inside the root (lexically: `..` or an absolute path leaving it is refused);
    symlinks inside the root are followed, and must lead to a file."""
    root = Path(image_root) if image_root else (part.root or Path.cwd())
    joined = os.path.normpath(os.path.join(root, value.strip()))
    if os.path.commonpath([os.path.abspath(root), os.path.abspath(joined)]) != os.path.abspath(root):
        raise _Bad(BadRow(part.where(row, column), f"image path {value!r} leaves the image root {root}"))
    path = Path(joined)
    if not path.is_file():  # follows symlinks: a dangling one is a missing file
        raise _Bad(BadRow(part.where(row, column), f"image file {path} does not exist"))
    return path


def parse_target(part: Columns, row: int, columns: tuple[str, ...], info: Any, separator: str | None) -> Any:
    """One head's target from its cells: a class name, a list of names, or float(s)."""
    if info.task == "regression":
        if len(columns) > 1:
            if len(columns) != info.out_features:
                raise DataError(f"{len(columns)} target columns for a head with {info.out_features} outputs")
            return [_number(part, row, c, _cell(part, row, c)) for c in columns]
        value = _cell(part, row, columns[0])
        value = _maybe_json_list(value)
        if isinstance(value, list):
            if len(value) != info.out_features:
                raise _Bad(BadRow(part.where(row, columns[0]), f"{len(value)} numbers for {info.out_features} outputs"))
            return [_number(part, row, columns[0], v) for v in value]
        if info.out_features != 1:
            raise _Bad(BadRow(part.where(row, columns[0]), f"one number for a head with {info.out_features} outputs"))
        return _number(part, row, columns[0], value)
    column = columns[0]
    value = _cell(part, row, column) if info.task != "multilabel" else part.cells[column][row]
    if info.task == "multilabel":
        return _label_list(part, row, column, value, separator)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip() if not isinstance(value, bool) else str(int(value))


def _maybe_json_list(value: Any) -> Any:
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _label_list(part: Columns, row: int, column: str, value: Any, separator: str | None) -> list[str]:
    if value is None:
        raise _Bad(BadRow(part.where(row, column), "empty cell (write [] for no labels)"))
    value = _maybe_json_list(value)
    if isinstance(value, str):
        if value.lstrip().startswith("["):
            raise _Bad(BadRow(part.where(row, column), "not a valid JSON list"))
        if separator is None:
            raise _Bad(
                BadRow(part.where(row, column), "a multi-label cell needs a JSON list or `data.label_separator`")
            )
        value = [v for v in value.split(separator) if v.strip()]
    if not isinstance(value, (list, tuple)):
        raise _Bad(BadRow(part.where(row, column), f"expected a list of labels, got {value!r}"))
    return sorted({str(v).strip() for v in value})
