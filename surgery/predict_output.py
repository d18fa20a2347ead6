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
            for row, numbers in zip(rows, flat, strict=True):
                if flat.shape[1] == 1:
                    row[name] = float(numbers[0])
                else:
                    row.update({f"{name}_{i}": float(v) for i, v in enumerate(numbers, 1)})
            continue
        probs, labels = classified
        for row, p_row, order in zip(rows, probs, ranked_columns(probs, top_k), strict=True):
            for rank, column in enumerate(order, 1):
                row[f"{name}_label_{rank}"] = labels[column]
                row[f"{name}_prob_{rank}"] = float(p_row[column])
            if head.get("task") == "multilabel":
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
                    self._csv = csv.DictWriter(self._file, self.names)
                    self._csv.writeheader()

    def _schema(self) -> Any:
        import pyarrow as pa

        return pa.schema([(name, pa.string() if kind == "str" else pa.float64()) for name, kind in self.cols])

    def write(self, rows: list[dict[str, Any]]) -> None:
        self.count += len(rows)
        self.errors += sum(1 for r in rows if r.get("error"))
        full = [{name: row.get(name) for name in self.names} for row in rows]
        if self.format == "table":
            self._table.extend(full)
        elif self.format == "parquet":
            import pyarrow as pa

            self._parquet.write_table(pa.Table.from_pylist(full, schema=self._schema()))
        elif self.format == "csv":
            self._csv.writerows([{k: "" if v is None else v for k, v in row.items()} for row in full])
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
