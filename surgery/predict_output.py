"""Batch predictions as rows and files: one flat row per input (the same columns in CSV, JSONL and
Parquet, and on the terminal), written atomically, streamed batch by batch.

Columns: `input`; per classification head `<head>_label_1..k` and `<head>_prob_1..k` (most probable
first; multilabel heads also `<head>_labels`, every label over 0.5, joined by `|`); per regression
(or other) head `<head>` when it has one output, else `<head>_1..n`, as numbers; `error` (empty
unless the input could not be used: then the head columns are empty).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from surgery.errors import SurgeryError
from surgery.files import fsync_path, remove_path
from surgery.outputs import head_probabilities, ranked_columns

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".parquet": "parquet"}


def output_format(out: Path | None) -> str:
    """`csv`, `jsonl` or `parquet` from the file's suffix; `table` for the terminal."""
    if out is None:
        return "table"
    fmt = FORMATS.get(Path(out).suffix.lower())
    if fmt is None:
        raise SurgeryError(f"--out {out}: write .csv, .jsonl or .parquet")
    return fmt


def _classified(head: dict[str, Any]) -> bool:
    return head.get("task") in ("multiclass", "binary", "multilabel")


def _width(head: dict[str, Any]) -> int:
    return int(head.get("out_features") or 1)


def columns(heads: list[dict[str, Any]], top_k: int) -> list[tuple[str, str]]:
    """(name, type) of every column, in order; types are `str` or `float`."""
    found = [("input", "str")]
    for head in heads:
        name = head["name"]
        if _classified(head):
            k = min(top_k, 2 if head.get("task") == "binary" and _width(head) == 1 else _width(head))
            found += [(f"{name}_label_{i}", "str") for i in range(1, k + 1)]
            found += [(f"{name}_prob_{i}", "float") for i in range(1, k + 1)]
            if head.get("task") == "multilabel":
                found.append((f"{name}_labels", "str"))
        elif _width(head) == 1:
            found.append((name, "float"))
        else:
            found += [(f"{name}_{i}", "float") for i in range(1, _width(head) + 1)]
    return [*found, ("error", "str")]


def prediction_rows(
    heads: list[dict[str, Any]], outputs: dict[str, np.ndarray], names: list[str], top_k: int
) -> list[dict[str, Any]]:
    """One row per input of a batch that ran, from each head's outputs (N × …)."""
    rows: list[dict[str, Any]] = [{"input": name} for name in names]
    for head in heads:
        name, values = head["name"], outputs[head["name"]]
        classified = head_probabilities(head, values) if _classified(head) else None
        if classified is None:
            flat = values.astype(np.float64).reshape(values.shape[0], -1)
            keys = [name] if flat.shape[1] == 1 else [f"{name}_{i}" for i in range(1, flat.shape[1] + 1)]
            for row, numbers in zip(rows, flat.tolist(), strict=True):
                row.update(zip(keys, numbers, strict=True))
            continue
        probs, labels = classified
        order = ranked_columns(probs, top_k)
        ranks = range(1, order.shape[1] + 1)
        label_keys, prob_keys = [f"{name}_label_{r}" for r in ranks], [f"{name}_prob_{r}" for r in ranks]
        # whole-batch lookups, then plain Python values: indexing numpy per element was a visible share
        top_labels = np.asarray(labels, dtype=object)[order].tolist()
        top_probs = np.take_along_axis(probs, order, axis=1).tolist()
        for row, row_labels, row_probs in zip(rows, top_labels, top_probs, strict=True):
            row.update(zip(label_keys, row_labels, strict=True))
            row.update(zip(prob_keys, row_probs, strict=True))
        if head.get("task") == "multilabel":
            for row, p_row in zip(rows, probs.tolist(), strict=True):
                row[f"{name}_labels"] = "|".join(label for label, p in zip(labels, p_row, strict=True) if p > 0.5)
    return rows


def error_row(name: str, error: str) -> dict[str, Any]:
    return {"input": name, "error": error}


class PredictionWriter:
    """Rows to `out` (CSV, JSONL or Parquet) through a temporary sibling renamed when the job is
    done, or, without `out`, an aligned table on `stream` once every row is in."""

    def __init__(self, out: Path | None, cols: list[tuple[str, str]], stream: TextIO | None = None) -> None:
        self.format = output_format(out)
        self.out = Path(out) if out is not None else None
        self.cols = cols
        self.names = [c for c, _ in cols]
        self.stream = stream or sys.stdout
        self.count = 0
        self.errors = 0
        self._table: list[dict[str, Any]] = []
        self._file: Any = None
        self._parquet: Any = None
        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = self.out.with_name(f".{self.out.name}.{os.getpid()}.tmp")
            if self.format == "parquet":
                import pyarrow.parquet as pq

                self._parquet = pq.ParquetWriter(str(self.tmp), self._schema())
            else:
                self._file = self.tmp.open("w", newline="", encoding="utf-8")
                if self.format == "csv":
                    self._csv = csv.writer(self._file)
                    self._csv.writerow(self.names)

    def _schema(self) -> Any:
        import pyarrow as pa

        return pa.schema([(name, pa.string() if kind == "str" else pa.float64()) for name, kind in self.cols])

    def write(self, rows: list[dict[str, Any]]) -> None:
        self.count += len(rows)
        self.errors += sum(1 for r in rows if r.get("error"))
        if self.format == "csv":  # the common case, straight to lists: no second dict per row
            names = self.names
            self._csv.writerows([["" if (v := row.get(n)) is None else v for n in names] for row in rows])
            return
        full = [{name: row.get(name) for name in self.names} for row in rows]
        if self.format == "table":
            self._table.extend(full)
        elif self.format == "parquet":
            import pyarrow as pa

            self._parquet.write_table(pa.Table.from_pylist(full, schema=self._schema()))
        else:
            self._file.writelines(json.dumps({k: _finite(v) for k, v in row.items()}) + "\n" for row in full)

    def close(self) -> None:
        """Finish the file (renamed into place) or print the table."""
        if self.format == "table":
            self.stream.write(format_table(self._table, self.names))
            return
        if self._parquet is not None:
            self._parquet.close()
        else:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        fsync_path(self.tmp)
        os.replace(self.tmp, self.out)
        fsync_path(self.out.parent)

    def abort(self) -> None:
        """Leave no partial file behind."""
        if self._parquet is not None:
            self._parquet.close()
        if self._file is not None:
            self._file.close()
        if self.out is not None:
            remove_path(self.tmp)


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: such a number is written as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _shown(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def format_table(rows: list[dict[str, Any]], names: list[str]) -> str:
    """Aligned columns for the terminal; the `error` column only when some row has one."""
    shown = [n for n in names if n != "error" or any(r.get("error") for r in rows)]
    cells = [[_shown(r.get(n)) for n in shown] for r in rows]
    widths = [max([len(n), *(len(c[i]) for c in cells)]) for i, n in enumerate(shown)]
    buffer = io.StringIO()
    for line in [shown, *cells]:
        buffer.write("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() + "\n")
    return buffer.getvalue()
