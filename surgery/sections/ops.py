"""`surgery:`: the module operations applied to the backbone, in order."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from surgery.sections.base import OneOf, ParamGlob, Probability, Strict, Width
from surgery.sections.layers import LayerSpec


class ReplaceOp(Strict):
    module: str = Field(
        min_length=1,
        description="Dotted module name inside the backbone (as `surgery plan` prints it, without `backbone.`).",
    )
    layer: LayerSpec = Field(description="The allowlisted layer put in its place.")


class LoraOp(Strict):
    targets: list[ParamGlob] = Field(
        min_length=1,
        description="Globs over backbone module names whose Linear/Conv layers get LoRA adapters (e.g. `encoder.layer.*.attention.self.query`).",
    )
    r: Width = Field(8, description="Rank of the adapter.")
    alpha: float = Field(16.0, gt=0, description="Scaling numerator (the update is scaled by alpha / r).")
    dropout: Probability = Field(0.0, description="Dropout on the adapter's input.")


class SurgeryOp(OneOf):
    """One module operation on the backbone, applied in order: `{remove: fc}`."""

    replace: ReplaceOp | None = Field(None, description="Put an allowlisted layer in place of a module.")
    remove: str | None = Field(None, description="Replace a module with Identity.")
    truncate: str | None = Field(
        None, description="Drop every module after this one (the backbone's output becomes this module's output)."
    )
    input_channels: Width | None = Field(
        None,
        description="Adapt the first convolution to N input channels, adapting its pretrained weights as timm does.",
    )
    reinit: str | None = Field(
        None,
        description="Re-initialise a module's parameters (discard pretrained weights there) with the model's own initialisation (timm/torchvision: as a fresh model starts, e.g. timm's zero-initialised last BatchNorm of each residual block; otherwise PyTorch's `reset_parameters`).",
    )
    lora: LoraOp | None = Field(
        None, description="Add LoRA adapters (via peft) to the matched modules; they are merged on export."
    )

    @classmethod
    def _takes_params(cls, key: Any) -> bool:
        return key in ("replace", "lora")
