"""Training data: sources from the `DATA_SOURCES` registry, augmentations from `AUGMENTATIONS`,
and DataLoaders whose order is a pure function of (seed, epoch).

A source returns two `Examples` (train, val): raw inputs plus one target tensor per head. The
`ExampleDataset` turns a raw input into model tensors with the same preprocessing serving uses
(`surgery.preprocess`). Data order and augmentations derive from (seed, epoch, index) only, never
from global random state, so a run resumed mid-epoch sees exactly the batches it would have seen.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from surgery.errors import DataError
from surgery.inputs import InputSpec
from surgery.placement import SingleDevice
from surgery.preprocess import image_mode, image_to_uint8, normalise, texts_to_batch
from surgery.registry import AUGMENTATIONS, DATA_SOURCES
from surgery.schema import Augmentation, Recipe

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


# --------------------------------------------------------------------------- examples


@dataclass
class Examples:
    """One split before preprocessing.

    `kind` says what `inputs` holds: "image" (PIL images or image file paths), "text" (strings),
    or "tensor" (a tuple of tensors, one per model input, first dimension = samples).
    """

    kind: str
    inputs: Any
    targets: dict[str, torch.Tensor]
    class_names: dict[str, list[str]] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why) left out (`on_bad_file: skip`)

    def __len__(self) -> int:
        return len(self.inputs[0]) if self.kind == "tensor" else len(self.inputs)

    def subset(self, indices: Sequence[int]) -> Examples:
        index = torch.as_tensor(list(indices), dtype=torch.long)
        if self.kind == "tensor":
            inputs: Any = tuple(t[index] for t in self.inputs)
        else:
            inputs = [self.inputs[i] for i in indices]
        targets = {name: t[index] for name, t in self.targets.items()}
        return Examples(self.kind, inputs, targets, self.class_names, self.skipped)


def split_examples(examples: Examples, val_split: float, seed: int) -> tuple[Examples, Examples]:
    """Seeded hold-out split (independent of the training seed)."""
    n = len(examples)
    n_val = max(1, round(n * val_split))
    if n_val >= n:
        raise DataError(f"data.val_split {val_split} leaves no training samples out of {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return examples.subset(sorted(order[n_val:])), examples.subset(sorted(order[:n_val]))


# --------------------------------------------------------------------------- targets


def head_columns(recipe: Recipe) -> dict[str, str]:
    """Head name -> the label column that trains it."""
    assert recipe.data is not None
    return {head.name: head.target or recipe.data.label_column for head in recipe.heads}


def _head_labels(recipe: Recipe, model: Any, name: str) -> list[str] | None:
    labels = model.head_info[name].labels
    if labels:
        return [str(x) for x in labels]
    head = next(h for h in recipe.heads if h.name == name)
    return [str(x) for x in head.labels] if head.labels else None


def class_targets(recipe: Recipe, model: Any, class_names: list[str], labels: torch.Tensor, where: str) -> Examples:
    """Targets for sources whose only label is a class (digits, image folders), checked against heads."""
    assert recipe.data is not None
    targets: dict[str, torch.Tensor] = {}
    names: dict[str, list[str]] = {}
    for name, column in head_columns(recipe).items():
        if column != recipe.data.label_column:
            raise DataError(
                f"head {name!r} trains on column {column!r}, but {where} has only class labels (data.label_column {recipe.data.label_column!r})"
            )
        info = model.head_info[name]
        task, out = info.task, info.out_features
        head_labels = _head_labels(recipe, model, name)
        if task == "regression":
            raise DataError(f"head {name!r} is a regression head, but {where} provides class labels")
        if task == "binary":
            if len(class_names) != 2 or out != 1:
                raise DataError(
                    f"head {name!r} is binary (1 output), but {where} has {len(class_names)} classes: {', '.join(class_names)}"
                )
            targets[name] = labels.to(torch.float32)
            names[name] = class_names
            continue
        if head_labels is not None:
            missing = sorted(set(class_names) - set(head_labels))
            if missing:
                raise DataError(
                    f"head {name!r} labels do not include the classes {', '.join(missing)} found in {where}"
                )
            remap = torch.tensor([head_labels.index(c) for c in class_names], dtype=torch.long)
            targets[name] = remap[labels]
            names[name] = head_labels
        else:
            targets[name] = labels.to(torch.long)
            names[name] = class_names
        if len(names[name]) != out:
            raise DataError(
                f"head {name!r} has {out} outputs, but {where} has {len(names[name])} classes ({', '.join(names[name][:12])}); set out_features: {len(names[name])}"
            )
    return Examples("image", [], targets, names)


def _int_like(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and value.strip().lstrip("-").isdigit()


def _float(value: Any, column: str, where: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: column {column!r} holds {value!r}, which is not a number") from None


def column_targets(
    recipe: Recipe, model: Any, rows: dict[str, list[Any]], where: str
) -> tuple[dict[str, list[Any]], dict[str, list[str]]]:
    """Per head: the target values of every row (train+val together, so class maps agree), and class names."""
    targets: dict[str, list[Any]] = {}
    names: dict[str, list[str]] = {}
    for name, column in head_columns(recipe).items():
        values = rows[column]
        info = model.head_info[name]
        task, out = info.task, info.out_features
        if task == "regression" or (task == "binary" and out > 1):
            targets[name] = [
                [_float(x, column, where) for x in v] if isinstance(v, list) else _float(v, column, where)
                for v in values
            ]
            continue
        labels = _head_labels(recipe, model, name)
        if labels is None and not all(_int_like(v) for v in values):
            labels = sorted({str(v) for v in values})
        if labels is not None:
            unknown = sorted({str(v) for v in values} - set(labels))
            if unknown:
                raise DataError(
                    f"{where}: column {column!r} has values {', '.join(unknown[:5])} not among head {name!r} labels ({', '.join(labels[:12])})"
                )
            index = {label: i for i, label in enumerate(labels)}
            ids = [index[str(v)] for v in values]
            names[name] = labels
        else:
            ids = [int(v) for v in values]
        classes = 2 if task == "binary" else out
        bad = [v for v in ids if not 0 <= v < classes]
        if bad:
            raise DataError(f"{where}: column {column!r} has class {bad[0]} but head {name!r} has {classes} classes")
        if labels is not None and len(labels) > classes:
            raise DataError(
                f"head {name!r} has {classes} classes, but {where} column {column!r} has {len(labels)}: {', '.join(labels[:12])}"
            )
        targets[name] = [float(v) for v in ids] if task == "binary" else ids
    return targets, names


def _to_tensors(targets: dict[str, list[Any]], model: Any) -> dict[str, torch.Tensor]:
    out = {}
    for name, values in targets.items():
        dtype = torch.long if model.head_info[name].task == "multiclass" else torch.float32
        out[name] = torch.tensor(values, dtype=dtype)
    return out


# --------------------------------------------------------------------------- sources


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


def _read_rows(path: Path, fmt: str, where: str) -> tuple[list[dict[str, Any]], list[str]]:
    if not path.is_file():
        raise DataError(f"{where}: file {path} does not exist")
    if fmt == "csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = list(reader.fieldnames or [])
    else:
        rows, columns = [], []
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{number}: expected a JSON object per line")
                rows.append(row)
                columns.extend(k for k in row if k not in columns)
    if not rows:
        raise DataError(f"{where}: {path} has no rows")
    return rows, columns


def _table_source(recipe: Recipe, model: Any, fmt: str) -> tuple[Examples, Examples]:
    data = recipe.data
    assert data is not None and data.train is not None
    spec: InputSpec = model.input_spec
    parts = [("data.train", Path(data.train))] + ([("data.val", Path(data.val))] if data.val else [])
    if spec.kind == "text" and not data.text_column:
        raise DataError(f"the model takes text: set data.text_column to the {fmt} column holding it")
    if spec.kind == "vector" and not data.feature_columns:
        raise DataError(f"the model takes a feature vector: set data.feature_columns to the {fmt} columns holding it")
    if spec.kind == "image":
        raise DataError(
            f"the model takes images; data source {fmt!r} provides text or feature vectors (use image_folder)"
        )
    needed = ([data.text_column] if spec.kind == "text" else list(data.feature_columns or [])) + sorted(
        set(head_columns(recipe).values())
    )
    if spec.kind == "vector" and spec.features and len(data.feature_columns or []) != spec.features:
        raise DataError(
            f"data.feature_columns has {len(data.feature_columns or [])} columns, but the model takes {spec.features} features"
        )
    all_rows: list[dict[str, Any]] = []
    sizes = []
    for where, path in parts:
        rows, columns = _read_rows(path, fmt, where)
        for column in needed:
            if column not in columns:
                raise DataError(f"{where}: column {column!r} not found in {path}; columns are: {', '.join(columns)}")
        missing = [i for i, row in enumerate(rows) if any(row.get(c) is None for c in needed)]
        if missing:
            raise DataError(f"{where}: row {missing[0] + 1} of {path} lacks a value for one of {', '.join(needed)}")
        all_rows.extend(rows)
        sizes.append(len(rows))
    columns_values = {c: [row[c] for row in all_rows] for c in set(head_columns(recipe).values())}
    target_values, names = column_targets(recipe, model, columns_values, f"data {fmt}")
    targets = _to_tensors(target_values, model)
    if spec.kind == "text":
        examples = Examples("text", [str(row[data.text_column]) for row in all_rows], targets, names)
    else:
        features = [[_float(row[c], c, f"data {fmt}") for c in data.feature_columns or []] for row in all_rows]
        examples = Examples("tensor", (torch.tensor(features, dtype=torch.float32),), targets, names)
    if not data.val:
        return split_examples(examples, data.val_split, data.split_seed)
    n_train = sizes[0]
    return examples.subset(range(n_train)), examples.subset(range(n_train, len(examples)))


@DATA_SOURCES.implements("csv")
def csv_source(recipe: Recipe, model: Any) -> tuple[Examples, Examples]:
    """A CSV file with a header row: a text column or feature columns, and label column(s)."""
    return _table_source(recipe, model, "csv")


@DATA_SOURCES.implements("jsonl")
def jsonl_source(recipe: Recipe, model: Any) -> tuple[Examples, Examples]:
    """One JSON object per line: a text field or feature fields, and label field(s)."""
    return _table_source(recipe, model, "jsonl")


@DATA_SOURCES.implements("synthetic")
def synthetic_source(recipe: Recipe, model: Any) -> tuple[Examples, Examples]:
    """Random inputs shaped like the model's example inputs; the first classification head's
    classes shift the inputs, so the task is learnable (useful for tests and benchmarks)."""
    data = recipe.data
    assert data is not None
    n_train = data.synthetic.num_samples
    n_val = max(1, n_train // 4)
    n = n_train + n_val
    gen = torch.Generator().manual_seed(data.split_seed)
    spec: InputSpec = model.input_spec
    examples = [t.detach().cpu() for t in model.example_inputs(1)]
    targets: dict[str, torch.Tensor] = {}
    class_of: torch.Tensor | None = None
    for name, info in model.head_info.items():
        task, out = info.task, info.out_features
        if task == "multiclass":
            if data.synthetic.num_classes > out:
                raise DataError(
                    f"data.synthetic.num_classes {data.synthetic.num_classes} exceeds head {name!r} outputs ({out})"
                )
            targets[name] = torch.randint(data.synthetic.num_classes, (n,), generator=gen)
            class_of = targets[name] if class_of is None else class_of
        elif task == "binary":
            shape = (n,) if out == 1 else (n, out)
            targets[name] = torch.randint(2, shape, generator=gen).to(torch.float32)
        else:
            shape = (n,) if out == 1 else (n, out)
            targets[name] = torch.randn(shape, generator=gen)
    if spec.kind == "text":
        length = min(16, spec.max_length)
        vocab = int(getattr(model.tokenizer, "vocab_size", 0) or 1000)
        ids = torch.randint(1, vocab, (n, length), generator=gen)
        if class_of is not None:
            ids[:, 0] = 1 + class_of  # the class is readable from the first token
        inputs: tuple[torch.Tensor, ...] = (ids, torch.ones(n, length, dtype=torch.long))
    else:
        shape = tuple(examples[0].shape[1:])
        x = torch.randn((n, *shape), generator=gen)
        if class_of is not None:
            prototypes = torch.randn((int(class_of.max()) + 1, *shape), generator=gen)
            x = x + prototypes[class_of]
        inputs = (x.to(examples[0].dtype),)
    all_examples = Examples("tensor", inputs, targets, {})
    return all_examples.subset(range(n_train)), all_examples.subset(range(n_train, n))


# --------------------------------------------------------------------------- augmentations

# Each builder returns (stage, transform): "uint8" transforms see the resized uint8 image,
# "float" transforms see the normalised float tensor.
Stage = tuple[str, Callable[[torch.Tensor], torch.Tensor]]


@AUGMENTATIONS.implements("hflip")
def _hflip(params: Any, spec: InputSpec) -> Stage:
    return "uint8", v2.RandomHorizontalFlip(params.p)


@AUGMENTATIONS.implements("vflip")
def _vflip(params: Any, spec: InputSpec) -> Stage:
    return "uint8", v2.RandomVerticalFlip(params.p)


@AUGMENTATIONS.implements("random_resized_crop")
def _random_resized_crop(params: Any, spec: InputSpec) -> Stage:
    return "uint8", v2.RandomResizedCrop(
        list(spec.size), scale=tuple(params.scale), ratio=tuple(params.ratio), antialias=True
    )


@AUGMENTATIONS.implements("random_crop")
def _random_crop(params: Any, spec: InputSpec) -> Stage:
    return "uint8", v2.RandomCrop(list(spec.size), padding=params.padding)


@AUGMENTATIONS.implements("rotate")
def _rotate(params: Any, spec: InputSpec) -> Stage:
    return "uint8", v2.RandomRotation(params.degrees)


@AUGMENTATIONS.implements("color_jitter")
def _color_jitter(params: Any, spec: InputSpec) -> Stage:
    return "uint8", v2.ColorJitter(brightness=params.brightness, contrast=params.contrast, saturation=params.saturation)


@AUGMENTATIONS.implements("gaussian_noise")
def _gaussian_noise(params: Any, spec: InputSpec) -> Stage:
    std = params.std

    def add_noise(x: torch.Tensor) -> torch.Tensor:
        return x + torch.randn_like(x) * std

    return "float", add_noise


def build_augmentations(augment: Sequence[Augmentation], spec: InputSpec) -> list[Stage]:
    return [AUGMENTATIONS.get(a.kind)(a.params, spec) for a in augment]


# --------------------------------------------------------------------------- dataset


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A per-sample seed: augmentations depend on (seed, epoch, index) only."""
    return (seed * 1_000_003 + epoch * 10_007 + index * 7_919 + 12_345) % (2**63 - 1)


