"""Augmentations from the `AUGMENTATIONS` registry, each a (stage, transform) pair.

They draw from torch's default generator, which `ExampleDataset` seeds per (seed, epoch, index).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchvision.transforms import v2

from surgery.inputs import InputSpec
from surgery.registry import AUGMENTATIONS
from surgery.schema import Augmentation

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
