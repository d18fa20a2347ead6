"""Examples -> model tensors with serving's preprocessing, augmentations seeded per sample; batching."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from surgery.data_augment import Stage
from surgery.data_columns import LazyImage
from surgery.data_examples import Examples
from surgery.errors import DataError
from surgery.inputs import InputSpec
from surgery.preprocess import image_mode, image_to_uint8, normalise, texts_to_batch


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
        return self._item(key, None)

    def __getitems__(self, keys: list[Any]) -> list[tuple[Any, dict[str, torch.Tensor]]]:
        """A batch (what DataLoader asks for): inputs read lazily (`fetch`, a memory-mapped
        dataset's rows) are read in one go; the same samples as `__getitem__` one by one."""
        inputs = self.examples.inputs[0] if self.examples.kind == "tensor" else self.examples.inputs
        fetch = getattr(inputs, "fetch", None)
        if fetch is None:
            return [self._item(key, None) for key in keys]
        raw = fetch([key[1] if isinstance(key, tuple) else key for key in keys])
        return [self._item(key, raw[i]) for i, key in enumerate(keys)]

    def _item(self, key: int | tuple[int, int], raw: Any) -> tuple[Any, dict[str, torch.Tensor]]:
        """One sample; `raw` is its input when the batch has read it already."""
        epoch, index = key if isinstance(key, tuple) else (None, key)
        targets = {name: t[index] for name, t in self.examples.targets.items()}
        if self.examples.kind == "text":
            return (self.examples.inputs[index] if raw is None else raw), targets
        if epoch is None or not self.augmentations:
            return self._inputs(index, raw), targets
        # Seed the CPU generator per sample and restore it after (cheaper than fork_rng).
        generator = torch.default_generator
        saved = generator.get_state()
        generator.manual_seed(sample_seed(self.seed, epoch, index))
        try:
            return self._inputs(index, raw), targets
        finally:
            generator.set_state(saved)

    def _inputs(self, index: int, raw: Any) -> tuple[torch.Tensor, ...]:
        if self.examples.kind == "tensor":
            inputs = [t[index] for t in self.examples.inputs] if raw is None else [raw]
            if inputs[0].is_floating_point():
                for _stage, transform in self.augmentations:
                    inputs[0] = transform(inputs[0])
            return tuple(inputs)
        if self._pixels is not None:
            pixels = self._pixels[index]
        else:
            pixels = image_to_uint8(self._image(self.examples.inputs[index] if raw is None else raw), self.spec)
        for stage, transform in self.augmentations:
            if stage == "uint8":
                pixels = transform(pixels)
        tensor = normalise(pixels, self.spec)
        for stage, transform in self.augmentations:
            if stage == "float":
                tensor = transform(tensor)
        return (tensor,)

    def _image(self, item: Any) -> Image.Image:
        if isinstance(item, LazyImage):  # a row of a memory-mapped `datasets` Image column
            item = item.load()
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
