"""Frozen-feature caching: when it is exact, what it says, and that cached training gives the
uncached run's metrics (and still resumes exactly)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from surgery.checkpoint import find_last, read_meta
from surgery.errors import SurgeryError
from surgery.features import CACHE_FILE, FEATURES_DIR, decide
from surgery.model import build_model
from surgery.recipe import load_recipe_text
from surgery.train import fit

BASE = """
name: cached
backbone: {{source: timm, name: test_resnet, pretrained: false}}
input: {{size: [16, 16]}}
surgery: [{{input_channels: 1}}]
heads:
  - {{name: cls, input: pooled, layers: [{layers}], loss: cross_entropy, metrics: [accuracy, f1_macro]}}
freeze: [{freeze}]
data: {{source: digits, batch_size: 32, limit_train: 192, limit_val: 64{data}}}
train:
  epochs: {epochs}
  seed: 1
  optimizer: {{name: adamw, lr: 0.01}}
  cache_features: {cache}
{train}
monitor: {{progress: plain, graph: false, histograms: false, sample_predictions: 0}}
"""


def recipe(
    cache: str = "auto",
    *,
    freeze: str = '"backbone.**"',
    layers: str = "{linear: {out_features: 10}}",
    data: str = "",
    train: str = "",
    epochs: int = 2,
):
    return load_recipe_text(
        BASE.format(cache=cache, freeze=freeze, layers=layers, data=data, train=train, epochs=epochs)
    )


def _decide(r):
    return decide(build_model(r), r, epoch=0, applied_through=-1, num_samples=256)


def test_frozen_backbone_is_cached_and_says_why() -> None:
    decision = _decide(recipe())
    assert decision.cache and "frozen up to the heads' taps" in decision.reason


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"freeze": '"backbone.conv1.**"'}, r"trainable parameters before the heads' taps train \(backbone\."),
        ({"data": ", augment: [{hflip: {p: 0.5}}]"}, r"data.augment changes the inputs every epoch \(hflip\)"),
        ({"cache": "off"}, "train.cache_features is off"),
        (
            {"train": "  frozen_batchnorm: train\n"},
            r"layers before the heads' taps compute differently in training: backbone\.\S+ \(BatchNorm2d\)",
        ),
        (
            {"train": '  unfreeze_at: [{epoch: 0, params: "backbone.layer4.**"}]\n'},
            "train.unfreeze_at unfreezes part of the backbone before the taps at epoch 0",
        ),
    ],
)
def test_not_exact_is_explained(kwargs: dict[str, str], reason: str) -> None:
    decision = _decide(recipe(**kwargs))
    assert not decision.cache
    assert __import__("re").search(reason, decision.reason), decision.reason


def test_a_trainable_part_after_the_tap_does_not_prevent_caching() -> None:
    # the head reads an early feature map: the last stage trains, but nothing the head reads depends on it
    r = recipe(
        freeze='"backbone.**"]\nunfreeze: ["backbone.layer4.**"', layers="{avgpool: {}}, {linear: {out_features: 10}}"
    )
    r.heads[0].input, r.heads[0].feature_index = "features", 1
    assert _decide(r).cache
    r.heads[0].feature_index = -1
    assert "before the heads' taps train (backbone.layer4." in _decide(r).reason


def test_dropout_in_the_head_is_fine_but_on_refuses_an_unsafe_recipe(tmp_path: Path) -> None:
    assert _decide(recipe(layers="{dropout: {p: 0.3}}, {linear: {out_features: 10}}")).cache
    with pytest.raises(SurgeryError, match=r"cache_features is on, but .* not be exact: data.augment .* use `auto`"):
        fit(recipe("on", data=", augment: [{rotate: {degrees: 10}}]"), tmp_path / "run")


def test_cached_run_matches_uncached_and_is_reused_on_resume(tmp_path: Path, capsys) -> None:
    uncached = fit(recipe("off"), tmp_path / "off")
    cached = fit(recipe("on"), tmp_path / "on")
    err = capsys.readouterr().err
    assert "feature cache: heads train on features computed once into" in err
    assert (tmp_path / "on" / FEATURES_DIR / CACHE_FILE).is_file()
    for key in ("val/loss", "val/cls/accuracy", "val/cls/f1_macro"):
        assert cached.metrics[key] == pytest.approx(uncached.metrics[key], rel=1e-4, abs=1e-5)
    # resuming for one more epoch reuses the cache, and ends where an uninterrupted 3-epoch run does
    fit(recipe("on", epochs=3), tmp_path / "on", resume=True)
    assert "reused from" in capsys.readouterr().err
    straight = fit(recipe("on", epochs=3), tmp_path / "straight")
    resumed = read_meta(find_last(tmp_path / "on"))
    assert resumed["metrics"] == read_meta(straight.last_checkpoint)["metrics"]
    assert (find_last(tmp_path / "on") / "model.safetensors").read_bytes() == (
        straight.last_checkpoint / "model.safetensors"
    ).read_bytes()


def test_unfreeze_at_drops_the_cache(tmp_path: Path, capsys) -> None:
    train = '  unfreeze_at: [{epoch: 1, params: "backbone.layer4.**", lr_scale: 0.5}]\n'
    result = fit(recipe("auto", train=train), tmp_path / "run")
    err = capsys.readouterr().err
    assert "until train.unfreeze_at unfreezes part of it at epoch 1" in err
    assert "epoch 2: feature cache dropped" in err
    assert not (tmp_path / "run" / FEATURES_DIR).exists()
    uncached = fit(recipe("off", train=train), tmp_path / "off")
    assert result.metrics["val/cls/accuracy"] == pytest.approx(uncached.metrics["val/cls/accuracy"], abs=1e-4)


def test_cache_is_rebuilt_when_its_key_differs(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "run" / FEATURES_DIR
    folder.mkdir(parents=True)
    save_file({"train/pooled": torch.zeros(1, 1)}, str(folder / CACHE_FILE), metadata={"key": "stale"})
    fit(recipe("on", epochs=1), tmp_path / "run")
    rebuilt = load_file(str(folder / CACHE_FILE))  # the stale file was replaced by the real features
    assert rebuilt["train/pooled"].shape == (192, 96) and rebuilt["val/pooled"].shape == (64, 96)
