"""Heads: every allowlisted layer with inferred sizes, initialisation, losses and task inference."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from surgery.errors import BuildError, DataError
from surgery.heads import build_head, build_layer, compute_losses, head_info, output_shape, task_of
from surgery.registry import LAYERS
from surgery.schema import Head, LayerSpec, Recipe

# An input shape each layer accepts, and the output shape it must give.
LAYER_CASES: dict[str, tuple[Any, tuple[int, ...], tuple[int, ...]]] = {
    "linear": ({"linear": {"out_features": 7}}, (2, 12), (2, 7)),
    "mlp": ({"mlp": {"hidden": [16, 8], "out_features": 3, "norm": "layernorm", "dropout": 0.1}}, (2, 12), (2, 3)),
    "dropout": ({"dropout": {"p": 0.5}}, (2, 12), (2, 12)),
    "layernorm": ("layernorm", (2, 5, 12), (2, 5, 12)),
    "batchnorm": ("batchnorm", (2, 6, 4, 4), (2, 6, 4, 4)),
    "relu": ("relu", (2, 12), (2, 12)),
    "gelu": ("gelu", (2, 12), (2, 12)),
    "silu": ("silu", (2, 12), (2, 12)),
    "tanh": ("tanh", (2, 12), (2, 12)),
    "sigmoid": ("sigmoid", (2, 12), (2, 12)),
    "identity": ("identity", (2, 12), (2, 12)),
    "conv1x1": ({"conv1x1": {"out_channels": 5}}, (2, 6, 4, 4), (2, 5, 4, 4)),
    "avgpool": ("avgpool", (2, 6, 4, 4), (2, 6)),
    "maxpool": ("maxpool", (2, 5, 6), (2, 6)),
    "flatten": ("flatten", (2, 6, 4, 4), (2, 96)),
}


def test_every_layer_has_a_case() -> None:
    assert set(LAYER_CASES) == set(LAYERS.names)


@pytest.mark.parametrize("kind", sorted(LAYER_CASES))
def test_layer_infers_its_input_size(kind: str) -> None:
    spec, in_shape, out_shape = LAYER_CASES[kind]
    layer = build_layer(LayerSpec.model_validate(spec), in_shape)
    assert output_shape(layer, in_shape) == out_shape
    assert tuple(layer.eval()(torch.randn(in_shape)).shape) == out_shape


def test_batchnorm_follows_the_input_rank() -> None:
    assert isinstance(build_layer(LayerSpec.model_validate("batchnorm"), (2, 8)), nn.BatchNorm1d)
    assert isinstance(build_layer(LayerSpec.model_validate("batchnorm"), (2, 8, 3, 3)), nn.BatchNorm2d)


def test_pooling_reduces_feature_maps_and_sequences() -> None:
    x = torch.arange(24.0).reshape(1, 2, 3, 4)
    pool = build_layer(LayerSpec.model_validate("maxpool"), (1, 2, 3, 4))
    torch.testing.assert_close(pool(x), torch.tensor([[11.0, 23.0]]))


def make_head(layers: list[Any], loss: Any = "cross_entropy", **extra: Any) -> Head:
    return Head.model_validate({"name": "h", "layers": layers, "loss": loss, **extra})


def test_head_chains_inferred_sizes() -> None:
    module = build_head(
        make_head(["avgpool", {"linear": {"out_features": 10}}, "relu", {"linear": {"out_features": 4}}]), (1, 32, 5, 5)
    )
    assert module[1].in_features == 32 and module[3].in_features == 10
    assert module(torch.randn(3, 32, 5, 5)).shape == (3, 4)


def test_wrong_rank_names_the_layer_and_the_fix() -> None:
    with pytest.raises(BuildError, match=r"heads\.h\.layers\[0\].*avgpool"):
        build_head(make_head([{"linear": {"out_features": 2}}]), (1, 32, 5, 5))


@pytest.mark.parametrize("init", ["zeros", "xavier_uniform", "kaiming_normal", "trunc_normal"])
def test_init_options(init: str) -> None:
    torch.manual_seed(0)
    module = build_head(make_head([{"mlp": {"hidden": [256], "out_features": 256}}], init=init), (1, 256))
    weight, bias = module[0][0].weight, module[0][0].bias
    assert torch.count_nonzero(bias) == 0
    if init == "zeros":
        assert torch.count_nonzero(weight) == 0
    elif init == "trunc_normal":
        assert abs(weight.std().item() - 0.02) < 0.003
    elif init == "kaiming_normal":
        assert abs(weight.std().item() - (2 / 256) ** 0.5) < 0.01
    else:
        assert weight.abs().max().item() <= (6 / 512) ** 0.5 + 1e-6


def test_default_init_keeps_pytorch_init() -> None:
    module = build_head(make_head([{"linear": {"out_features": 4}}]), (1, 8))
    assert torch.count_nonzero(module[0].bias) > 0


@pytest.mark.parametrize(
    ("loss", "out", "task"),
    [
        ("cross_entropy", 5, "multiclass"),
        ("bce_with_logits", 1, "binary"),
        ("bce_with_logits", 4, "multilabel"),
        ("mse", 1, "regression"),
        ("l1", 2, "regression"),
        ("smooth_l1", 1, "regression"),
    ],
)
def test_task_follows_the_loss(loss: str, out: int, task: str) -> None:
    assert task_of(loss, out) == task
    info = head_info(make_head([{"linear": {"out_features": out}}], loss), (2, out))
    assert info["task"] == task and info["out_features"] == out


def test_labels_must_match_outputs() -> None:
    with pytest.raises(BuildError, match="labels has 2 names"):
        head_info(make_head([{"linear": {"out_features": 3}}], labels=["a", "b"]), (2, 3))


def test_cross_entropy_needs_two_outputs() -> None:
    with pytest.raises(BuildError, match="bce_with_logits"):
        head_info(make_head([{"linear": {"out_features": 1}}]), (2, 1))


def two_heads(**loss_a: Any) -> Recipe:
    return Recipe.model_validate(
        {
            "name": "t",
            "backbone": {"source": "timm", "name": "test_resnet", "pretrained": False},
            "heads": [
                {"name": "a", "layers": [{"linear": {"out_features": 3}}], "loss": {"name": "cross_entropy", **loss_a}},
                {
                    "name": "b",
                    "layers": [{"linear": {"out_features": 1}}],
                    "loss": {"name": "bce_with_logits", "weight": 0.5},
                },
            ],
        }
    )


def test_compute_losses_weights_and_label_smoothing() -> None:
    recipe = two_heads(label_smoothing=0.1, weight=2.0)
    outputs = {"a": torch.randn(4, 3), "b": torch.randn(4, 1)}
    targets = {"a": torch.tensor([0, 2, 1, 1]), "b": torch.tensor([1.0, 0.0, 1.0, 0.0])}
    total, per_head = compute_losses(nn.Identity(), outputs, targets, recipe)
    expected_a = F.cross_entropy(outputs["a"], targets["a"], label_smoothing=0.1)
    expected_b = F.binary_cross_entropy_with_logits(outputs["b"], targets["b"].view(4, 1))
    torch.testing.assert_close(per_head["a"], expected_a)
    torch.testing.assert_close(per_head["b"], expected_b)
    torch.testing.assert_close(total, 2.0 * expected_a + 0.5 * expected_b)


@pytest.mark.parametrize(("loss", "fn"), [("mse", F.mse_loss), ("l1", F.l1_loss), ("smooth_l1", F.smooth_l1_loss)])
def test_regression_losses_accept_flat_targets(loss: str, fn: Any) -> None:
    recipe = Recipe.model_validate(
        {
            "name": "t",
            "backbone": {"source": "timm", "name": "test_resnet", "pretrained": False},
            "heads": [{"name": "r", "layers": [{"linear": {"out_features": 1}}], "loss": loss}],
        }
    )
    output, target = torch.randn(5, 1), torch.randn(5)
    total, _ = compute_losses(nn.Identity(), {"r": output}, {"r": target}, recipe)
    torch.testing.assert_close(total, fn(output, target.view(5, 1)))


def test_missing_targets_name_the_head() -> None:
    with pytest.raises(DataError, match="no targets for head 'b'"):
        compute_losses(
            nn.Identity(), {"a": torch.randn(2, 3), "b": torch.randn(2, 1)}, {"a": torch.tensor([0, 1])}, two_heads()
        )