class ExampleDataset(Dataset):
    """Examples -> (inputs, targets). A key is an index, or (epoch, index) to seed augmentations."""

    def __init__(self, examples: Examples, spec: InputSpec, augmentations: Sequence[Stage] = (), seed: int = 0) -> None:
        self.examples = examples
        self.spec = spec
        self.augmentations = list(augmentations)
        self.seed = seed
        self._pixels: list[torch.Tensor] | None = None
        if examples.kind == "image":
            image_mode(spec)
            if examples.inputs and all(isinstance(x, Image.Image) for x in examples.inputs):
                # In-memory images (digits): convert and resize once, not every epoch.
                self._pixels = [image_to_uint8(x, spec) for x in examples.inputs]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, dict[str, torch.Tensor]]:
        epoch, index = key if isinstance(key, tuple) else (None, key)
        targets = {name: t[index] for name, t in self.examples.targets.items()}
        if self.examples.kind == "text":
            return self.examples.inputs[index], targets
        if epoch is None or not self.augmentations:
            return self._inputs(index), targets
        # Seed the CPU generator per sample and restore it after (cheaper than fork_rng).
        generator = torch.default_generator
        saved = generator.get_state()
        generator.manual_seed(sample_seed(self.seed, epoch, index))
        try:
            return self._inputs(index), targets
        finally:
            generator.set_state(saved)

    def _inputs(self, index: int) -> tuple[torch.Tensor, ...]:
        if self.examples.kind == "tensor":
            inputs = [t[index] for t in self.examples.inputs]
            if inputs[0].is_floating_point():
                for _stage, transform in self.augmentations:
                    inputs[0] = transform(inputs[0])
            return tuple(inputs)
        pixels = self._pixels[index] if self._pixels is not None else image_to_uint8(self._image(index), self.spec)
        for stage, transform in self.augmentations:
            if stage == "uint8":
                pixels = transform(pixels)
        tensor = normalise(pixels, self.spec)
        for stage, transform in self.augmentations:
            if stage == "float":
                tensor = transform(tensor)
        return (tensor,)

    def _image(self, index: int) -> Image.Image:
        item = self.examples.inputs[index]
        if isinstance(item, Image.Image):
            return item
        try:
            with Image.open(item) as image:
                image.load()
                return image
        except Exception as err:
            raise DataError(f"unreadable image {item}: {err}") from None


