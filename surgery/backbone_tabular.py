"""The `tabular` zoo: a feature-vector input (`data.feature_columns`) through per-column
normalisation and an MLP trunk, with a `pooled` tap.

The normalisation is part of the model, as buffers (`backbone.mean`, `backbone.std`): fitted on the
training split when the data is loaded (`fit_input`), saved with the weights in checkpoints and the
bundle, and exported into ONNX, so serving takes the raw feature values the table held.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from surgery.backbone_contract import BuiltBackbone, Taps
from surgery.backbone_weights import load_local_weights
from surgery.errors import BuildError
from surgery.inputs import InputSpec
from surgery.registry import BACKBONE_SOURCES
from surgery.schema import Backbone

TABULAR_MODELS = ("mlp",)
_KWARGS = ("features", "hidden", "dropout")


class TabularMLP(nn.Module):
    """(x - mean) / std, then Linear → LayerNorm → GELU → Dropout per hidden width."""

    def __init__(self, features: int, hidden: list[int], dropout: float) -> None:
        super().__init__()
        self.features = features
        self.num_features = hidden[-1] if hidden else features
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("std", torch.ones(features))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.uint8))
        layers: list[nn.Module] = []
        width = features
        for out in hidden:
            layers += [nn.Linear(width, out), nn.LayerNorm(out), nn.GELU(), nn.Dropout(dropout)]
            width = out
        self.trunk = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.trunk((x - self.mean) / self.std)

    def fit_input(self, examples: Any) -> None:
        """Per-column mean and std of the training split's features (once: weights loaded from a
        file, a checkpoint or a bundle keep their own)."""
        if int(self.fitted) or examples.kind != "tensor" or len(examples) == 0:
            return
        mean, std = feature_moments(examples.inputs[0])
        std = std if len(examples) > 1 else torch.ones_like(std)
        self.mean.copy_(mean.to(self.mean.dtype))
        self.std.copy_(torch.where(std > 1e-8, std, torch.ones_like(std)).to(self.std.dtype))
        self.fitted.fill_(1)


class TabularTaps(Taps):
    kinds = ("pooled",)

    def __call__(self, backbone: nn.Module, inputs: tuple[Tensor, ...], wanted: set[str]) -> dict[str, Any]:
        (x,) = inputs
        return {"pooled": backbone(x)}


def _options(spec: Backbone) -> tuple[int, list[int], float]:
    unknown = sorted(set(spec.kwargs) - set(_KWARGS))
    if unknown:
        raise BuildError(f"tabular backbone kwargs {', '.join(unknown)} unknown; it takes {', '.join(_KWARGS)}")
    features = spec.kwargs.get("features")
    if not isinstance(features, int) or isinstance(features, bool) or features < 1:
        raise BuildError("the tabular backbone needs `kwargs.features`: the number of data.feature_columns")
    hidden = spec.kwargs.get("hidden", [64, 64])
    if isinstance(hidden, int) and not isinstance(hidden, bool):
        hidden = [hidden]
    if not isinstance(hidden, list) or not all(isinstance(h, int) and h > 0 for h in hidden):
        raise BuildError(f"tabular backbone kwargs.hidden must be a list of positive widths, got {hidden!r}")
    dropout = spec.kwargs.get("dropout", 0.0)
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise BuildError(f"tabular backbone kwargs.dropout must be in [0, 1), got {dropout!r}")
    return features, [int(h) for h in hidden], float(dropout)


@BACKBONE_SOURCES.implements("tabular")
def build_tabular(spec: Backbone, *, load_weights: bool) -> BuiltBackbone:
    if spec.name not in TABULAR_MODELS:
        raise BuildError(f"unknown tabular model {spec.name!r}; known: {', '.join(TABULAR_MODELS)}")
    if spec.pretrained and not spec.weights:
        raise BuildError(
            "the tabular backbone has no pretrained weights: set `backbone.pretrained: false` (or `weights:`)"
        )
    features, hidden, dropout = _options(spec)

    def make() -> nn.Module:
        return TabularMLP(features, hidden, dropout)

    built = BuiltBackbone(make(), TabularTaps(), InputSpec(kind="vector", features=features), fresh=make)
    if load_weights and spec.weights:
        load_local_weights(built, spec)
    return built


def feature_moments(features: Any, chunk: int = 65_536) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column mean and population std (float64) of a (rows, features) tensor, or of a column
    read on access (`surgery.data_hf.ArrowRows.chunks`): two passes a chunk at a time, so the
    statistics of a split bigger than memory never hold it."""

    def chunks() -> Any:
        if isinstance(features, torch.Tensor):
            return (features[i : i + chunk] for i in range(0, len(features), chunk))
        return features.chunks(chunk)

    rows, total = 0, torch.zeros(0, dtype=torch.float64)
    for x in chunks():
        part = x.to(torch.float64).sum(0)
        total = part if rows == 0 else total + part
        rows += len(x)
    mean = total / max(rows, 1)
    squares = torch.zeros_like(mean)
    for x in chunks():
        squares += (x.to(torch.float64) - mean).square().sum(0)
    return mean, (squares / max(rows, 1)).sqrt()
