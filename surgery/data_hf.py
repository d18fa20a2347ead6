"""The `hf` source: Hugging Face `datasets` (the optional `hf` extra) — a `save_to_disk` folder,
Arrow or Parquet files, or a hub id (`hf.name`, online or from the `datasets` cache); splits by name.

The dataset stays memory-mapped Arrow: label, text and feature columns are read column by column,
and an `Image` feature is decoded one row at a time when a batch needs it (`LazyImage`), so a
dataset of images bigger than memory trains. `ClassLabel` targets train by their class names.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from surgery.data_columns import Columns, columns_examples, needed_columns
from surgery.data_examples import Examples
from surgery.data_images import verified_examples
from surgery.errors import DataError
from surgery.registry import DATA_SOURCES
from surgery.schema import Recipe

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


def _cells(dataset: Any, column: str, image_input: bool) -> Sequence[Any]:
    feature = dataset.features.get(column)
    kind = type(feature).__name__
    if image_input and kind == "Image":
        return ImageColumn(dataset, column)
    values = dataset.data.column(column).to_pylist()
    if kind == "ClassLabel":
        return [feature.int2str(v) if v is not None and v >= 0 else None for v in values]
    if kind == "Sequence" and type(getattr(feature, "feature", None)).__name__ == "ClassLabel":
        return [[feature.feature.int2str(x) for x in v] if v is not None else None for v in values]
    if kind == "List" and type(getattr(feature, "feature", None)).__name__ == "ClassLabel":
        return [[feature.feature.int2str(x) for x in v] if v is not None else None for v in values]
    return values


def hf_columns(recipe: Recipe, kind: str) -> list[Columns]:
    """The train (and val) splits as columns, reading only the columns the recipe needs."""
    data = recipe.data
    assert data is not None
    dataset, where = open_dataset(recipe)
    needed = needed_columns(recipe, kind, "hf")
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
        cells = {c: _cells(split, c, kind == "image" and c == data.image_column) for c in needed}

        def where_of(row: int, column: str, name: str = name) -> str:
            return f"{where}[{name}]:{row + 1}:{column}"

        parts.append(Columns(f"{where}[{name}]", cells, len(split), where_of, root))
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
