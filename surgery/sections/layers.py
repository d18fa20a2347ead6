"""The layers a head stacks (and a `replace` op puts in): one `LayerSpec` per `LAYERS` name."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from surgery.registry import LAYERS, Registry
from surgery.sections.base import OneOf, Probability, Strict, Width


class NoParams(Strict):
    """A layer with no settings (`- relu`, `- relu: {}`)."""


class LinearParams(Strict):
    out_features: Width = Field(description="Output size; `in_features` is inferred from what feeds the layer.")
    bias: bool = Field(True, description="Learn an additive bias.")


class MLPParams(Strict):
    hidden: list[Width] = Field(description="Sizes of the hidden layers, in order.")
    out_features: Width = Field(description="Output size of the last layer.")
    activation: Literal["relu", "gelu", "silu", "tanh"] = Field("gelu", description="Activation between layers.")
    norm: Literal["none", "layernorm", "batchnorm"] = Field(
        "none", description="Normalisation after each hidden layer."
    )
    dropout: Probability = Field(0.0, description="Dropout after each hidden activation.")


class DropoutParams(Strict):
    p: Probability = Field(0.1, description="Probability of zeroing an element during training.")


class NormParams(Strict):
    eps: float = Field(1e-5, gt=0, description="Added to the variance for numerical stability.")


class Conv1x1Params(Strict):
    out_channels: Width = Field(description="Output channels; `in_channels` is inferred.")
    bias: bool = Field(True, description="Learn an additive bias.")


class LayerSpec(OneOf):
    """One layer of a head (or the replacement in a `replace` op): `{linear: {out_features: 10}}`."""

    registry: ClassVar[Registry | None] = LAYERS

    linear: LinearParams | None = Field(None, description=LAYERS.docs["linear"])
    mlp: MLPParams | None = Field(None, description=LAYERS.docs["mlp"])
    dropout: DropoutParams | None = Field(None, description=LAYERS.docs["dropout"])
    layernorm: NormParams | None = Field(None, description=LAYERS.docs["layernorm"])
    batchnorm: NormParams | None = Field(None, description=LAYERS.docs["batchnorm"])
    relu: NoParams | None = Field(None, description=LAYERS.docs["relu"])
    gelu: NoParams | None = Field(None, description=LAYERS.docs["gelu"])
    silu: NoParams | None = Field(None, description=LAYERS.docs["silu"])
    tanh: NoParams | None = Field(None, description=LAYERS.docs["tanh"])
    sigmoid: NoParams | None = Field(None, description=LAYERS.docs["sigmoid"])
    identity: NoParams | None = Field(None, description=LAYERS.docs["identity"])
    conv1x1: Conv1x1Params | None = Field(None, description=LAYERS.docs["conv1x1"])
    avgpool: NoParams | None = Field(None, description=LAYERS.docs["avgpool"])
    maxpool: NoParams | None = Field(None, description=LAYERS.docs["maxpool"])
    flatten: NoParams | None = Field(None, description=LAYERS.docs["flatten"])


assert set(LayerSpec.model_fields) == set(LAYERS.names), "LayerSpec and the LAYERS registry disagree"
