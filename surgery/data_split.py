"""One split of a recipe's data, read through a bundle: what `surgery evaluate` scores.

`split_examples_of` is the one place a command other than `build` reads data: it runs the data
spec's own source (so every check the source makes, such as labels the heads don't know or an
input kind the model doesn't take, applies here too) against a model described by its bundle
(`ModelFacts`: heads and input spec, no weights needed). `data_at` points a recipe's data spec at
another folder or table (`evaluate --data`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery.data import Examples
from surgery.errors import DataError
from surgery.heads import HeadInfo
from surgery.inputs import InputSpec
from surgery.registry import DATA_SOURCES
from surgery.schema import Data, Recipe

TABLE_SOURCES = {".csv": "csv", ".jsonl": "jsonl"}


@dataclass
class ModelFacts:
    """What a data source asks of a model, from a bundle's manifest: its heads and its input."""

    head_info: dict[str, HeadInfo]
    input_spec: InputSpec
    tokenizer: Any = None

    @classmethod
    def of(cls, heads: list[dict[str, Any]], spec: InputSpec, tokenizer: Any = None) -> ModelFacts:
        info = {
            h["name"]: HeadInfo(
                task=h["task"] or "regression",
                out_features=int(h["out_features"] or 1),
                output_shape=(int(h["out_features"] or 1),),
                labels=tuple(h["labels"]) if h.get("labels") else None,
            )
            for h in heads
        }
        return cls(info, spec, tokenizer)


def split_examples_of(recipe: Recipe, model: Any, split: str) -> Examples:
    """The examples of `split` (`train` or `val`) of the recipe's data, checked against `model`'s
    heads and input as `build` checks them; no limits applied (a score covers the whole split)."""
    if recipe.data is None:
        raise DataError("the bundled recipe has no `data:` section; give the data to evaluate on with --data")
    if split not in ("train", "val"):
        raise DataError(f"--split {split}: the recipe's data has the splits train and val")
    train, val = DATA_SOURCES.get(recipe.data.source)(recipe, model)
    return train if split == "train" else val


def data_at(recipe: Recipe, path: Path, split: str | None, spec: InputSpec) -> Recipe:
    """`recipe` with its data read from `path` as a whole (its `val` split): a folder of class
    sub-folders (or, with `split`, its sub-folder of that name) or a CSV/JSONL table. Refused in
    one line: a missing path, a folder for a model that doesn't take images, a split of a table."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"--data {path}: no such folder or file")
    if path.is_dir():
        if split is not None:
            if not (path / split).is_dir():
                raise DataError(f"--data {path}: no sub-folder {split!r} (--split names one)")
            path = path / split
        if spec.kind != "image":
            raise DataError(f"--data {path}: a folder holds images, but the model takes {spec.kind} input")
        source = "image_folder"
    else:
        source = TABLE_SOURCES.get(path.suffix.lower())
        if source is None:
            raise DataError(
                f"--data {path}: give a folder of class sub-folders or a table ({', '.join(TABLE_SOURCES)})"
            )
        if split is not None:
            raise DataError(f"--data {path}: a table is evaluated whole; --split names a sub-folder of a folder")
    where = str(path.resolve())
    base = recipe.data.model_dump() if recipe.data is not None else {}
    for key in ("limit_train", "limit_val", "train", "val", "source"):
        base.pop(key, None)
    data = Data.model_validate({**base, "source": source, "train": where, "val": where})
    return recipe.model_copy(update={"data": data})
