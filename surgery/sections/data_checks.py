"""Checks between `data:`, `backbone:` and `heads:` that need no data file and no torch: what
`build` would refuse after loading, found by `validate` and `plan` first.

The model's input kind is known here for the zoos whose kind is fixed (timm and torchvision take
images, `tabular` a feature vector); a transformers model's kind is known only once built, and
`build` checks it then. A head's output count is read from its last sized layer.
"""

from __future__ import annotations

from typing import NamedTuple

from surgery.sections.heads import Head
from surgery.sections.recipe import Recipe

TABLE_SOURCES = ("csv", "jsonl", "parquet", "hf")
FOLDER_SOURCES = ("image_folder", "digits")
_IMAGE_ZOOS = ("timm", "torchvision")


class DataProblem(NamedTuple):
    path: tuple[str | int, ...]
    message: str


def out_features(head: Head) -> int | None:
    """The head's output count when its last sized layer says it (linear or mlp)."""
    for layer in reversed(head.layers):
        for kind in ("linear", "mlp"):
            params = getattr(layer, kind, None)
            if params is not None:
                return int(params.out_features)
        if layer.conv1x1 is not None:
            return None
    return None


def input_kind(recipe: Recipe) -> str | None:
    """'image' or 'vector' where the backbone zoo fixes it; None when only the build can tell."""
    source = recipe.backbone.source
    return "image" if source in _IMAGE_ZOOS else "vector" if source == "tabular" else None


def data_problems(recipe: Recipe) -> list[DataProblem]:
    """Every data/model mismatch visible in the recipe itself."""
    data = recipe.data
    if data is None:
        return []
    out: list[DataProblem] = []

    def refuse(path: tuple[str | int, ...], message: str) -> None:
        out.append(DataProblem(path, message))

    source = data.source
    inputs = [k for k in ("image_column", "text_column", "feature_columns") if getattr(data, k)]
    if source in TABLE_SOURCES:
        if not data.train and not (source == "hf" and data.hf.name):
            refuse(
                ("data", "train"),
                f"data source {source!r} needs a `train` path" + (" or `hf.name`" if source == "hf" else ""),
            )
        for extra in inputs[1:]:
            refuse(("data", extra), f"one input per model: {inputs[0]} is set already")
    elif inputs or data.image_root:
        for key in [*inputs, *(["image_root"] if data.image_root else [])]:
            refuse(("data", key), f"applies to table sources ({', '.join(TABLE_SOURCES)}), not {source!r}")
    if data.image_root and not data.image_column and source in TABLE_SOURCES:
        refuse(("data", "image_root"), "applies with `data.image_column`")
    if data.delimiter and source != "csv":
        refuse(("data", "delimiter"), f"applies to `csv`, not {source!r}")
    if data.on_bad_row != "error" and source not in TABLE_SOURCES:
        refuse(("data", "on_bad_row"), f"applies to table sources; {source!r} files use `on_bad_file`")
    if source != "hf" and data.hf != type(data.hf)():
        refuse(("data", "hf"), f"applies to `source: hf`, not {source!r}")
    if source == "hf" and data.hf.name and data.train:
        refuse(("data", "hf", "name"), "names a hub dataset, and data.train names local files: keep one of them")
    for key in ("config", "revision"):
        if source == "hf" and getattr(data.hf, key) is not None and not data.hf.name:
            refuse(("data", "hf", key), "applies to a hub dataset (`hf.name`), not to local files")
    if source == "image_folder" and not data.train:
        refuse(("data", "train"), "data source 'image_folder' needs a `train` path")
    out.extend(_kind_problems(recipe, inputs))
    out.extend(_head_problems(recipe))
    return out


def _kind_problems(recipe: Recipe, inputs: list[str]) -> list[DataProblem]:
    data = recipe.data
    assert data is not None
    kind, source = input_kind(recipe), data.source
    out: list[DataProblem] = []
    wants = {"image": "image_column", "vector": "feature_columns"}
    if kind and source in TABLE_SOURCES and inputs and inputs[0] != wants[kind]:
        out.append(
            DataProblem(
                ("data", inputs[0]), f"the {recipe.backbone.source} backbone takes {kind}s: set data.{wants[kind]}"
            )
        )
    if kind and source in TABLE_SOURCES and not inputs:
        out.append(
            DataProblem(
                ("data", wants[kind]),
                f"the {recipe.backbone.source} backbone takes {kind}s: set the column(s) holding them",
            )
        )
    if kind == "vector":
        if source in FOLDER_SOURCES:
            out.append(
                DataProblem(("data", "source"), f"the tabular backbone takes feature vectors; {source!r} gives images")
            )
        features = recipe.backbone.kwargs.get("features")
        if data.feature_columns and features != len(data.feature_columns):
            out.append(
                DataProblem(
                    ("backbone", "kwargs", "features"),
                    f"set to {len(data.feature_columns)}, the number of data.feature_columns (got {features!r})",
                )
            )
        if recipe.backbone.pretrained and not recipe.backbone.weights:
            out.append(
                DataProblem(
                    ("backbone", "pretrained"),
                    "the tabular backbone has no pretrained weights: set false (or `weights:`)",
                )
            )
    return out


def _head_problems(recipe: Recipe) -> list[DataProblem]:
    """Losses and targets the data cannot provide (class folders carry one class per image)."""
    data = recipe.data
    assert data is not None
    out: list[DataProblem] = []
    for i, head in enumerate(recipe.heads):
        loss, width = head.loss.name, out_features(head)
        if data.source in FOLDER_SOURCES:
            if loss == "bce_with_logits" and width and width > 1:
                out.append(
                    DataProblem(
                        ("heads", i, "loss"),
                        f"a multi-label head ({width} outputs) needs a label list per sample; {data.source!r} gives one class "
                        "per image: use a table (csv/jsonl/parquet/hf) with `image_column` and a label-list column",
                    )
                )
            elif loss not in ("cross_entropy", "bce_with_logits"):
                out.append(
                    DataProblem(
                        ("heads", i, "loss"),
                        f"{loss} trains a regression head; {data.source!r} gives class labels: use a table with a number column",
                    )
                )
        if isinstance(head.target, list):
            if loss in ("cross_entropy", "bce_with_logits"):
                out.append(
                    DataProblem(
                        ("heads", i, "target"), "several target columns make a regression head (one per output)"
                    )
                )
            elif width is not None and len(head.target) != width:
                out.append(DataProblem(("heads", i, "target"), f"{len(head.target)} columns for {width} outputs"))
    return out