class Collate:
    """Stacks samples into (inputs tuple, targets dict); tokenises text batches."""

    def __init__(self, tokenizer: Any = None, spec: InputSpec | None = None) -> None:
        self.tokenizer = tokenizer
        self.spec = spec

    def __call__(
        self, batch: list[tuple[Any, dict[str, torch.Tensor]]]
    ) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
        first = batch[0][0]
        if isinstance(first, str):
            assert self.spec is not None
            inputs: tuple[torch.Tensor, ...] = texts_to_batch([b[0] for b in batch], self.tokenizer, self.spec)
        else:
            inputs = tuple(torch.stack(parts) for parts in zip(*(b[0] for b in batch), strict=True))
        targets = {name: torch.stack([b[1][name] for b in batch]) for name in batch[0][1]}
        return inputs, targets


# --------------------------------------------------------------------------- order


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of (epoch, index) keys whose order is a pure function of (seed, epoch).

    `set_epoch(epoch, skip=n)` starts the epoch at batch n: this is how a run resumed mid-epoch
    continues with exactly the batches the uninterrupted run would have used. Under
    torch.distributed each rank takes its own shard of every epoch's permutation.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        *,
        shuffle: bool,
        drop_last: bool,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.size = size
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch = epoch
        self.skip = skip

    def order(self, epoch: int) -> list[int]:
        if self.shuffle:
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63 - 1))
            indices = torch.randperm(self.size, generator=gen).tolist()
        else:
            indices = list(range(self.size))
        if self.world_size > 1:
            per_rank = math.ceil(self.size / self.world_size)
            indices = (indices * 2)[: per_rank * self.world_size]
            indices = indices[self.rank :: self.world_size]
        return indices

    @property
    def batches_per_epoch(self) -> int:
        n = math.ceil(self.size / self.world_size)
        if self.drop_last or self._lone_last(n):
            return n // self.batch_size
        return math.ceil(n / self.batch_size)

    def _lone_last(self, n: int) -> bool:
        """A last batch of one sample joins the batch before it: BatchNorm cannot train on one."""
        return n > self.batch_size and n % self.batch_size == 1

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.skip)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        indices = self.order(self.epoch)
        batches = self.batches_per_epoch
        for b in range(self.skip, batches):
            end = len(indices) if b == batches - 1 and self._lone_last(len(indices)) else (b + 1) * self.batch_size
            yield [(self.epoch, i) for i in indices[b * self.batch_size : end]]


