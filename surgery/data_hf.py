"""The `hf` source: Hugging Face `datasets` (the optional `hf` extra) — a `save_to_disk` folder,
Arrow or Parquet files, or a hub id (`hf.name`, online or from the `datasets` cache); splits by name.

The dataset stays memory-mapped Arrow, so a dataset bigger than memory trains: its cells are
checked a chunk at a time (`ArrowSplit`), and a batch reads its rows' text, features or images
when the loader asks (`ArrowRows`; an `Image` feature decodes one row at a time, `LazyImage`);
what stays in memory is 8 bytes a row for its number and 8 for each target. `ClassLabel` targets train by their class names.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from surgery.data_columns import Columns, LazyImage, columns_examples, input_columns, needed_columns
from surgery.data_examples import Examples
from surgery.data_images import verified_examples
from surgery.errors import DataError
from surgery.registry import DATA_SOURCES
from surgery.schema import Recipe

_CHUNK = 8192  # rows per read while checking a split: memory stays flat whatever its size
_EXTRA = "the `hf` source needs Hugging Face datasets: pip install 'surgery[hf]' (or `pip install datasets`)"


class ImageColumn(Sequence[Any]):
    """One `Image` column of a dataset, decoded per row on access (never all at once)."""

    def __init__(self, dataset: Any, column: str) -> None:
        self.dataset = dataset.select_columns([column])
        self.column = column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, row: Any) -> Any:
        return self.dataset[int(row)][self.column]


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(_EXTRA) from None
    datasets.disable_progress_bars()
    return datasets


def open_dataset(recipe: Recipe) -> tuple[Any, str]:
    """The dataset (a `DatasetDict` or one `Dataset`) and how to name it in messages."""
    datasets = _datasets()
    data = recipe.data
    assert data is not None
    settings = data.hf
    if settings.name and not data.train:
        try:
            loaded = datasets.load_dataset(settings.name, settings.config, revision=settings.revision)
        except (ConnectionError, FileNotFoundError, OSError, ValueError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise DataError(
                f"hf dataset {settings.name!r} cannot be loaded ({first}); offline it must be in the datasets cache, "
                "or point data.train at a save_to_disk folder or Arrow/Parquet files"
            ) from None
        return loaded, settings.name
    assert data.train is not None
    path = Path(data.train)
    if not path.exists():
        raise DataError(f"data.train: {path} does not exist")
    try:
        if path.is_dir():
            return datasets.load_from_disk(str(path)), str(path)
        if path.suffix.lower() == ".arrow":
            return datasets.Dataset.from_file(str(path)), str(path)
        files = {settings.train_split: str(path)} | ({settings.val_split or "validation": data.val} if data.val else {})
        return datasets.load_dataset("parquet", data_files=files), str(path)
    except (FileNotFoundError, OSError, ValueError, TypeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"data.train: {path} is not a datasets folder or Arrow/Parquet file: {first}") from None


def split_of(dataset: Any, split: str, where: str) -> Any:
    """One split by name; a single `Dataset` is its own `train` split."""
    if hasattr(dataset, "keys"):
        if split not in dataset:
            raise DataError(f"{where} has no split {split!r}; its splits are: {', '.join(dataset.keys())}")
        return dataset[split]
    if split != "train":
        raise DataError(f"{where} is one dataset without named splits; use hf.train_split: train and no hf.val_split")
    return dataset


def _named(feature: Any, values: list[Any]) -> list[Any]:
    """Cells as training reads them: `ClassLabel` ids (and lists of them) become class names."""
    kind = type(feature).__name__
    if kind == "ClassLabel":
        return [feature.int2str(v) if v is not None and v >= 0 else None for v in values]
    if kind in ("Sequence", "List") and type(getattr(feature, "feature", None)).__name__ == "ClassLabel":
        return [[feature.feature.int2str(x) for x in v] if v is not None else None for v in values]
    return values


class _Unread(Sequence[Any]):
    """An `Image` column during the checks: nothing to check, nothing decoded."""

    def __init__(self, rows: int) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, row: Any) -> Any:
        return None


class ArrowRows(Sequence[Any]):
    """The kept rows of a memory-mapped dataset's input column(s), read when a batch asks (`fetch`):
    text as strings, feature columns as one float32 tensor, `Image` features as `LazyImage`s.
    Holds 8 bytes a row (the row numbers); pickles as the dataset's file paths, not its data."""

    def __init__(self, dataset: Any, columns: list[str], kind: str, rows: np.ndarray) -> None:
        self.dataset = dataset.select_columns(columns)
        self.columns = columns
        self.kind = kind
        self.rows = rows
        self._arrow = self.dataset.with_format("arrow")
        self.features = self.dataset.features  # `Dataset.features` deep-copies on every access
        self._images = ImageColumn(dataset, columns[0]) if kind == "image" else None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: Any) -> Any:
        return self.fetch([int(position)])[0]

    def subset(self, index: torch.Tensor) -> ArrowRows:
        return ArrowRows(self.dataset, self.columns, self.kind, self.rows[index.numpy()])

    def fetch(self, positions: Sequence[int]) -> Any:
        """The inputs at these positions, in one read: a list, or a (rows, features) tensor."""
        rows = self.rows[np.asarray(positions, dtype=np.int64)]
        if self._images is not None:
            return [LazyImage(self._images, int(r)) for r in rows]
        table = self._arrow[rows.tolist()]
        if self.kind == "text":
            return _named(self.features[self.columns[0]], table.column(0).to_pylist())
        return torch.stack([self._numbers(table, c) for c in self.columns], 1).to(torch.float32)

    def _numbers(self, table: Any, column: str) -> torch.Tensor:
        import pyarrow as pa

        cells = table.column(column)
        feature = self.features[column]
        if type(feature).__name__ == "Value" and (
            pa.types.is_integer(cells.type) or pa.types.is_floating(cells.type) or pa.types.is_boolean(cells.type)
        ):
            return torch.from_numpy(cells.to_numpy().astype(np.float64))
        # anything else was checked to hold numbers (`float()` of each, as the checks read them)
        return torch.tensor([float(v) for v in _named(feature, cells.to_pylist())], dtype=torch.float64)

    def chunks(self, size: int) -> Iterator[torch.Tensor]:
        """All rows, `size` at a time (statistics over a split without holding it)."""
        for start in range(0, len(self.rows), size):
            yield self.fetch(range(start, min(start + size, len(self.rows))))


