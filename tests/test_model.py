"""SurgicalModel: stable names, reproducible builds, input spec overrides, multi-head forward."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from surgery.errors import BuildError
from surgery.heads import compute_losses
from surgery.model import build_model, check_fits_in_memory
from surgery.schema import Recipe


def recipe(**extra: Any) -> Recipe:
    data = {
        "name": "t",
        "backbone": {"source": "timm", "name": "test_resnet", "pretrained": False},
        "heads": [
            {
                "name": "kind",
                "layers": [{"dropout": {"p": 0.1}}, {"linear": {"out_features": 4}}],
                "loss": "cross_entropy",
                "labels": ["a", "b", "c", "d"],
            },
            {
                "name": "size",
                "input": "logits",
                "layers": [{"mlp": {"hidden": [8], "out_features": 1}}],
                "loss": {"name": "mse", "weight": 0.5},
            },
        ],
    }
    data.update(extra)
    return Recipe.model_validate(data)


def test_parameter_names_are_backbone_and_heads() -> None:
    model = build_model(recipe())
    names = [n for n, _ in model.named_parameters()]
    assert all(n.startswith(("backbone.", "heads.kind.", "heads.size.")) for n in names)
    assert "heads.kind.1.weight" in names and "backbone.fc.weight" in names


def test_forward_returns_each_head_and_head_info() -> None:
    model = build_model(recipe())
    outputs = model(*model.example_inputs(3))
    assert {k: tuple(v.shape) for k, v in outputs.items()} == {"kind": (3, 4), "size": (3, 1)}
    assert model.head_info["kind"].to_dict() == {
        "task": "multiclass",
        "labels": ["a", "b", "c", "d"],
        "out_features": 4,
        "output_shape": [4],
    }
    assert model.head_info["size"].task == "regression"
    total, per_head = compute_losses(
        model, outputs, {"kind": torch.tensor([0, 1, 3]), "size": torch.randn(3)}, recipe()
    )
    torch.testing.assert_close(total, per_head["kind"] + 0.5 * per_head["size"])


def test_builds_are_reproducible_by_seed() -> None:
    a, b = build_model(recipe()).state_dict(), build_model(recipe()).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = build_model(recipe(train={"seed": 1})).state_dict()
    assert not torch.equal(a["heads.kind.1.weight"], c["heads.kind.1.weight"])


def test_build_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(42)
    expected = torch.rand(3)
    torch.manual_seed(42)
    build_model(recipe())
    assert torch.equal(torch.rand(3), expected)


def test_input_overrides_apply_over_the_backbone_config() -> None:
    model = build_model(recipe(input={"size": [96, 64], "mean": [0.1, 0.2, 0.3], "std": [1.0, 1.0, 1.0]}))
    spec = model.input_spec
    assert spec.size == (96, 64) and spec.mean == (0.1, 0.2, 0.3) and spec.interpolation == "bilinear"
    assert model.example_inputs(2)[0].shape == (2, 3, 96, 64)
    assert model(*model.example_inputs(2))["kind"].shape == (2, 4)


def test_input_channels_override_follows_the_model() -> None:
    model = build_model(
        recipe(
            input={"channels": 1},
            backbone={"source": "timm", "name": "test_resnet", "pretrained": False, "kwargs": {"in_chans": 1}},
        )
    )
    assert model.input_spec.channels == 1 and model.example_inputs(1)[0].shape[1] == 1


def test_example_inputs_are_deterministic() -> None:
    model = build_model(recipe())
    assert torch.equal(model.example_inputs(2)[0], model.example_inputs(2)[0])
    assert model.input_spec.input_names == ("pixel_values",)


def test_features_index_out_of_range() -> None:
    heads = [
        {
            "name": "f",
            "input": "features",
            "feature_index": 9,
            "layers": ["avgpool", {"linear": {"out_features": 2}}],
            "loss": "cross_entropy",
        }
    ]
    with pytest.raises(BuildError, match="feature_index 9 is out of range"):
        build_model(recipe(heads=heads))


def test_state_dict_round_trip_into_a_weightless_build() -> None:
    trained = build_model(recipe())
    with torch.no_grad():
        trained.heads["kind"][1].weight.add_(1.0)
    rebuilt = build_model(recipe(), load_weights=False)
    rebuilt.load_state_dict(trained.state_dict())
    trained.eval()
    rebuilt.eval()
    x = trained.example_inputs(2)
    torch.testing.assert_close(trained(*x)["kind"], rebuilt(*x)["kind"])


def test_a_model_bigger_than_the_machine_is_refused_before_allocating() -> None:
    huge = [{"name": "big", "layers": [{"mlp": {"hidden": [2**20], "out_features": 2**20}}], "loss": "mse"}]
    # 2^40 weights (4 TiB): allocating them would fail with a RuntimeError, not this message.
    with pytest.raises(
        BuildError, match=r"parameters alone need 4\.0 TiB \(1,099,6\d\d,\d{3},\d{3} parameters\)"
    ) as err:
        check_fits_in_memory(recipe(heads=huge))
    assert "largest is heads.big.0.2" in str(err.value) and "of memory" in str(err.value)
    from surgery.plan import make_plan

    with pytest.raises(BuildError, match=r"parameters alone need 4\.0 TiB"):  # plan checks before it builds
        make_plan(recipe(heads=huge))


def test_build_refuses_a_model_bigger_than_the_machine_before_any_folder(tmp_path) -> None:
    import yaml

    from surgery.build import build_command

    huge = [{"name": "big", "layers": [{"mlp": {"hidden": [2**20], "out_features": 2**20}}], "loss": "mse"}]
    path = tmp_path / "huge.yaml"
    data = recipe(heads=huge).model_dump(mode="json", exclude_defaults=True)
    path.write_text(yaml.safe_dump({**data, "data": {"source": "synthetic"}}))
    with pytest.raises(BuildError, match=r"parameters alone need 4\.0 TiB"):
        build_command(path, (), runs_root=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def test_memory_check_counts_on_the_meta_device_and_compares_with_the_machine(monkeypatch) -> None:
    import surgery.model as model_module

    count, size, biggest, _ = model_module.parameter_footprint(recipe())
    real = build_model(recipe())
    assert count == sum(p.numel() for p in real.parameters()) and size == 4 * count
    assert biggest.startswith("backbone.")
    monkeypatch.setattr(model_module, "machine_memory", lambda: size - 1)
    with pytest.raises(BuildError, match=r"more than this machine's"):
        check_fits_in_memory(recipe())
    monkeypatch.setattr(model_module, "machine_memory", lambda: size)
    check_fits_in_memory(recipe())
