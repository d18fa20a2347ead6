"""Image sources: sklearn's `digits` and class-per-folder `image_folder`, with image checks."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
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


def _image_files(folder: Path, where: str) -> tuple[list[str], list[tuple[str, str]]]:
    """(classes, [(image file, class)]): files as strings (a `Path` each cost a 20k-image folder
    0.1 s of start-up; the dataset opens either)."""
    if not folder.is_dir():
        raise DataError(f"{where}: image folder {folder} does not exist")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{where}: {folder} has no class sub-folders (expected {folder}/<class>/<image>)")
    files = []
    for name in classes:
        found = image_files(folder / name)
        if not found:
            raise DataError(
                f"{where}: class folder {folder / name} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        files.extend((file, name) for file in found)
    return classes, files


def image_files(folder: Path) -> list[str]:
    """The image files under `folder`, as `sorted(folder.rglob("*"))` would list them (folders
    walked, symlinked folders not entered, unreadable ones skipped, names starting with a dot left
    out), but as strings from one `os.scandir` per folder: a Path object and a stat per file made
    listing 5,000 files take 45 ms instead of 9, a visible share of predicting small images
    and of a build's start-up. Training and `surgery predict` list folders with it."""
    found: list[tuple[str, ...]] = []
    _walk(str(folder), (), found)
    found.sort()  # by path parts, as paths sort
    base = str(folder)
    return [os.path.join(*parts) if base == "." else os.path.join(base, *parts) for parts in found]


def _walk(directory: str, parts: tuple[str, ...], found: list[tuple[str, ...]]) -> None:
    try:
        with os.scandir(directory) as listing:
            entries = list(listing)
    except (PermissionError, FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        name = entry.name
        try:
            folder = entry.is_dir() and not entry.is_symlink()
            image = not folder and not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES
            if image and entry.is_file():
                found.append((*parts, name))
        except OSError:  # gone or unreadable while listed
            continue
        if folder:
            _walk(entry.path, (*parts, name), found)


def verify_images(paths: Sequence[str | Path], *, skip: bool = False) -> list[tuple[str, str]]:
    """Open and verify every image file (cheap: headers and checksums), before training starts.
    A bad one is a DataError, or with `skip` is returned as (file, why) for the caller to leave out.

    Files that passed before are not opened again: `checked_images` remembers each good file by
    its size, modification time and inode (a rebuild, a resume or a tune trial on the same data starts
    at once); a file that changed is checked again, and a bad one is never remembered."""
    bad: list[tuple[str, str]] = []
    level = 2 if skip else 1  # 2: decoded too (what `skip` needs), 1: verified
    with checked_images(paths) as known:
        for path in paths:
            key = str(path)
            try:
                stat = os.stat(key)
                identity = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
                if (seen := known.get(key)) and seen[:3] == identity and seen[3] >= level:
                    continue
                with Image.open(path) as image:
                    image.verify()
                if skip:  # decode it too: a file skipped now can't fail the run later
                    with Image.open(path) as image:
                        image.load()
                known[key] = [*identity, level]
            except Exception as err:  # PIL raises many types for a bad file
                known.pop(key, None)
                if not skip:
                    raise DataError(
                        f"unreadable image {path}: {err} (set `data.on_bad_file: skip` to leave such files out)"
                    ) from None
                bad.append((key, str(err).splitlines()[0] if str(err) else type(err).__name__))
    return bad


@contextlib.contextmanager
def checked_images(paths: Sequence[str | Path]) -> Iterator[dict[str, list[int]]]:
    """The remembered checks for this list of files ({file: [size, mtime_ns, inode, level]}), kept
    in the cache folder under a hash of the list and the working folder (relative paths name other
    files elsewhere), and written back (atomically) if they changed. The cache is an optimisation
    only: unreadable or unwritable, it is ignored and everything is checked."""
    from surgery.files import write_json_atomic
    from surgery.places import cache_dir

    listed = "\n".join([os.getcwd(), *map(str, paths)]).encode()
    file = cache_dir() / "image-checks" / (hashlib.sha256(listed).hexdigest() + ".json")
    known: dict[str, list[int]] = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads(file.read_text(encoding="utf-8"))
        if isinstance(loaded, dict):
            known = {k: v for k, v in loaded.items() if isinstance(v, list) and len(v) == 4}
    before = dict(known)
    try:
        yield known
    finally:
        if known != before:
            with contextlib.suppress(OSError):
                write_json_atomic(file, known, indent=None)


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
    val_files: list[tuple[str, str]] = []
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

    def examples(entries: list[tuple[str, str]], where: str) -> Examples:
        labels = torch.tensor([classes.index(c) for _, c in entries], dtype=torch.long)
        checked = class_targets(recipe, model, classes, labels, where)
        return Examples("image", [p for p, _ in entries], checked.targets, checked.class_names, skipped)

    train = examples(files, f"data.train {data.train}")
    if data.val:
        return train, examples(val_files, f"data.val {data.val}")
    return split_examples(train, data.val_split, data.split_seed)
