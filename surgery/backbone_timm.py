"""The `timm` zoo: `timm.create_model` names, with `logits`, `pooled` and `features` taps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

from torch import Tensor, nn

from surgery.backbone_contract import (
    ZOO_VALUE_ERRORS,
    BuiltBackbone,
    Taps,
    classifier_keys,
    kwargs_error,
)
from surgery.backbone_hub import hf_endpoint, hf_offline_mode, host_reachable, hub_errors, is_offline, offline_error
from surgery.backbone_weights import check_weights_choice, load_local_weights
from surgery.errors import BuildError
from surgery.inputs import InputSpec
from surgery.registry import BACKBONE_SOURCES, did_you_mean
from surgery.schema import Backbone


class TimmTaps(Taps):
    kinds = ("logits", "pooled", "features")

    def prepare(self, backbone: nn.Module, wanted: set[str]) -> None:
        if "logits" not in wanted:
            backbone.reset_classifier(0)
        if "features" in wanted and not hasattr(backbone, "forward_intermediates"):
            raise BuildError(
                f"timm model {type(backbone).__name__} has no forward_intermediates, so no `features` tap; use `pooled`"
            )

    def __call__(self, backbone: nn.Module, inputs: tuple[Tensor, ...], wanted: set[str]) -> dict[str, Any]:
        (x,) = inputs
        out: dict[str, Any] = {}
        if "logits" in wanted or "pooled" in wanted:
            feats = backbone.forward_features(x)
            if "pooled" in wanted:
                out["pooled"] = backbone.forward_head(feats, pre_logits=True)
            if "logits" in wanted:
                out["logits"] = backbone.forward_head(feats)
        if "features" in wanted:
            out["features"] = backbone.forward_intermediates(x, intermediates_only=True)
        return out


@BACKBONE_SOURCES.implements("timm")
def build_timm(spec: Backbone, *, load_weights: bool) -> BuiltBackbone:
    import timm

    check_weights_choice(spec)
    if spec.name not in timm.list_models() and spec.name.split(".")[0] not in timm.list_models():
        raise BuildError(f"unknown timm model {spec.name!r}{did_you_mean(spec.name, timm.list_models())}")
    pretrained = spec.pretrained and load_weights and not spec.weights
    module = _create_timm(spec, pretrained)
    built = BuiltBackbone(
        module,
        TimmTaps(),
        timm_input_spec(module),
        classifier=classifier_keys(module, module.get_classifier()),
        fresh=lambda: _create_timm(spec, False),
    )
    if load_weights and spec.weights:
        load_local_weights(built, spec)
    return built


def _create_timm(spec: Backbone, pretrained: bool) -> nn.Module:
    import timm

    if not pretrained:
        return _timm_call(spec, lambda: timm.create_model(spec.name, pretrained=False, **spec.kwargs))
    if is_offline() or not host_reachable(hf_endpoint()):
        why = "offline mode" if is_offline() else f"{urlparse(hf_endpoint()).hostname} unreachable"
        with hf_offline_mode():
            try:
                return timm.create_model(spec.name, pretrained=True, **spec.kwargs)
            except ZOO_VALUE_ERRORS as exc:
                raise kwargs_error(spec, exc) from None
            except hub_errors():
                raise offline_error(spec, f"{why} and not in the local cache") from None
    try:
        return timm.create_model(spec.name, pretrained=True, **spec.kwargs)
    except ZOO_VALUE_ERRORS as exc:
        raise kwargs_error(spec, exc) from None
    except hub_errors() as exc:
        raise offline_error(spec, str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None


def _timm_call(spec: Backbone, create: Callable[[], nn.Module]) -> nn.Module:
    try:
        return create()
    except ZOO_VALUE_ERRORS as exc:
        raise kwargs_error(spec, exc) from None


def timm_input_spec(module: nn.Module) -> InputSpec:
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=module)
    channels, height, width = cfg["input_size"]
    return InputSpec(
        kind="image",
        channels=channels,
        size=(height, width),
        mean=tuple(float(m) for m in cfg["mean"]),
        std=tuple(float(s) for s in cfg["std"]),
        interpolation=str(cfg.get("interpolation", "bilinear")),
        crop_pct=float(cfg.get("crop_pct", 1.0)),
    )
