"""Reading tables users have: CSV/TSV, JSON lines and Parquet into columns, bounded and with every
cell traceable to `file:row:column`.

A table here is only cells: which columns are inputs or targets is `surgery.data_columns`' job.
Reading is bounded (`max_row_bytes` per line, so a file holding one enormous line cannot take the
machine's memory), a UTF-8 BOM never reaches a column name, and a file that is not the format the
recipe says (binary junk, a Parquet file given to `csv`) is one line naming the file, not a
decoding traceback. Parquet reads only the columns asked for, memory-mapped.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from surgery.errors import DataError

PARQUET_MAGIC = b"PAR1"
_DELIMITERS = (",", "\t", ";", "|")


@dataclass
class BadRow:
    """A row that cannot be used: where (`file:row:column`) and why."""

    where: str
    why: str

    def __str__(self) -> str:
        return f"{self.where}: {self.why}"


@dataclass
class Table:
    """The cells of one table file, column by column. `lines[i]` is where row i starts in the file
    (the line for text formats, the 1-based row for Parquet); `bad` holds rows the reader itself
    could not split into cells (ragged, too long), which the caller refuses or skips."""

    path: Path
    columns: list[str]
    cells: dict[str, list[Any]]
    lines: list[int]
    bad: list[BadRow] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.lines)

    def where(self, row: int, column: str) -> str:
        return f"{self.path}:{self.lines[row]}:{column}"


def table_format(path: Path, source: str) -> str:
    """`csv`, `jsonl` or `parquet` for a file a `source` reads."""
    return (
        source
        if source in ("csv", "jsonl", "parquet")
        else {".parquet": "parquet", ".jsonl": "jsonl"}.get(path.suffix.lower(), "csv")
    )


def read_table(
    path: Path, fmt: str, needed: Sequence[str] | None, *, delimiter: str | None, max_row_bytes: int, where: str
) -> Table:
    """The `needed` columns of a table file (None: every column); a missing column is a DataError
    listing the others."""
    if not path.is_file():
        raise DataError(f"{where}: file {path} does not exist")
    head = _first_bytes(path)
    if fmt != "parquet" and head.startswith(PARQUET_MAGIC):
        raise DataError(f"{where}: {path} is a Parquet file; use `data.source: parquet`")
    if fmt != "parquet" and b"\x00" in head.replace(b"\x00\x00\xfe\xff", b""):
        raise DataError(f"{where}: {path} holds binary data (NUL bytes), not {fmt} text")
    if fmt == "parquet":
        table = _read_parquet(path, needed, where)
    elif fmt == "jsonl":
        table = _read_jsonl(path, max_row_bytes)
    else:
        table = _read_csv(path, delimiter or _default_delimiter(path), max_row_bytes)
    if needed is None:
        return table
    missing = [c for c in needed if c not in table.columns]
    if missing:
        hint = _delimiter_hint(table.columns, delimiter) if fmt == "csv" else ""
        raise DataError(
            f"{where}: column {missing[0]!r} not found in {path}; columns are: {', '.join(table.columns)}{hint}"
        )
    table.cells = {c: table.cells[c] for c in needed}
    return table


def _first_bytes(path: Path, n: int = 4096) -> bytes:
    with path.open("rb") as f:
        return f.read(n)


def _default_delimiter(path: Path) -> str:
    return "\t" if path.suffix.lower() in (".tsv", ".tab") else ","


def _delimiter_hint(columns: list[str], delimiter: str | None) -> str:
    if len(columns) != 1:
        return ""
    found = [d for d in _DELIMITERS if d != (delimiter or ",") and d in columns[0]]
    return f" (the header looks delimited by {found[0]!r}: set `data.delimiter: {found[0]!r}`)" if found else ""


def _bounded_lines(f: IO[str], path: Path, limit: int, bad: list[BadRow], number: list[int]) -> Iterator[str]:
    """Lines of `f`, each read with at most `limit` characters held: a longer line is skipped to its
    end and recorded as a bad row. `number[0]` is the current line number (for the csv reader)."""
    while True:
        try:
            line = f.readline(limit + 1)
        except UnicodeDecodeError as err:
            raise DataError(
                f"{path}:{number[0] + 1}: not UTF-8 text (bad byte {err.object[err.start : err.start + 1]!r})"
            ) from None
        if not line:
            return
        number[0] += 1
        if len(line) > limit and not line.endswith("\n"):
            while (rest := f.readline(limit)) and not rest.endswith("\n"):
                pass
            bad.append(BadRow(f"{path}:{number[0]}", f"line longer than data.max_row_bytes ({limit})"))
            continue
        yield line


def _read_csv(path: Path, delimiter: str, limit: int) -> Table:
    bad: list[BadRow] = []
    number = [0]
    rows: list[list[str]] = []
    lines: list[int] = []
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(_bounded_lines(f, path, limit, bad, number), delimiter=delimiter)
        old = csv.field_size_limit(max(limit, 1))
        try:
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: the file is empty (a header row is expected)")
            header = [h.strip() for h in header]
            for row in _csv_rows(reader, path, number):
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if len(row) != len(header):
                    bad.append(BadRow(f"{path}:{number[0]}", f"{len(row)} fields, the header has {len(header)}"))
                    continue
                rows.append(row)
                lines.append(number[0])
        finally:
            csv.field_size_limit(old)
    duplicated = sorted({h for h in header if header.count(h) > 1})
    if duplicated:
        raise DataError(f"{path}: column {duplicated[0]!r} appears more than once in the header")
    cells = {name: [row[i] for row in rows] for i, name in enumerate(header)}
    return Table(path, header, cells, lines, bad)


def _csv_rows(reader: Iterator[list[str]], path: Path, number: list[int]) -> Iterator[list[str]]:
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise DataError(f"{path}:{number[0]}: not readable as CSV ({err})") from None
        yield row


def _read_jsonl(path: Path, limit: int) -> Table:
    bad: list[BadRow] = []
    number = [0]
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    columns: dict[str, None] = {}
    with path.open(encoding="utf-8-sig") as f:
        for line in _bounded_lines(f, path, limit, bad, number):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number[0]}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number[0]}: expected a JSON object per line")
            rows.append(row)
            lines.append(number[0])
            columns.update(dict.fromkeys(row))
    cells = {name: [row.get(name) for row in rows] for name in columns}
    return Table(path, list(columns), cells, lines, bad)


def _read_parquet(path: Path, needed: Sequence[str] | None, where: str) -> Table:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading Parquet needs pyarrow: pip install pyarrow") from None
    try:
        columns = list(pq.read_schema(path, memory_map=True).names)
        wanted = columns if needed is None else [c for c in dict.fromkeys(needed) if c in columns]
        table = pq.read_table(path, columns=wanted, memory_map=True)
        cells = {name: table.column(name).to_pylist() for name in wanted}
    except (OSError, ValueError, TypeError, KeyError) as err:  # pyarrow's ArrowInvalid/ArrowIOError
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{where}: {path} is not a readable Parquet file: {first}") from None
    rows = table.num_rows
    return Table(path, columns, cells, list(range(1, rows + 1)))
