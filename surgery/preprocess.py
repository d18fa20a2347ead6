"""Turning raw inputs (PIL images, strings) into model tensors.

Training data loading and serving both call these functions, so a served PNG goes through exactly
the preprocessing the model was validated with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from surgery.errors import DataError
from surgery.inputs import InputSpec

_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
_INTERPOLATION = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}

ImageTransform = Callable[[Image.Image], torch.Tensor]


def image_mode(spec: InputSpec) -> str:
    """The PIL mode images are converted to before they become tensors."""
    try:
        return _MODES[spec.channels]
    except KeyError:
        raise DataError(f"images cannot be converted to {spec.channels} channels (supported: 1, 3, 4)") from None


# Greyscale modes wider than 8 bits: a 16-bit PNG opens as I;16 (older Pillow: I)
_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def in_mode(image: Image.Image, mode: str) -> Image.Image:
    """`image` converted to `mode`. Greyscale wider than 8 bits is scaled to 8 bits first
    (0..65535 → 0..255; a 32-bit `I` image is read as 16-bit): Pillow's own conversion clips,
    so every value above 255 would turn white."""
    if image.mode in _WIDE_GREY:
        import numpy as np

        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        image = Image.fromarray(((values + 128) // 257).astype(np.uint8))  # 2-D uint8: mode L
    return image if image.mode == mode else image.convert(mode)


def image_to_uint8(image: Image.Image, spec: InputSpec) -> torch.Tensor:
    """Convert mode, resize (crop_pct as timm does: resize larger, centre-crop) -> uint8 C×H×W."""
    image = in_mode(image, image_mode(spec))
    tensor = F.pil_to_tensor(image)
    height, width = spec.size
    interpolation = _INTERPOLATION.get(spec.interpolation, InterpolationMode.BILINEAR)
    if spec.crop_pct < 1.0:
        scaled = [int(height / spec.crop_pct), int(width / spec.crop_pct)]
        tensor = F.resize(tensor, scaled, interpolation=interpolation, antialias=True)
        return F.center_crop(tensor, [height, width])
    return F.resize(tensor, [height, width], interpolation=interpolation, antialias=True)


def normalise(tensor: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """uint8 C×H×W -> float, scaled to [0, 1] and normalised by the spec's mean/std."""
    image = tensor.to(torch.float32).div_(255.0)
    return F.normalize(image, mean=per_channel(spec.mean, spec.channels), std=per_channel(spec.std, spec.channels))


def per_channel(values: Sequence[float], channels: int) -> list[float]:
    """One value per channel: as given, or one value for every channel; any other length is an
    error (recipes and manifests refuse it first), never silently its first value."""
    if len(values) == channels:
        return list(values)
    if len(values) == 1:
        return list(values) * channels
    raise DataError(f"{len(values)} normalisation values for {channels} channels; give 1 or {channels}")


def image_eval_transform(spec: InputSpec) -> ImageTransform:
    """PIL image -> normalised float tensor C×H×W, as evaluation and serving see it."""
    image_mode(spec)  # fail early on an unsupported channel count

    def transform(image: Image.Image) -> torch.Tensor:
        return normalise(image_to_uint8(image, spec), spec)

    return transform


def images_to_batch(images: Sequence[Image.Image], spec: InputSpec) -> torch.Tensor:
    """A list of PIL images -> a float batch B×C×H×W."""
    transform = image_eval_transform(spec)
    return torch.stack([transform(image) for image in images])


def texts_to_batch(texts: Sequence[str], tokenizer: Any, spec: InputSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Strings -> (input_ids, attention_mask), int64 B×T, padded to the longest, cut at max_length."""
    if tokenizer is None:
        raise DataError("text inputs need the backbone's tokenizer, and this model has none")
    encoded = tokenizer(
        list(texts),
        padding=True,
        truncation=True,
        max_length=spec.max_length,
        return_tensors="pt",
    )
    return encoded["input_ids"].to(torch.int64), encoded["attention_mask"].to(torch.int64)
