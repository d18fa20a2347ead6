"""Image sources: sklearn's `digits` and class-per-folder `image_folder`, with image checks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from surgery.data_examples import Examples, split_examples
from surgery.data_targets import class_targets
from surgery.errors import DataError
from surgery.registry import DATA_SOURCES
from surgery.schema import Recipe

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@DATA_SOURCES.implements("digits")
def digits_source(recipe: Recipe, model: Any) -> tuple[Examples, Examples]:
    """sklearn's bundled 8×8 digits as 'L' images (0..16 scaled to 0..255), split by `split_seed`."""
    from sklearn.datasets import load_digits

    assert recipe.data is not None
    digits = load_digits()
    pixels = (digits.images * 255.0 / 16.0).round().clip(0, 255).astype("uint8")
    images = [Image.fromarray(p, mode="L") for p in pixels]
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    checked = class_targets(recipe, model, [str(i) for i in range(10)], labels, "the digits data")
    examples = Examples("image", images, checked.targets, checked.class_names)
    return split_examples(examples, recipe.data.val_split, recipe.data.split_seed)


def _image_files(folder: Path, where: str) -> tuple[list[str], list[tuple[Path, str]]]:
    if not folder.is_dir():
        raise DataError(f"{where}: image folder {folder} does not exist")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{where}: {folder} has no class sub-folders (expected {folder}/<class>/<image>)")
    files = []
    for name in classes:
        found = sorted(
            p for p in (folder / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )
        if not found:
            raise DataError(
                f"{where}: class folder {folder / name} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        files.extend((p, name) for p in found)
    return classes, files


def verify_images(paths: Sequence[Path], *, skip: bool = False) -> list[tuple[str, str]]:
    """Open and verify every image file (cheap: headers and checksums), before training starts.
    A bad one is a DataError, or with `skip` is returned as (file, why) for the caller to leave out."""
    bad: list[tuple[str, str]] = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
            if skip:  # decode it too: a file skipped now can't fail the run later
                with Image.open(path) as image:
                    image.load()
        except Exception as err:  # PIL raises many types for a bad file
            if not skip:
                raise DataError(
                    f"unreadable image {path}: {err} (set `data.on_bad_file: skip` to leave such files out)"
                ) from None
            bad.append((str(path), str(err).splitlines()[0] if str(err) else type(err).__name__))
    return bad


def verified_examples(examples: Examples, *, skip: bool) -> Examples:
    """Examples whose image files (paths among `inputs`) were checked before training; with `skip`
    the unreadable ones are left out and listed in `skipped`."""
    if not isinstance(examples.inputs, list):
        return examples  # read on access (`datasets` images), not files to check
    bad = verify_images([p for p in examples.inputs if isinstance(p, Path)], skip=skip)
    if not bad:
        return examples
    names = {file for file, _ in bad}
    kept = examples.subset([i for i, p in enumerate(examples.inputs) if str(p) not in names])
    kept.skipped = [*examples.skipped, *bad]
    return kept


@DATA_SOURCES.implements("image_folder")
def image_folder_source(recipe: Recipe, model: Any) -> tuple[Examples, Examples]:
    """Class-per-folder images; classes sorted by name; `val` folder or a seeded split."""
    data = recipe.data
    assert data is not None and data.train is not None
    classes, files = _image_files(Path(data.train), "data.train")
    val_files: list[tuple[Path, str]] = []
    if data.val:
        val_classes, val_files = _image_files(Path(data.val), "data.val")
        extra = sorted(set(val_classes) - set(classes))
        if extra:
            raise DataError(f"data.val: classes {', '.join(extra)} are not in data.train ({', '.join(classes)})")
    skipped = verify_images([p for p, _ in files + val_files], skip=data.on_bad_file == "skip")
    if skipped:
        bad = {file for file, _ in skipped}
        files = [(p, c) for p, c in files if str(p) not in bad]
        val_files = [(p, c) for p, c in val_files if str(p) not in bad]
        if not files:
            raise DataError(
                f"data.train {data.train}: every image is unreadable (first: {skipped[0][0]}: {skipped[0][1]})"
            )

    def examples(entries: list[tuple[Path, str]], where: str) -> Examples:
        labels = torch.tensor([classes.index(c) for _, c in entries], dtype=torch.long)
        checked = class_targets(recipe, model, classes, labels, where)
        return Examples("image", [p for p, _ in entries], checked.targets, checked.class_names, skipped)

    train = examples(files, f"data.train {data.train}")
    if data.val:
        return train, examples(val_files, f"data.val {data.val}")
    return split_examples(train, data.val_split, data.split_seed)
