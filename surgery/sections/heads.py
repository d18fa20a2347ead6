"""`heads:`: a tap on the backbone, a stack of layers, a loss and metrics each."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from surgery.registry import LOSSES, METRICS
from surgery.sections.base import IDENT_PATTERN, LossName, MetricName, Probability, Strict
from surgery.sections.layers import LayerSpec


class LossSpec(Strict):
    name: LossName = Field(description="Loss function: " + LOSSES.describe())
    weight: float = Field(1.0, ge=0, description="Weight of this head's loss in the total.")
    label_smoothing: Probability = Field(0.0, description="Label smoothing (cross_entropy only).")

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data


class Head(Strict):
    """A named output: a tap on the backbone, a stack of layers, a loss and metrics."""

    name: Annotated[str, Field(pattern=IDENT_PATTERN)] = Field(
        description="Head name; its parameters are `heads.<name>.*`."
    )
    input: Literal["logits", "pooled", "tokens", "features"] = Field(
        "pooled",
        description="What the head reads: `logits` (the backbone's own output, classifier included), `pooled` (features before the classifier), `tokens` (transformer sequence output, pooled by `pool`), `features` (a multi-scale feature map, chosen by `feature_index`).",
    )
    pool: Literal["cls", "mean", "none"] = Field(
        "mean",
        description="For `input: tokens`: take the CLS token, mean over the attention mask, or keep the sequence (`none`).",
    )
    feature_index: Annotated[int, Field(ge=-1024, le=1024)] = Field(
        -1,
        description="For `input: features`: which feature map (timm `features_only` order; negative counts from the end).",
    )
    layers: list[LayerSpec] = Field(min_length=1, description="Layers applied in order to the tap.")
    loss: LossSpec = Field(description="Training loss: a name, or `{name, weight, label_smoothing}`.")
    metrics: list[MetricName] = Field(default_factory=list, description="Validation metrics: " + METRICS.describe())
    labels: list[str] | None = Field(None, description="Class names, in output order (served with predictions).")
    target: str | Annotated[list[str], Field(min_length=1)] | None = Field(
        None,
        description="Column (data) that trains this head; default: `data.label_column`. A regression head may name one column per output.",
    )
    init: Literal["default", "zeros", "xavier_uniform", "kaiming_normal", "trunc_normal"] = Field(
        "default", description="Initialisation of the head's layers."
    )
