"""Heads: allowlisted layers with inferred input sizes, initialisation, losses, and head metadata.

A layer builder takes its recipe params and the shape of what feeds it (batch first) and returns
a module; the head is built layer by layer, running each new layer on a small zero tensor to learn
the shape the next one sees. So `in_features`/`in_channels` are never written in a recipe.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from surgery.errors import BuildError, DataError
from surgery.registry import LAYERS, LOSSES
from surgery.schema import Head, LayerSpec, Recipe

Shape = tuple[int, ...]

# --------------------------------------------------------------------------- layers


def _need_rank(kind: str, shape: Shape, ranks: tuple[int, ...]) -> None:
    if len(shape) not in ranks:
        want = " or ".join(f"{r}-d" for r in ranks)
        raise BuildError(
            f"layer {kind!r} needs a {want} input (batch first), but gets shape {list(shape)}; add `avgpool` or `flatten` before it"
        )


@LAYERS.implements("linear")
def _linear(params: Any, shape: Shape) -> nn.Module:
    _need_rank("linear", shape, (2, 3))
    return nn.Linear(shape[-1], params.out_features, bias=params.bias)


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


@LAYERS.implements("mlp")
def _mlp(params: Any, shape: Shape) -> nn.Module:
    _need_rank("mlp", shape, (2, 3))
    layers: list[nn.Module] = []
    width = shape[-1]
    for hidden in params.hidden:
        layers.append(nn.Linear(width, hidden))
        if params.norm == "layernorm":
            layers.append(nn.LayerNorm(hidden))
        elif params.norm == "batchnorm":
            _need_rank("mlp with batchnorm", shape, (2,))
            layers.append(nn.BatchNorm1d(hidden))
        layers.append(_ACTIVATIONS[params.activation]())
        if params.dropout:
            layers.append(nn.Dropout(params.dropout))
        width = hidden
    layers.append(nn.Linear(width, params.out_features))
    return nn.Sequential(*layers)


@LAYERS.implements("dropout")
def _dropout(params: Any, shape: Shape) -> nn.Module:
    return nn.Dropout(params.p)


@LAYERS.implements("layernorm")
def _layernorm(params: Any, shape: Shape) -> nn.Module:
    return nn.LayerNorm(shape[-1], eps=params.eps)


@LAYERS.implements("batchnorm")
def _batchnorm(params: Any, shape: Shape) -> nn.Module:
    _need_rank("batchnorm", shape, (2, 4))
    cls = nn.BatchNorm1d if len(shape) == 2 else nn.BatchNorm2d
    return cls(shape[1], eps=params.eps)


def _simple(kind: str, make: Callable[[], nn.Module]) -> None:
    LAYERS.implements(kind)(lambda params, shape: make())


for _kind, _make in {**_ACTIVATIONS, "sigmoid": nn.Sigmoid, "identity": nn.Identity}.items():
    _simple(_kind, _make)


@LAYERS.implements("conv1x1")
def _conv1x1(params: Any, shape: Shape) -> nn.Module:
    _need_rank("conv1x1", shape, (4,))
    return nn.Conv2d(shape[1], params.out_channels, kernel_size=1, bias=params.bias)


class GlobalPool(nn.Module):
    """Global average/max pooling: a feature map [B,C,H,W] or a sequence [B,T,C] to [B,C]."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how

    def forward(self, x: Tensor) -> Tensor:
        dims = (2, 3) if x.dim() == 4 else (1,)
        return x.mean(dims) if self.how == "avg" else x.amax(dims)

    def extra_repr(self) -> str:
        return self.how


@LAYERS.implements("avgpool")
def _avgpool(params: Any, shape: Shape) -> nn.Module:
    _need_rank("avgpool", shape, (3, 4))
    return GlobalPool("avg")


@LAYERS.implements("maxpool")
def _maxpool(params: Any, shape: Shape) -> nn.Module:
    _need_rank("maxpool", shape, (3, 4))
    return GlobalPool("max")


@LAYERS.implements("flatten")
def _flatten(params: Any, shape: Shape) -> nn.Module:
    return nn.Flatten(1)


def build_layer(spec: LayerSpec, shape: Shape) -> nn.Module:
    """One allowlisted layer for an input of `shape` (batch first)."""
    return LAYERS.get(spec.kind)(spec.params, shape)


def output_shape(module: nn.Module, shape: Shape) -> Shape:
    """The shape `module` gives for an input of `shape` (run on zeros, eval mode, batch of 2)."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            return tuple(module(torch.zeros((2, *shape[1:]))).shape)
    finally:
        module.train(was_training)


def build_head(head: Head, shape: Shape) -> nn.Sequential:
    """A head's layers in order, each sized for what feeds it; then initialised as the recipe says."""
    layers: list[nn.Module] = []
    for i, spec in enumerate(head.layers):
        try:
            layer = build_layer(spec, shape)
        except BuildError as exc:
            raise BuildError(f"heads.{head.name}.layers[{i}]: {exc}") from None
        shape = output_shape(layer, shape)
        layers.append(layer)
    module = nn.Sequential(*layers)
    init_head(module, head.init)
    return module


