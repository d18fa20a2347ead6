"""`surgery plan`: totals equal the built module's counts, memory follows the freeze rules, the
lecture example shows 1,001 of 143,668,241, and nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from surgery.model import build_model
from surgery.plan import make_plan, plan_command, render_plan
from surgery.recipe import RECIPES_DIR, load_recipe

TINY = {
    "name": "tiny",
    "backbone": {"source": "timm", "name": "test_resnet", "pretrained": True},
    "heads": [{"name": "out", "layers": [{"mlp": {"hidden": [16], "out_features": 3}}], "loss": "cross_entropy"}],
    "freeze": ["backbone.**"],
    "unfreeze": ["backbone.layer4.**"],
    "data": {"source": "synthetic", "batch_size": 8},
    "train": {"optimizer": {"name": "adamw"}},
}


@pytest.fixture()
def tiny_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def test_plan_totals_equal_the_built_module(tiny_recipe: Path) -> None:
    plan = json.loads(plan_command(tiny_recipe, (), depth=2, as_json=True))
    model = build_model(load_recipe(tiny_recipe), load_weights=False)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert plan["totals"] == {"params": total, "trainable": trainable, "frozen": total - trainable}
    top = {row["name"]: row for row in plan["modules"] if row["depth"] == 1}
    assert top["backbone"]["params"] + top["heads"]["params"] == total
    assert top["heads"]["trainable"] == top["heads"]["params"]
    assert max(row["depth"] for row in plan["modules"]) == 2
    assert top["heads"]["output_shape"] is None and plan["taps"]["pooled"][1:] == [96]
    assert plan["flops_per_sample"] > 0 and plan["input"]["size"] == [160, 160]


def test_memory_estimate_follows_trainable_parameters(tiny_recipe: Path) -> None:
    recipe = load_recipe(tiny_recipe)
    plan = make_plan(recipe, depth=1)
    ((device, memory),) = plan["memory"]["per_device"].items()
    assert device == "cpu"
    assert memory["weights"] == plan["totals"]["params"] * 4
    assert memory["gradients"] == plan["totals"]["trainable"] * 4
    assert memory["optimizer_state"] == 2 * memory["gradients"]  # adamw: two moments
    assert memory["activations"] > 0
    assert memory["total"] == sum(memory[k] for k in ("weights", "gradients", "optimizer_state", "activations"))
    frozen = recipe.model_copy(update={"unfreeze": []})
    assert make_plan(frozen, depth=1)["memory"]["per_device"]["cpu"]["activations"] < memory["activations"]


def test_plan_splits_pipeline_stages(tmp_path: Path) -> None:
    stages = [{"modules": ["backbone"], "device": "cuda:0"}, {"modules": ["heads"], "device": "cuda:1"}]
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(TINY | {"placement": {"strategy": "pipeline", "stages": stages}}))
    recipe = load_recipe(path)
    memory = make_plan(recipe, depth=1)["memory"]["per_device"]
    assert set(memory) == {"stage0:cuda:0", "stage1:cuda:1"}
    assert memory["stage1:cuda:1"]["weights"] < memory["stage0:cuda:0"]["weights"]


def test_plan_text_shows_tree_totals_and_memory(tiny_recipe: Path) -> None:
    text = plan_command(tiny_recipe, ("train.optimizer.name=sgd",), depth=3, as_json=False)
    assert "backbone.layer4" in text and "heads.out" in text
    assert "parameters:" in text and "trainable" in text and "FLOPs" in text
    assert "training memory estimate (batch 8, sgd, fp32)" in text


@pytest.mark.slow
def test_lecture_example_plan() -> None:
    assert (RECIPES_DIR / "vgg19-binary.yaml").is_file()
    plan = make_plan(load_recipe("vgg19-binary"), depth=2)  # pretrained: true, yet nothing is downloaded
    assert plan["totals"]["trainable"] == 1_001
    assert plan["totals"]["params"] == 143_668_241
    assert plan["heads"]["score"]["task"] == "binary"
    assert json.loads(json.dumps(plan)) == plan
    text = render_plan(plan)
    assert "143,668,241 total, 1,001 trainable" in text