# --------------------------------------------------------------------------- loaders


@dataclass
class TrainingData:
    """What `fit` iterates: loaders, the sampler that owns the data order, and discovered classes."""

    train: DataLoader
    val: DataLoader
    sampler: EpochBatchSampler
    class_names: dict[str, list[str]]
    kind: str
    num_train: int
    num_val: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # unreadable files left out: (file, why)


def auto_num_workers(setting: str | int, device: torch.device) -> int:
    """`auto`: 4 per GPU, capped by the CPU count; 0 on CPU (the main process is the fastest there)."""
    if setting != "auto":
        return int(setting)
    if device.type != "cuda":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4 * max(1, torch.cuda.device_count()), cpus - 1))


def load_examples(recipe: Recipe, model: Any) -> tuple[Examples, Examples]:
    """The recipe's training and validation examples (after `limit_train`/`limit_val`), as
    training sees them; bad data is a DataError here."""
    data = recipe.data
    if data is None:
        raise DataError("the recipe has no `data:` section; `surgery build` needs training data")
    train, val = DATA_SOURCES.get(data.source)(recipe, model)
    if data.limit_train:
        train = train.subset(range(min(data.limit_train, len(train))))
    if data.limit_val:
        val = val.subset(range(min(data.limit_val, len(val))))
    if len(train) == 0 or len(val) == 0:
        raise DataError(
            f"data source {data.source!r} gave {len(train)} training and {len(val)} validation samples; both need at least one"
        )
    return train, val


