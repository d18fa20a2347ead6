"""One named split of data, read through the same sources training uses: what `surgery evaluate
--data` (and batch prediction over a labelled table) call, with a bundle's recipe and heads.

`examples_for(recipe, model, data=None, split="val")`:
- `data` None: the recipe's own `train` or `val` split (the held-out part when it has no `val`);
- `data` a path (table, image folder, `save_to_disk` folder): every row of it (`split="all"`), or
  for an `hf` dataset the split of that name. The source follows the path when the recipe's
  doesn't fit it (a `.parquet` file for a `csv` recipe); the columns are the recipe's.

`model` is anything with `input_spec`, `head_info` (and `tokenizer`/`backbone` where they
matter): a built `SurgicalModel`, or `ModelView` made from a bundle's manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surgery.data_examples import Examples, read_source
from surgery.errors import DataError
from surgery.inputs import InputSpec
from surgery.schema import Recipe

_SUFFIX_SOURCES = {
    ".csv": "csv",
    ".tsv": "csv",
    ".tab": "csv",
    ".jsonl": "jsonl",
    ".parquet": "parquet",
    ".arrow": "hf",
}


@dataclass
class ModelView:
    """What a data source reads from a model: its input spec and heads (a bundle provides both)."""

    input_spec: InputSpec
    head_info: dict[str, Any]
    tokenizer: Any = None
    backbone: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


def source_for_path(path: Path, current: str) -> str:
    """The data source that reads `path`: the recipe's own when it fits, else by suffix/layout."""
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
            return "hf"
        return current if current in ("image_folder", "hf") else "image_folder"
    by_suffix = _SUFFIX_SOURCES.get(path.suffix.lower())
    if by_suffix is None:
        raise DataError(f"cannot tell what kind of data {path} is (expected a folder, .csv/.tsv, .jsonl or .parquet)")
    return current if current == by_suffix or (current == "hf" and by_suffix == "parquet") else by_suffix


def examples_for(recipe: Recipe, model: Any, data: str | Path | None = None, split: str = "val") -> Examples:
    """The examples of one split (see the module docstring); a DataError says what is wrong."""
    if recipe.data is None:
        raise DataError("the recipe has no `data:` section: its columns and targets are unknown")
    section = recipe.data
    if data is not None:
        path = Path(data).expanduser().absolute()
        if not path.exists():
            raise DataError(f"data {path} does not exist")
        source = source_for_path(path, section.source)
        update: dict[str, Any] = {"source": source, "train": str(path), "val": str(path), "limit_train": None}
        if source == "hf":
            name = split if split not in ("all", "val") else (section.hf.val_split or "validation")
            update["hf"] = section.hf.model_copy(update={"name": None, "train_split": name, "val_split": name})
        recipe = recipe.model_copy(update={"data": section.model_copy(update=update)})
        split = "val"
    elif split not in ("train", "val"):
        raise DataError(f"split {split!r}: the recipe's own data has `train` and `val` splits")
    assert recipe.data is not None
    train, val = read_source(recipe, model)
    return train if split == "train" else val


def check_data(recipe: Recipe, model: Any) -> str:
    """`surgery plan --data`: read the recipe's data through its source, as `build` would (every
    table row parsed, every image path checked), and report samples per split and per class; bad
    data is the DataError `build` would stop on."""
    from surgery.data_loaders import data_report

    if recipe.data is None:
        raise DataError("the recipe has no `data:` section")
    train, val = read_source(recipe, model)
    return data_report(recipe.data.source, train, val)
