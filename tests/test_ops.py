"""Module surgery: every op on tiny models, and unknown names with close matches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from surgery.errors import BuildError
from surgery.heads import GlobalPool
from surgery.model import build_model
from surgery.ops import has_lora, merge_lora
from surgery.schema import Recipe

TIMM = {"source": "timm", "name": "test_resnet", "pretrained": False}
POOLED = [{"name": "out", "input": "pooled", "layers": [{"linear": {"out_features": 3}}], "loss": "cross_entropy"}]


def recipe(
    surgery: list[Any], heads: list[dict[str, Any]] | None = None, backbone: dict[str, Any] | None = None, **extra: Any
) -> Recipe:
    return Recipe.model_validate(
        {"name": "t", "backbone": backbone or TIMM, "surgery": surgery, "heads": heads or POOLED, **extra}
    )


def test_replace_puts_an_allowlisted_layer_sized_for_its_input() -> None:
    logits = [
        {"name": "out", "input": "logits", "layers": ["relu", {"linear": {"out_features": 2}}], "loss": "cross_entropy"}
    ]
    model = build_model(recipe([{"replace": {"module": "fc", "layer": {"linear": {"out_features": 7}}}}], logits))
    assert isinstance(model.backbone.fc, nn.Linear) and (
        model.backbone.fc.in_features,
        model.backbone.fc.out_features,
    ) == (96, 7)
    assert model.heads["out"][1].in_features == 7
    model = build_model(recipe([{"replace": {"module": "global_pool", "layer": "maxpool"}}]))
    assert isinstance(model.backbone.global_pool, GlobalPool)
    assert model(*model.example_inputs(2))["out"].shape == (2, 3)


def test_remove_puts_identity() -> None:
    model = build_model(recipe([{"remove": "layer4"}]))
    assert isinstance(model.backbone.layer4, nn.Identity)
    assert model.heads["out"][0].in_features == 192  # layer3's channels now reach the pool


def test_truncate_after_a_module_cuts_everything_later() -> None:
    heads = [
        {
            "name": "out",
            "input": "logits",
            "layers": ["avgpool", {"linear": {"out_features": 3}}],
            "loss": "cross_entropy",
        }
    ]
    model = build_model(recipe([{"truncate": "layer2"}], heads))
    for name in ("layer3", "layer4", "global_pool", "fc"):
        assert isinstance(getattr(model.backbone, name), nn.Identity), name
    assert not isinstance(model.backbone.layer2, nn.Identity)
    logits = model.taps(*model.example_inputs(2))["logits"]
    assert logits.shape[:2] == (2, 48) and logits.dim() == 4
    assert model.heads["out"][1].in_features == 48


def test_truncate_inside_a_stage_keeps_its_ancestors() -> None:
    heads = [
        {
            "name": "out",
            "input": "logits",
            "layers": ["avgpool", {"linear": {"out_features": 3}}],
            "loss": "cross_entropy",
        }
    ]
    model = build_model(recipe([{"truncate": "layer1.0"}], heads))
    assert not isinstance(model.backbone.layer1, nn.Identity)
    assert isinstance(model.backbone.layer2, nn.Identity)


def test_input_channels_adapts_the_first_conv_like_timm(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(5)
    state = timm.create_model("test_resnet").state_dict()
    save_file(state, str(tmp_path / "w.safetensors"))
    first = next(k for k in state if k.endswith("weight") and state[k].dim() == 4)
    backbone = TIMM | {"pretrained": True, "weights": str(tmp_path / "w.safetensors")}
    gray = build_model(recipe([{"input_channels": 1}], backbone=backbone))
    weight = gray.backbone.state_dict()[first]
    torch.testing.assert_close(weight, state[first].sum(1, keepdim=True))
    assert gray.input_spec.channels == 1 and len(gray.input_spec.mean) == 1
    assert gray(*gray.example_inputs(2))["out"].shape == (2, 3)
    five = build_model(recipe([{"input_channels": 5}], backbone=backbone))
    assert five.backbone.state_dict()[first].shape[1] == 5 and len(five.input_spec.std) == 5


def test_input_channels_on_torchvision() -> None:
    model = build_model(
        recipe([{"input_channels": 4}], backbone={"source": "torchvision", "name": "resnet18", "pretrained": False})
    )
    assert model.backbone.conv1.in_channels == 4
    assert model.example_inputs(1)[0].shape == (1, 4, 224, 224)


def test_reinit_resets_only_that_module() -> None:
    base = build_model(recipe([]))
    fresh = build_model(recipe([{"reinit": "layer4"}]))
    a, b = base.state_dict(), fresh.state_dict()
    assert not torch.equal(a["backbone.layer4.0.conv1.weight"], b["backbone.layer4.0.conv1.weight"])
    torch.testing.assert_close(a["backbone.layer1.0.conv1.weight"], b["backbone.layer1.0.conv1.weight"])


@pytest.mark.parametrize(
    "op",
    [
        {"remove": "layer5"},
        {"truncate": "layr4"},
        {"reinit": "layer4.9"},
        {"replace": {"module": "fcc", "layer": "identity"}},
    ],
)
def test_unknown_module_lists_close_matches(op: dict[str, Any]) -> None:
    with pytest.raises(BuildError, match=r"surgery\[0\].*no module .*did you mean"):
        build_model(recipe([op]))


def test_lora_adapters_train_alone_and_merge_back(tiny_bert: Path) -> None:
    heads = [
        {
            "name": "t",
            "input": "tokens",
            "pool": "cls",
            "layers": [{"linear": {"out_features": 2}}],
            "loss": "cross_entropy",
        }
    ]
    op = {"lora": {"targets": ["encoder.layer.*.attention.self.query", "encoder.layer.*.attention.self.value"], "r": 4}}
    model = build_model(
        recipe([op], heads, backbone={"source": "transformers", "name": str(tiny_bert), "pretrained": True})
    )
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".lora_A." in n for n in names) and any(".lora_B." in n for n in names)
    assert {n for n in names if n.startswith("backbone.")} == {n for n in names if ".lora_" in n}
    assert len([n for n in names if ".lora_A." in n]) == 4  # 2 layers × query/value
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_()  # a trained adapter
    model.eval()
    inputs = model.example_inputs(2, seq_len=6)
    with torch.no_grad():
        before = model(*inputs)["t"]
        merged = merge_lora(model)
        after = merged(*inputs)["t"]
    assert not has_lora(merged)
    torch.testing.assert_close(before, after, atol=1e-5, rtol=1e-5)
    assert "backbone.encoder.layer.0.attention.self.query.weight" in dict(merged.named_parameters())


def test_lora_target_that_matches_nothing(tiny_bert: Path) -> None:
    heads = [{"name": "t", "input": "tokens", "layers": [{"linear": {"out_features": 2}}], "loss": "mse"}]
    with pytest.raises(BuildError, match="matches no Linear/Conv module"):
        build_model(
            recipe(
                [{"lora": {"targets": ["encoder.layer.*.attention.self.kwery"]}}],
                heads,
                backbone={"source": "transformers", "name": str(tiny_bert)},
            )
        )


def test_ops_apply_in_order() -> None:
    model = build_model(
        recipe([{"remove": "layer4"}, {"replace": {"module": "layer4", "layer": {"conv1x1": {"out_channels": 20}}}}])
    )
    assert isinstance(model.backbone.layer4, nn.Conv2d) and model.backbone.layer4.in_channels == 192
    assert model.heads["out"][0].in_features == 20