_INITS: dict[str, Callable[[Tensor], Any]] = {
    "zeros": nn.init.zeros_,
    "xavier_uniform": nn.init.xavier_uniform_,
    "kaiming_normal": lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"),
    "trunc_normal": lambda w: nn.init.trunc_normal_(w, std=0.02),
}


def init_head(module: nn.Module, how: str) -> None:
    """`default` keeps PyTorch's init; the others set Linear/Conv weights and zero their biases."""
    if how == "default":
        return
    for layer in module.modules():
        if isinstance(layer, nn.Linear | nn.Conv2d):
            _INITS[how](layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


# --------------------------------------------------------------------------- head info


def task_of(loss: str, out_features: int) -> str:
    """The task a loss implies: cross_entropy → multiclass, bce_with_logits → binary (1 output)
    or multilabel, the regression losses → regression."""
    if loss == "cross_entropy":
        return "multiclass"
    if loss == "bce_with_logits":
        return "binary" if out_features == 1 else "multilabel"
    return "regression"


Task = Literal["multiclass", "binary", "multilabel", "regression"]


@dataclass(frozen=True)
class HeadInfo:
    """What a head outputs, in the user's terms: carried on the built model
    (`SurgicalModel.head_info`), read by data loading, metrics and export (a bundle manifest's
    `heads` entries are `to_dict()` plus the name and the exported shape), printed by `plan`."""

    task: Task
    out_features: int
    output_shape: tuple[int, ...]  # one sample's output (no batch dimension)
    labels: tuple[str, ...] | None = None  # class names in output order, when known

    def with_labels(self, labels: Sequence[str]) -> HeadInfo:
        """The same head, with class names (from the data when the recipe gave none)."""
        return dataclasses.replace(self, labels=tuple(str(label) for label in labels))

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "labels": list(self.labels) if self.labels is not None else None,
            "out_features": self.out_features,
            "output_shape": list(self.output_shape),
        }


def head_info(head: Head, out_shape: Shape) -> HeadInfo:
    out_features = int(out_shape[-1]) if len(out_shape) > 1 else 1
    task = task_of(head.loss.name, out_features)
    if head.labels is not None and task in ("multiclass", "multilabel") and len(head.labels) != out_features:
        raise BuildError(
            f"heads.{head.name}.labels has {len(head.labels)} names but the head outputs {out_features} values"
        )
    if task == "multiclass" and out_features < 2:
        raise BuildError(
            f"head {head.name!r}: cross_entropy needs at least 2 outputs, the head has {out_features}; use bce_with_logits for one output"
        )
    labels = tuple(head.labels) if head.labels is not None else None
    return HeadInfo(task, out_features, tuple(int(n) for n in out_shape[1:]), labels)


# --------------------------------------------------------------------------- losses

LossFn = Callable[[Tensor, Tensor], Tensor]


@LOSSES.implements("cross_entropy")
def _cross_entropy(label_smoothing: float = 0.0) -> LossFn:
    def loss(output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output, target.long().view(-1), label_smoothing=label_smoothing)

    return loss


def _like_output(output: Tensor, target: Tensor) -> Tensor:
    target = target.to(output.dtype)
    if target.shape != output.shape and target.numel() == output.numel():
        target = target.reshape(output.shape)
    return target


@LOSSES.implements("bce_with_logits")
def _bce(label_smoothing: float = 0.0) -> LossFn:
    return lambda output, target: F.binary_cross_entropy_with_logits(output, _like_output(output, target))


@LOSSES.implements("mse")
def _mse(label_smoothing: float = 0.0) -> LossFn:
    return lambda output, target: F.mse_loss(output, _like_output(output, target))


@LOSSES.implements("l1")
def _l1(label_smoothing: float = 0.0) -> LossFn:
    return lambda output, target: F.l1_loss(output, _like_output(output, target))


@LOSSES.implements("smooth_l1")
def _smooth_l1(label_smoothing: float = 0.0) -> LossFn:
    return lambda output, target: F.smooth_l1_loss(output, _like_output(output, target))


def build_loss(head: Head) -> LossFn:
    return LOSSES.get(head.loss.name)(label_smoothing=head.loss.label_smoothing)


def compute_losses(
    model: nn.Module, outputs: dict[str, Tensor], targets: dict[str, Tensor], recipe: Recipe
) -> tuple[Tensor, dict[str, Tensor]]:
    """The weighted total loss and each head's loss. `targets` is keyed by head name."""
    per_head: dict[str, Tensor] = {}
    total: Tensor | None = None
    for head in recipe.heads:
        if head.name not in targets:
            raise DataError(f"no targets for head {head.name!r} (got targets for: {', '.join(targets) or 'nothing'})")
        loss = build_loss(head)(outputs[head.name], targets[head.name].to(outputs[head.name].device))
        per_head[head.name] = loss
        weighted = loss * head.loss.weight
        total = weighted if total is None else total + weighted
    assert total is not None  # a recipe has at least one head
    return total, per_head
