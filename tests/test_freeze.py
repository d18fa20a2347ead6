"""Freeze rules: glob semantics, rule order, no-match errors, frozen BatchNorm through a training
step, learning-rate groups, the unfreeze schedule and the saved freeze state."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from surgery.errors import BuildError, CheckpointError
from surgery.freeze import (
    apply_freeze_rules,
    apply_unfreeze_schedule,
    freeze_state,
    load_freeze_state,
    match_params,
    param_groups,
    set_frozen_batchnorm_eval,
    unfreeze,
)
from surgery.heads import compute_losses
from surgery.model import build_model
from surgery.schema import Recipe

NAMES = [
    "backbone.conv1.weight",
    "backbone.layer4.0.conv1.weight",
    "backbone.layer4.0.bn1.bias",
    "backbone.layer4.1.conv1.weight",
    "heads.out.0.weight",
    "heads.out.0.bias",
]


@pytest.mark.parametrize(
    ("glob", "expected"),
    [
        ("backbone.**", NAMES[:4]),
        ("backbone.*", []),  # `*` stays inside one part
        ("backbone.*.weight", ["backbone.conv1.weight"]),
        ("backbone.layer4.*.conv1.weight", ["backbone.layer4.0.conv1.weight", "backbone.layer4.1.conv1.weight"]),
        ("**.bias", ["backbone.layer4.0.bn1.bias", "heads.out.0.bias"]),
        ("backbone.layer4.?.bn1.*", ["backbone.layer4.0.bn1.bias"]),
        ("backbone.layer4.[!0].**", ["backbone.layer4.1.conv1.weight"]),
        ("heads.out.0.weight", ["heads.out.0.weight"]),
    ],
)
def test_glob_semantics(glob: str, expected: list[str]) -> None:
    assert match_params(glob, NAMES) == expected


def recipe(**extra: Any) -> Recipe:
    heads = [{"name": "out", "layers": [{"linear": {"out_features": 3}}], "loss": "cross_entropy"}]
    return Recipe.model_validate(
        {
            "name": "t",
            "backbone": {"source": "timm", "name": "test_resnet", "pretrained": False},
            "heads": heads,
            **extra,
        }
    )


def trainable(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_freeze_then_unfreeze_last_match_wins() -> None:
    model = build_model(recipe(freeze=["backbone.**"], unfreeze=["backbone.layer4.**"]))
    names = trainable(model)
    assert all(n.startswith(("backbone.layer4.", "heads.")) for n in names)
    assert "heads.out.0.weight" in names and "backbone.layer4.0.conv1.weight" in names


def test_no_rules_means_all_trainable() -> None:
    model = build_model(recipe())
    assert trainable(model) == {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("field", ["freeze", "unfreeze"])
def test_a_rule_matching_nothing_is_an_error(field: str) -> None:
    with pytest.raises(BuildError, match=r"glob 'backbone\.layer9\.\*\*' matches no parameter"):
        build_model(recipe(**{field: ["backbone.layer9.**"]}))


def test_unfreeze_at_and_lr_group_globs_are_checked_at_build() -> None:
    with pytest.raises(BuildError, match=r"train\.unfreeze_at glob"):
        build_model(recipe(train={"unfreeze_at": [{"epoch": 2, "params": "backbone.layr4.**"}]}))
    with pytest.raises(BuildError, match=r"train\.lr_groups glob"):
        build_model(recipe(train={"lr_groups": [{"params": "backbone.nope.**", "lr_scale": 0.1}]}))


def _train_step(model: torch.nn.Module, r: Recipe) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    set_frozen_batchnorm_eval(model, r)
    outputs = model(*model.example_inputs(4))
    loss, _ = compute_losses(model, outputs, {"out": torch.tensor([0, 1, 2, 0])}, r)
    loss.backward()
    optimizer.step()


def test_batchnorm_in_frozen_parts_keeps_its_running_stats() -> None:
    r = recipe(freeze=["backbone.**"], unfreeze=["backbone.layer4.**"])
    model = build_model(r)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train_step(model, r)
    after = model.state_dict()
    assert torch.equal(before["backbone.bn1.running_mean"], after["backbone.bn1.running_mean"])
    assert torch.equal(before["backbone.layer1.0.bn1.running_var"], after["backbone.layer1.0.bn1.running_var"])
    assert torch.equal(before["backbone.layer1.0.conv1.weight"], after["backbone.layer1.0.conv1.weight"])
    assert not torch.equal(before["backbone.layer4.0.bn1.running_mean"], after["backbone.layer4.0.bn1.running_mean"])
    assert not torch.equal(before["heads.out.0.weight"], after["heads.out.0.weight"])
    assert not model.backbone.bn1.training and model.backbone.layer4[0].bn1.training


def test_model_train_keeps_frozen_batchnorm_in_eval() -> None:
    model = build_model(recipe(freeze=["backbone.**"]))
    model.train()
    assert not model.backbone.bn1.training and model.heads.training


def test_frozen_batchnorm_train_lets_stats_move() -> None:
    r = recipe(freeze=["backbone.**"], train={"frozen_batchnorm": "train"})
    model = build_model(r)
    before = model.state_dict()["backbone.bn1.running_mean"].clone()
    _train_step(model, r)
    assert not torch.equal(before, model.state_dict()["backbone.bn1.running_mean"])


def test_param_groups_cover_every_parameter_once_with_scales() -> None:
    r = recipe(
        freeze=["backbone.**"],
        train={
            "optimizer": {"lr": 0.01},
            "lr_groups": [
                {"params": "backbone.**", "lr_scale": 0.1},
                {"params": "backbone.layer4.**", "lr_scale": 0.5},
            ],
            "unfreeze_at": [{"epoch": 1, "params": "backbone.layer3.**", "lr_scale": 0.2}],
        },
    )
    model = build_model(r)
    groups = param_groups(model, r)
    all_names = [n for g in groups for n in g["names"]]
    assert sorted(all_names) == sorted(n for n, _ in model.named_parameters())
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["heads.out.0.weight"]["lr_scale"] == 1.0
    assert (
        by_name["backbone.conv1.0.weight" if "backbone.conv1.0.weight" in by_name else "backbone.conv1.weight"][
            "lr_scale"
        ]
        == 0.1
    )
    assert by_name["backbone.layer4.0.conv1.weight"]["lr"] == pytest.approx(0.005)
    assert by_name["backbone.layer3.0.conv1.weight"]["lr_scale"] == 0.2
    for group in groups:
        assert [id(p) for p in group["params"]] == [id(dict(model.named_parameters())[n]) for n in group["names"]]
    torch.optim.AdamW(groups)  # usable as optimizer groups as they are


def test_unfreeze_schedule_is_due_by_epoch_and_idempotent() -> None:
    r = recipe(
        freeze=["backbone.**"],
        train={
            "unfreeze_at": [{"epoch": 2, "params": "backbone.layer4.**"}, {"epoch": 3, "params": "backbone.layer3.**"}]
        },
    )
    model = build_model(r)
    assert apply_unfreeze_schedule(model, r, 0) == []
    newly = apply_unfreeze_schedule(model, r, 2)
    assert newly and all(n.startswith("backbone.layer4.") for n in newly)
    assert apply_unfreeze_schedule(model, r, 2) == []
    fresh = build_model(r)  # a run resumed at epoch 5 catches up on both entries
    caught_up = apply_unfreeze_schedule(fresh, r, 5)
    assert {n.split(".")[1] for n in caught_up} == {"layer3", "layer4"}


def test_unfreeze_returns_only_newly_trainable() -> None:
    model = build_model(recipe(freeze=["backbone.layer4.**"]))
    newly = unfreeze(model, "backbone.layer4.0.**")
    assert newly and all(n.startswith("backbone.layer4.0.") for n in newly)
    assert unfreeze(model, "backbone.layer4.0.**") == []


def test_freeze_state_round_trip() -> None:
    r = recipe(freeze=["backbone.**"], train={"unfreeze_at": [{"epoch": 1, "params": "backbone.layer4.**"}]})
    model = build_model(r)
    apply_unfreeze_schedule(model, r, 1)
    state = freeze_state(model)
    resumed = build_model(r)
    load_freeze_state(resumed, state)
    assert freeze_state(resumed) == state
    assert state["backbone.layer4.0.conv1.weight"] and not state["backbone.layer1.0.conv1.weight"]


def test_freeze_state_for_another_model_is_refused() -> None:
    model = build_model(recipe())
    with pytest.raises(CheckpointError, match="freeze state does not fit"):
        load_freeze_state(model, {"backbone.other.weight": True})


def test_apply_freeze_rules_resets_from_scratch() -> None:
    r = recipe(freeze=["backbone.**"])
    model = build_model(r)
    for p in model.parameters():
        p.requires_grad_(False)
    apply_freeze_rules(model, r)
    assert trainable(model) == {"heads.out.0.weight", "heads.out.0.bias"}
