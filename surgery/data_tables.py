"""Table sources: `csv` and `jsonl` files holding a text column or feature columns, and labels."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import torch

from surgery.data_examples import Examples, split_examples
from surgery.data_targets import as_float, column_targets, head_columns, target_tensors
from surgery.errors import DataError
from surgery.inputs import InputSpec
from surgery.registry import DATA_SOURCES
from surgery.schema import Recipe


def _read_rows(path: Path, fmt: str, where: str) -> tuple[list[dict[str, Any]], list[str]]:
    if not path.is_file():
        raise DataError(f"{where}: file {path} does not exist")
    if fmt == "csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = list(reader.fieldnames or [])
    else:
        rows, columns = [], []
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{number}: expected a JSON object per line")
                rows.append(row)
                columns.extend(k for k in row if k not in columns)
    if not rows:
        raise DataError(f"{where}: {path} has no rows")
    return rows, columns


def _table_source(recipe: Recipe, model: Any, fmt: str) -> tuple[Examples, Examples]:
    data = recipe.data
    assert data is not None and data.train is not None
    spec: InputSpec = model.input_spec
    parts = [("data.train", Path(data.train))] + ([("data.val", Path(data.val))] if data.val else [])
    if spec.kind == "text" and not data.text_column:
        raise DataError(f"the model takes text: set data.text_column to the {fmt} column holding it")
    if spec.kind == "vector" and not data.feature_columns:
        raise DataError(f"the model takes a feature vector: set data.feature_columns to the {fmt} columns holding it")
    if spec.kind == "image":
        raise DataError(
            f"the model takes images; data source {fmt!r} provides text or feature vectors (use image_folder)"
        )
    needed = ([data.text_column] if spec.kind == "text" else list(data.feature_columns or [])) + sorted(
        set(head_columns(recipe).values())
    )
    if spec.kind == "vector" and spec.features and len(data.feature_columns or []) != spec.features:
        raise DataError(
            f"data.feature_columns has {len(data.feature_columns or [])} columns, but the model takes {spec.features} features"
        )
    all_rows: list[dict[str, Any]] = []
    sizes = []
    for where, path in parts:
        rows, columns = _read_rows(path, fmt, where)
        for column in needed:
            if column not in columns:
                raise DataError(f"{where}: column {column!r} not found in {path}; columns are: {', '.join(columns)}")
        missing = [i for i, row in enumerate(rows) if any(row.get(c) is None for c in needed)]
        if missing:
            raise DataError(f"{where}: row {missing[0] + 1} of {path} lacks a value for one of {', '.join(needed)}")
        all_rows.extend(rows)
        sizes.append(len(rows))
    columns_values = {c: [row[c] for row in all_rows] for c in set(head_columns(recipe).values())}
    target_values, names = column_targets(recipe, model, columns_values, f"data {fmt}")
    targets = target_tensors(target_values, model)
    if spec.kind == "text":
        examples = Examples("text", [str(row[data.text_column]) for row in all_rows], targets, names)
    else:
        features = [[as_float(row[c], c, f"data {fmt}") for c in data.feature_columns or []] for row in all_rows]
        examples = Examples("tensor", (torch.tensor(features, dtype=torch.float32),), targets, names)
    if not data.val:
        return split_examples(examples, data.val_split, data.split_seed)
    n_train = sizes[0]
    return examples.subset(range(n_train)), examples.subset(range(n_train, len(examples)))


@DATA_SOURCES.implements("csv")
def csv_source(recipe: Recipe, model: Any) -> tuple[Examples, Examples]:
    """A CSV file with a header row: a text column or feature columns, and label column(s)."""
    return _table_source(recipe, model, "csv")


@DATA_SOURCES.implements("jsonl")
def jsonl_source(recipe: Recipe, model: Any) -> tuple[Examples, Examples]:
    """One JSON object per line: a text field or feature fields, and label field(s)."""
    return _table_source(recipe, model, "jsonl")