class ArrowSplit:
    """One split of a dataset for `columns_examples` (`Columns.lazy`): its cells read a chunk at a
    time for the checks, and its inputs left in the memory-mapped files (`ArrowRows`)."""

    def __init__(self, split: Any, needed: list[str], inputs: list[str], kind: str) -> None:
        self.split = split
        self.features = split.features  # `Dataset.features` deep-copies on every access
        self.inputs_of = inputs
        self.kind = kind
        lazy_image = kind == "image" and type(self.features.get(inputs[0])).__name__ == "Image"
        self.images = [inputs[0]] if lazy_image else []
        self.read = [c for c in needed if c not in self.images]
        # image paths are held (their files are checked before training); text, features, `Image`s are read
        self.reads_inputs = kind in ("text", "vector") or inputs[0] in self.images

    def pieces(self, part: Columns) -> Iterator[tuple[int, Columns]]:
        arrow = self.split.select_columns(self.read).with_format("arrow")
        first = 0
        for table in arrow.iter(batch_size=_CHUNK) if self.read else [None]:
            rows = table.num_rows if table is not None else len(self.split)
            cells: dict[str, Sequence[Any]] = {c: _Unread(rows) for c in self.images}
            for c in self.read:
                cells[c] = _named(self.features[c], table.column(c).to_pylist())

            def where_of(row: int, column: str, first: int = first) -> str:
                return part.where(first + row, column)

            yield first, Columns(part.name, cells, rows, where_of, part.root)
            cells.clear()  # checked: free this chunk before reading the next, not after
            first += rows

    def inputs(self, kept: array) -> ArrowRows:
        rows = np.frombuffer(kept, dtype=np.int64).copy() if len(kept) else np.zeros(0, dtype=np.int64)
        return ArrowRows(self.split, self.inputs_of, self.kind, rows)


def hf_columns(recipe: Recipe, kind: str) -> list[Columns]:
    """The train (and val) splits as columns, reading only the columns the recipe needs."""
    data = recipe.data
    assert data is not None
    dataset, where = open_dataset(recipe)
    needed = needed_columns(recipe, kind, "hf")
    inputs = input_columns(recipe, kind, "hf")
    splits = [data.hf.train_split] + ([data.hf.val_split] if data.hf.val_split else [])
    root = Path(data.train) if data.train and Path(data.train).is_dir() else None
    parts = []
    for name in splits:
        split = split_of(dataset, name, where)
        missing = [c for c in needed if c not in split.column_names]
        if missing:
            raise DataError(
                f"{where}[{name}]: column {missing[0]!r} not found; columns are: {', '.join(split.column_names)}"
            )

        def where_of(row: int, column: str, name: str = name) -> str:
            return f"{where}[{name}]:{row + 1}:{column}"

        lazy = ArrowSplit(split, needed, inputs, kind)
        parts.append(Columns(f"{where}[{name}]", {}, len(split), where_of, root, lazy=lazy))
    return parts


@DATA_SOURCES.implements("hf")
def hf_source(recipe: Recipe, model: Any) -> tuple[Examples, Examples]:
    """A Hugging Face dataset: input and target columns as for tables; `Image` features decoded lazily."""
    assert recipe.data is not None
    kind = model.input_spec.kind
    train, val = columns_examples(recipe, model, hf_columns(recipe, kind), "hf")
    if kind == "image":  # image paths in a column are checked like a table's; `Image` features decode lazily
        skip = recipe.data.on_bad_file == "skip"
        train, val = verified_examples(train, skip=skip), verified_examples(val, skip=skip)
    return train, val
