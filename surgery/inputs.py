"""What a model takes as input: carried on the built model, written into bundle manifests, read
by data loading and serving. Plain data, no torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

InputKind = Literal["image", "text", "vector"]

MAX_IMAGE_PIXELS = 40_000_000  # an image over this is refused before it is decoded (a decompression bomb)


@dataclass
class InputSpec:
    """Input of a `SurgicalModel`.

    image: `channels`×`size` float tensor, normalised with `mean`/`std` (from the backbone's
    pretrained config unless the recipe's `input:` overrides them).
    text: token ids + attention mask from `tokenizer` (a folder or hub id), `max_length` tokens.
    vector: a float vector of `features` numbers.
    """

    kind: InputKind
    channels: int = 3
    size: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    tokenizer: str | None = None
    max_length: int = 128
    features: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def input_names(self) -> tuple[str, ...]:
        """Positional inputs of the model's forward (and of exported graphs), in order."""
        return {"image": ("pixel_values",), "text": ("input_ids", "attention_mask"), "vector": ("features",)}[self.kind]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["size"] = list(self.size)
        data["mean"] = list(self.mean)
        data["std"] = list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputSpec:
        data = dict(data)
        data["size"] = tuple(data.get("size", (224, 224)))
        data["mean"] = tuple(data.get("mean", ()))
        data["std"] = tuple(data.get("std", ()))
        return cls(**data)
