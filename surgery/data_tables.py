"""Table sources: `csv` (and TSV), `jsonl` and `parquet` files whose columns name the input (image
paths, text, or numeric features) and each head's target."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from surgery.data_columns import Columns, columns_examples, needed_columns
from surgery.data_examples import Examples
from surgery.data_images import verified_examples
from surgery.data_table_read import Table, read_table, table_format
from surgery.errors import DataError
from surgery.registry import DATA_SOURCES
from surgery.schema import Recipe


def table_columns(recipe: Recipe, kind: str, source: str) -> list[Columns]:
    """The train (and val) tables of a recipe as columns, reading only the columns it needs."""
    data = recipe.data
    assert data is not None
    if not data.train:
        raise DataError(f"data source {source!r} needs a `data.train` path")
    needed = needed_columns(recipe, kind, source)
    parts = [("data.train", Path(data.train))] + ([("data.val", Path(data.val))] if data.val else [])
    out = []
    for where, path in parts:
        table = read_table(
            path,
            table_format(path, source),
            needed,
            delimiter=data.delimiter,
            max_row_bytes=data.max_row_bytes,
            where=where,
        )
        out.append(_as_columns(table, where))
    return out


def _as_columns(table: Table, where: str) -> Columns:
    return Columns(f"{where} {table.path}", table.cells, len(table), table.where, table.path.parent, table.bad)


def _table_source(recipe: Recipe, model: Any, source: str) -> tuple[Examples, Examples]:
    assert recipe.data is not None
    kind = model.input_spec.kind
    train, val = columns_examples(recipe, model, table_columns(recipe, kind, source), source)
    if kind == "image":
        skip = recipe.data.on_bad_file == "skip"
        train, val = verified_examples(train, skip=skip), verified_examples(val, skip=skip)
    return train, val


@DATA_SOURCES.implements("csv")
def csv_source(recipe: Recipe, model: Any) -> tuple[Examples, Examples]:
    """A CSV/TSV file with a header row: an input column (image paths, text) or feature columns,
    and each head's target column(s)."""
    return _table_source(recipe, model, "csv")


@DATA_SOURCES.implements("jsonl")
def jsonl_source(recipe: Recipe, model: Any) -> tuple[Examples, Examples]:
    """One JSON object per line: an input field or feature fields, and each head's target field(s)."""
    return _table_source(recipe, model, "jsonl")


@DATA_SOURCES.implements("parquet")
def parquet_source(recipe: Recipe, model: Any) -> tuple[Examples, Examples]:
    """A Parquet file (only the needed columns are read, memory-mapped): input and target columns."""
    return _table_source(recipe, model, "parquet")
