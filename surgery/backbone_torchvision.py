"""The `torchvision` zoo: `torchvision.models.get_model` names, with `logits` and `pooled` taps."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from surgery.backbone_contract import (
    ZOO_VALUE_ERRORS,
    BuiltBackbone,
    Taps,
    classifier_keys,
    kwargs_error,
    set_submodule,
)
from surgery.backbone_hub import host_reachable, hub_errors, is_offline, offline_error
from surgery.backbone_weights import check_weights_choice, load_local_weights
from surgery.errors import BuildError
from surgery.inputs import InputSpec
from surgery.registry import BACKBONE_SOURCES, did_you_mean
from surgery.schema import Backbone


class _PooledLinear(nn.Linear):
    """The classifier's last Linear when heads read both `pooled` and `logits`: inside the zoo's
    forward it passes its input through (so the forward returns `pooled`), and the taps apply it
    afterwards for `logits`. Same parameters and names as the Linear it replaces; no state is
    stored during forward, so it traces and exports like any module."""

    def forward(self, x: Tensor) -> Tensor:
        return x

    def project(self, x: Tensor) -> Tensor:
        return super().forward(x)


class TorchvisionTaps(Taps):
    kinds = ("logits", "pooled")

    def __init__(self, classifier_name: str) -> None:
        self.classifier_name = classifier_name  # dotted name of the last Linear

    def prepare(self, backbone: nn.Module, wanted: set[str]) -> None:
        old = backbone.get_submodule(self.classifier_name)
        if "logits" not in wanted:
            set_submodule(backbone, self.classifier_name, nn.Identity())
        elif "pooled" in wanted:
            tap = _PooledLinear(old.in_features, old.out_features, bias=old.bias is not None)
            tap.load_state_dict(old.state_dict())
            set_submodule(backbone, self.classifier_name, tap)

    def __call__(self, backbone: nn.Module, inputs: tuple[Tensor, ...], wanted: set[str]) -> dict[str, Any]:
        (x,) = inputs
        y = backbone(x)
        if "logits" not in wanted:
            return {"pooled": y}
        tap = backbone.get_submodule(self.classifier_name)
        if isinstance(tap, _PooledLinear):
            return {"pooled": y, "logits": tap.project(y)}
        return {"logits": y}


def last_linear_name(module: nn.Module) -> str | None:
    names = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    return names[-1] if names else None


@BACKBONE_SOURCES.implements("torchvision")
def build_torchvision(spec: Backbone, *, load_weights: bool) -> BuiltBackbone:
    import torchvision

    check_weights_choice(spec)
    names = torchvision.models.list_models()
    if spec.name not in names:
        raise BuildError(f"unknown torchvision model {spec.name!r}{did_you_mean(spec.name, names)}")
    enum = torchvision.models.get_model_weights(spec.name)
    default = enum.DEFAULT if hasattr(enum, "DEFAULT") else next(iter(enum))
    weights = default if (spec.pretrained and load_weights and not spec.weights) else None
    if weights is not None:
        _check_torchvision_download(spec, weights)
    module = _torchvision_call(spec, lambda: torchvision.models.get_model(spec.name, weights=weights, **spec.kwargs))
    classifier = last_linear_name(module)
    if classifier is None:
        raise BuildError(
            f"torchvision model {spec.name!r} has no Linear classifier; surgery supports classification models"
        )
    taps = TorchvisionTaps(classifier)
    built = BuiltBackbone(
        module,
        taps,
        torchvision_input_spec(default),
        classifier=classifier_keys(module, module.get_submodule(classifier)),
        fresh=lambda: _torchvision_call(
            spec, lambda: torchvision.models.get_model(spec.name, weights=None, **spec.kwargs)
        ),
    )
    if load_weights and spec.weights:
        load_local_weights(built, spec)
    return built


def _torchvision_call(spec: Backbone, create: Callable[[], nn.Module]) -> nn.Module:
    try:
        return create()
    except ZOO_VALUE_ERRORS as exc:
        raise kwargs_error(spec, exc) from None
    except hub_errors() as exc:
        raise offline_error(spec, str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None


def _check_torchvision_download(spec: Backbone, weights: Any) -> None:
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)
    if cached.is_file():
        return
    if is_offline():
        raise offline_error(spec, "offline mode and not in the torch hub cache")
    if not host_reachable(weights.url):
        raise offline_error(spec, f"{urlparse(weights.url).hostname} unreachable and not in the torch hub cache")


def torchvision_input_spec(weights: Any) -> InputSpec:
    transforms = weights.transforms()
    crop = list(getattr(transforms, "crop_size", [224]))
    size = (crop[0], crop[-1])
    resize = list(getattr(transforms, "resize_size", crop))
    interpolation = getattr(transforms, "interpolation", None)
    return InputSpec(
        kind="image",
        channels=3,
        size=size,
        mean=tuple(float(m) for m in transforms.mean),
        std=tuple(float(s) for s in transforms.std),
        interpolation=str(getattr(interpolation, "value", "bilinear")),
        crop_pct=float(size[0]) / float(resize[0]) if resize else 1.0,
    )
