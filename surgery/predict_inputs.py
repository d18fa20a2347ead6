"""What `surgery predict` was given, as one list of inputs: files, folders, globs, tables (CSV/TSV,
JSONL, Parquet with an input column) and, for text models, plain strings.

Expanding never reads an image: an input that cannot be read is found when it is decoded, and
becomes an `error` in its own row (`read_input`), so one bad file never stops the job. Only what a
user must fix before anything runs (a table without the column, a glob that matches nothing, a
folder given to a text model) is refused, in one line.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery.data_images import IMAGE_SUFFIXES, image_files
from surgery.data_table_read import read_table as read_any_table
from surgery.data_table_read import table_format
from surgery.errors import DataError
from surgery.inputs import MAX_IMAGE_PIXELS, InputSpec
from surgery.sections.data import MAX_ROW_BYTES

TABLE_SUFFIXES = {".csv", ".tsv", ".jsonl", ".parquet"}
IMAGE_COLUMNS = ("path", "image", "image_path", "file", "filename")


@dataclass(frozen=True)
class PredictInput:
    """One row to predict: `name` is what the output's `input` column shows; `item` is an image
    path (str or Path), a text, or a feature vector; `error` is set when the row is known bad already."""

    name: str
    item: Any
    error: str | None = None


def expand_inputs(
    arguments: list[str], spec: InputSpec, *, column: str | None = None, recipe: Any = None
) -> list[PredictInput]:
    """Every input of the command line, in order: folders walked (sorted), globs expanded (sorted),
    tables read row by row. `column` names a table's input column (default: the recipe's `data.image_column`, else
    `path`/`image`/... for images, its `data.text_column` or `text` for text, `data.feature_columns`
    for vectors)."""
    if not arguments:
        raise DataError("give at least one input: image files, folders, globs, or a table (.csv/.tsv/.jsonl/.parquet)")
    found: list[PredictInput] = []
    for argument in arguments:
        found.extend(_expand(argument, spec, column, recipe))
    if not found:
        raise DataError(f"no inputs found in {', '.join(arguments)}")
    return found


def _expand(argument: str, spec: InputSpec, column: str | None, recipe: Any) -> list[PredictInput]:
    path = Path(argument) if len(argument) < 4096 else None
    if path is not None and path.is_file() and path.suffix.lower() in TABLE_SUFFIXES:
        return read_table(path, spec, column, recipe)
    if path is not None and path.is_dir():
        if any((path / marker).is_file() for marker in ("dataset_info.json", "state.json", "dataset_dict.json")):
            raise DataError(
                f"{argument}: a Hugging Face `datasets` folder; predict reads files, image folders, globs and tables"
                f" (.csv/.tsv/.jsonl/.parquet): `surgery evaluate RUN --data {argument}` reads this one"
            )
        if spec.kind != "image":
            raise DataError(f"{argument}: a folder gives images, but the model takes {_kind(spec)}")
        files = image_files(path)
        if not files:
            raise DataError(f"{argument}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
        return [PredictInput(name, name) for name in files]
    if spec.kind == "text":
        if path is not None and path.is_file() and path.suffix.lower() == ".txt":
            return [PredictInput(argument, _text_file(path))]
        return [PredictInput(argument[:200], argument)]
    if spec.kind == "vector":
        raise DataError(f"{argument}: the model takes feature vectors; give a table whose columns hold them")
    if any(c in argument for c in "*?["):
        matches = sorted(glob.glob(argument, recursive=True))
        files = [Path(m) for m in matches if Path(m).is_file()]
        if not files:
            raise DataError(f"{argument}: matches no files")
        return [PredictInput(str(p), p) for p in files]
    return [PredictInput(argument, Path(argument))]  # a missing file is reported in its row


def _kind(spec: InputSpec) -> str:
    return {"image": "images", "text": "text", "vector": "feature vectors"}[spec.kind]


def _text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        return f"\0unreadable: {err}"


def read_table(path: Path, spec: InputSpec, column: str | None, recipe: Any) -> list[PredictInput]:
    """One input per row, in file order; image paths relative to the table's folder. The table is
    read as training reads tables (`surgery.data_table_read`: BOM, delimiter by suffix, bounded
    lines, binary junk refused); a row whose cell is missing, not a number, or that the reader
    could not split (ragged, too long) is kept, with its error."""
    table = read_any_table(
        path, table_format(path, ""), None, delimiter=None, max_row_bytes=MAX_ROW_BYTES, where=str(path)
    )
    data = getattr(recipe, "data", None)
    if spec.kind == "vector":
        wanted = column.split(",") if column else list(getattr(data, "feature_columns", None) or [])
        if not wanted:
            raise DataError(f"{path}: name the feature columns with --column a,b,c")
    else:
        default = (getattr(data, "text_column", None) or "text") if spec.kind == "text" else None
        if column is None and default is None:  # the column the model was trained from, else a usual name
            trained = getattr(data, "image_column", None)
            candidates = ([trained] if trained else []) + list(IMAGE_COLUMNS)
            default = next((c for c in candidates if c in table.columns), None)
        wanted = [column or default] if (column or default) else []
        if not wanted:
            raise DataError(f"{path}: no image column ({', '.join(IMAGE_COLUMNS)}); name it with --column")
    missing = [c for c in wanted if c not in table.columns]
    if missing:
        raise DataError(f"{path}: column {missing[0]!r} not found; columns are: {', '.join(table.columns)}")
    found: list[tuple[int, PredictInput]] = [
        (int(bad.where.rsplit(":", 1)[1]), PredictInput(bad.where, None, bad.why)) for bad in table.bad
    ]
    for i, line in enumerate(table.lines):
        number = i + 1  # the data row (the header is no row)
        name = f"{path}:{number}"
        cells = [table.cells[c][i] for c in wanted]
        empty = [c for c, cell in zip(wanted, cells, strict=True) if cell is None or cell == ""]
        if empty:  # the cells that are missing, not every column read
            entry = PredictInput(name, None, f"row {number}: empty {', '.join(empty)}")
        elif spec.kind == "image":
            entry = PredictInput(str(cells[0]), path.parent / str(cells[0]))
        elif spec.kind == "text":
            entry = PredictInput(name, str(cells[0]))
        else:
            entry = _vector_row(name, cells, wanted, number)
        found.append((line, entry))
    return [entry for _, entry in sorted(found, key=lambda pair: pair[0])]


def _vector_row(name: str, cells: list[Any], columns: list[str], number: int) -> PredictInput:
    try:
        return PredictInput(name, [float(c) for c in cells])
    except (TypeError, ValueError):
        bad = next(c for c, cell in zip(columns, cells, strict=True) if not _number(cell))
        return PredictInput(name, None, f"row {number}: column {bad!r} is not a number")


def _number(cell: Any) -> bool:
    try:
        float(cell)
        return True
    except (TypeError, ValueError):
        return False


def read_input(entry: PredictInput, spec: InputSpec, transform: Any) -> Any:
    """The model row of one input (an image tensor, a text, a feature tensor); raises
    `ValueError` with a one-line reason for an input that cannot be used."""
    import torch

    if entry.error:
        raise ValueError(entry.error)
    if spec.kind == "text":
        text = str(entry.item)
        if text.startswith("\0unreadable: "):
            raise ValueError(text[1:])
        if not text.strip():
            raise ValueError("empty text")
        return text
    if spec.kind == "vector":
        values = torch.tensor(entry.item, dtype=torch.float32)
        if values.shape != (spec.features,) and spec.features:
            raise ValueError(f"{values.numel()} features, the model takes {spec.features}")
        if not torch.isfinite(values).all():
            raise ValueError("contains NaN or infinity")
        return values
    return transform(open_image(entry.item))


def open_image(path: str | os.PathLike[str]) -> Any:
    """A decoded PIL image; refuses a picture over serving's pixel limit before decoding it. A
    missing file or a folder is found by opening it (no stat beforehand: most files are fine)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ValueError(f"image of {width}x{height} pixels is over the {MAX_IMAGE_PIXELS:,} limit")
            image.load()
            return image
    except ValueError:
        raise
    except Exception as err:  # PIL raises many kinds for a bad file
        if not os.path.exists(path):
            raise ValueError("no such file") from None
        if os.path.isdir(path):
            raise ValueError("is a folder") from None
        raise ValueError(
            f"not a readable image ({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''})"
        ) from None