def load_data(recipe: Recipe, model: Any, placement: SingleDevice) -> TrainingData:
    """Build train/val loaders for the recipe's data and the built model, for this process's
    `placement` (its device, and its rank's shard of each epoch); bad data is a DataError here."""
    train, val = load_examples(recipe, model)
    data = recipe.data
    assert data is not None
    spec: InputSpec = model.input_spec
    augmentations = build_augmentations(data.augment, spec)
    rank, world_size, device = placement.rank, placement.world_size, placement.device
    sampler = EpochBatchSampler(
        len(train),
        data.batch_size,
        shuffle=data.shuffle,
        drop_last=data.drop_last,
        seed=recipe.train.seed,
        rank=rank,
        world_size=world_size,
    )
    workers = auto_num_workers(data.num_workers, device)
    pin = device.type == "cuda" if data.pin_memory == "auto" else bool(data.pin_memory)
    collate = Collate(model.tokenizer, spec)
    common: dict[str, Any] = {
        "num_workers": workers,
        "pin_memory": pin,
        "collate_fn": collate,
        "persistent_workers": False,
        # A private generator: creating an iterator must not consume the global RNG.
        "generator": torch.Generator().manual_seed(recipe.train.seed),
    }
    train_loader = DataLoader(
        ExampleDataset(train, spec, augmentations, recipe.train.seed), batch_sampler=sampler, **common
    )
    val_loader = DataLoader(
        ExampleDataset(val, spec), batch_size=data.eval_batch_size or data.batch_size, shuffle=False, **common
    )
    names = {**train.class_names, **val.class_names}
    skipped = list(dict.fromkeys([*train.skipped, *val.skipped]))
    return TrainingData(train_loader, val_loader, sampler, names, train.kind, len(train), len(val), skipped)
