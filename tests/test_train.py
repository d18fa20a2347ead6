"""The training loop: precision, accumulation, max_steps, early stopping, gradual unfreezing,
run folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from surgery.checkpoint import find_last, read_meta, trained_model
from surgery.errors import CheckpointError, SurgeryError
from surgery.model import build_model
from surgery.recipe import load_recipe_text
from surgery.runs import run_folder
from surgery.train import fit

BASE = """
name: loop
backbone: {{source: timm, name: test_resnet, pretrained: false}}
input: {{size: [16, 16]}}
surgery: [{{input_channels: 1}}]
heads:
  - {{name: cls, layers: [{{linear: {{out_features: 2}}}}], loss: cross_entropy, metrics: [accuracy]}}
data: {{source: synthetic, batch_size: 8, synthetic: {{num_samples: {samples}, num_classes: 2}}}}
train:
  epochs: {epochs}
  optimizer: {{name: adamw, lr: 0.01}}
{train}
monitor: {{progress: none, graph: false, histograms: false, sample_predictions: 0}}
{extra}
"""


def recipe(samples: int = 32, epochs: int = 1, train: str = "", extra: str = ""):
    return load_recipe_text(BASE.format(samples=samples, epochs=epochs, train=train, extra=extra))


def test_fp16_on_cpu_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SurgeryError, match=r"fp16 needs a CUDA device .* use bf16 or fp32"):
        fit(recipe(train="  precision: fp16\n"), tmp_path / "run")


def test_bf16_autocast_on_cpu_trains(tmp_path: Path) -> None:
    result = fit(recipe(train="  precision: bf16\n"), tmp_path / "run")
    assert torch.isfinite(torch.tensor(result.metrics["val/loss"]))
    weights = load_file(str(result.last_checkpoint / "model.safetensors"))
    assert all(t.dtype in (torch.float32, torch.int64) for t in weights.values())  # master weights stay fp32


def test_accumulation_and_max_steps_count_optimizer_steps(tmp_path: Path) -> None:
    # 40 samples / batch 8 = 5 micro-batches per epoch; accumulate 2 -> 3 steps (the last one partial)
    result = fit(recipe(samples=40, epochs=2, train="  accumulate: 2\n  clip_grad_norm: 0.5\n"), tmp_path / "a")
    assert read_meta(result.last_checkpoint)["step"] == 6
    capped = fit(recipe(samples=40, epochs=5, train="  max_steps: 4\n"), tmp_path / "b")
    meta = read_meta(capped.last_checkpoint)
    assert meta["step"] == 4 and "val/loss" in meta["metrics"]  # validated before stopping


def test_early_stopping_stops_after_patience(tmp_path: Path) -> None:
    es = "  early_stopping: {monitor: val/loss, mode: min, patience: 1, min_delta: 100.0}\n"
    result = fit(recipe(samples=16, epochs=6, train=es), tmp_path / "run")
    assert result.stopped_early
    assert read_meta(result.last_checkpoint)["epoch"] == 2  # the first evaluation sets the best; the second fails


def test_frozen_backbone_then_unfreeze_at_epoch_1(tmp_path: Path) -> None:
    extra = 'freeze: ["backbone.**"]\n'
    train = '  unfreeze_at: [{epoch: 1, params: "backbone.**", lr_scale: 0.5}]\n'
    initial = build_model(recipe(extra=extra, train=train)).state_dict()
    first = fit(recipe(epochs=1, extra=extra, train=train), tmp_path / "one").last_checkpoint
    # epoch 0: only the head trained, so the checkpoint stores only the head; the backbone weights and
    # its (frozen, eval-mode) BatchNorm statistics are untouched and referenced by their hash
    assert set(load_file(str(first / "model.safetensors"))) == {"heads.cls.0.weight", "heads.cls.0.bias"}
    one = trained_model(recipe(epochs=1, extra=extra, train=train), first).state_dict()
    backbone = [k for k in initial if k.startswith("backbone.")]
    assert all(torch.equal(one[k], initial[k]) for k in backbone)
    assert not torch.equal(one["heads.cls.0.weight"], initial["heads.cls.0.weight"])
    two = load_file(
        str(fit(recipe(epochs=2, extra=extra, train=train), tmp_path / "two").last_checkpoint / "model.safetensors")
    )
    assert not torch.equal(two["backbone.conv1.0.weight"], initial["backbone.conv1.0.weight"])


def test_same_seed_same_weights(tmp_path: Path) -> None:
    a = fit(recipe(samples=16), tmp_path / "a").last_checkpoint
    b = fit(recipe(samples=16), tmp_path / "b").last_checkpoint
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_run_folders(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no run to resume"):
        run_folder(tmp_path, "loop", None, resume=True)
    first = run_folder(tmp_path, "loop", "r1", resume=False)
    assert first == tmp_path / "loop" / "r1" and first.is_dir()
    fit(recipe(samples=16), first)
    with pytest.raises(CheckpointError, match="already has checkpoints; add --resume"):
        run_folder(tmp_path, "loop", "r1", resume=False)
    assert run_folder(tmp_path, "loop", None, resume=True) == first
    assert find_last(first).name == "step-00000002"
    assert run_folder(tmp_path, "loop", None, resume=False) != first  # a new timestamped run


def test_a_lone_last_sample_trains_with_the_batch_before_it(tmp_path: Path) -> None:
    # 33 samples in batches of 8 would leave a batch of one, which BatchNorm cannot train on
    result = fit(recipe(samples=33), tmp_path / "run")
    assert find_last(tmp_path / "run").name == "step-00000004"
    assert result.metrics["val/loss"] > 0
