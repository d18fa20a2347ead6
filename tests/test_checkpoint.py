"""Checkpoints: atomic layout, verification, ranking, the resume contract, and exact resume after
a real SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from surgery import checkpoint as ckpt
from surgery.errors import CheckpointError
from surgery.recipe import load_recipe_text

RECIPE = """
name: tiny
backbone: {{source: timm, name: test_resnet, pretrained: false}}
input: {{size: [16, 16]}}
surgery: [{{input_channels: 1}}]
heads:
  - name: cls
    layers: [{{dropout: {{p: 0.2}}}}, {{linear: {{out_features: 4}}}}]
    loss: cross_entropy
    metrics: [accuracy]
data:
  source: synthetic
  batch_size: 8
  synthetic: {{num_samples: {samples}, num_classes: 4}}
  augment: [{{hflip: {{p: 0.5}}}}, {{gaussian_noise: {{std: 0.1}}}}]
train:
  epochs: {epochs}
  seed: 3
  optimizer: {{name: adamw, lr: 0.003}}
  scheduler: {{name: cosine, warmup_steps: 2}}
  accumulate: {accumulate}
  clip_grad_norm: 1.0
  checkpoint: {{every_steps: {every}, keep_best: 1, monitor: val/cls/accuracy, mode: max}}
monitor: {{progress: none, histograms: false, graph: false, sample_predictions: 0}}
"""


def write_recipe(
    tmp_path: Path, *, samples: int = 64, epochs: int = 2, accumulate: int = 1, every: int = 2, name: str = "tiny.yaml"
) -> Path:
    path = tmp_path / name
    path.write_text(RECIPE.format(samples=samples, epochs=epochs, accumulate=accumulate, every=every))
    return path


def fit_script(recipe: Path, run_dir: Path, resume: bool) -> list[str]:
    code = (
        "import sys; from surgery.recipe import load_recipe; from surgery.train import fit; "
        f"fit(load_recipe({str(recipe)!r}), {str(run_dir)!r}, resume={resume})"
    )
    return [sys.executable, "-c", code]


def run_fit(recipe: Path, run_dir: Path, *, resume: bool = False) -> None:
    done = subprocess.run(fit_script(recipe, run_dir, resume), capture_output=True, text=True, timeout=300, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def final_weights(run_dir: Path) -> bytes:
    return (ckpt.find_last(run_dir) / ckpt.MODEL_FILE).read_bytes()


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, samples=160, epochs=2, accumulate=2, every=1)  # 20 batches, 10 steps/epoch
    reference = tmp_path / "reference"
    run_fit(recipe, reference)

    interrupted = tmp_path / "interrupted"
    proc = subprocess.Popen(
        fit_script(recipe, interrupted, False), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    target = interrupted / "checkpoints" / ckpt.checkpoint_name(3)  # mid-epoch 1
    deadline = time.monotonic() + 240
    while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = ckpt.read_meta(ckpt.find_last(interrupted))
    assert killed_at["step"] < 20, "the run finished before it could be killed"

    run_fit(recipe, interrupted, resume=True)
    assert (
        ckpt.read_meta(ckpt.find_last(interrupted))["step"] == ckpt.read_meta(ckpt.find_last(reference))["step"] == 20
    )
    assert final_weights(interrupted) == final_weights(reference)
    # early-stopping/metrics state resumed too: the final metrics agree exactly
    assert (
        ckpt.read_meta(ckpt.find_last(interrupted))["metrics"] == ckpt.read_meta(ckpt.find_last(reference))["metrics"]
    )


def test_checkpoint_layout_index_and_keep_best(tmp_path: Path) -> None:
    from surgery.train import fit

    recipe = load_recipe_text(write_recipe(tmp_path, samples=32, epochs=3, every=3).read_text())
    result = fit(recipe, tmp_path / "run")
    folder = tmp_path / "run" / "checkpoints"
    index = json.loads((folder / "index.json").read_text())
    assert index["last"] == result.last_checkpoint.name == "step-00000012"
    assert len(index["best"]) == 1 and result.best_checkpoint == folder / index["best"][0][0]
    kept = sorted(p.name for p in folder.iterdir() if p.is_dir())
    assert kept == sorted({index["last"], index["best"][0][0]})
    last = result.last_checkpoint
    assert sorted(p.name for p in last.iterdir()) == ["meta.json", "model.safetensors", "recipe.yaml", "trainer.pt"]
    meta = ckpt.read_meta(last)
    assert meta["complete"] is True and meta["step"] == 12 and meta["epoch"] == 3
    assert set(meta["files"]) == {"model.safetensors", "trainer.pt", "recipe.yaml"}
    trainer = torch.load(last / "trainer.pt", weights_only=True)
    assert {"optimizer", "scheduler", "scaler", "rng", "freeze", "state"} <= set(trainer)
    assert {"python", "numpy", "torch"} <= set(trainer["rng"])
    assert ckpt.find_best(tmp_path / "run") == result.best_checkpoint
    assert (tmp_path / "run" / "recipe.lock.yaml").read_text().startswith("# surgery lock")


def _finished_run(tmp_path: Path) -> Path:
    from surgery.train import fit

    recipe = load_recipe_text(write_recipe(tmp_path, samples=16, epochs=2, every=1).read_text())
    fit(recipe, tmp_path / "run")
    return tmp_path / "run"


def test_partial_and_corrupt_checkpoints_are_skipped_with_a_warning(tmp_path: Path) -> None:
    run = _finished_run(tmp_path)
    good = ckpt.find_last(run)
    folder = run / "checkpoints"
    # a save killed before its rename: a leftover temporary sibling
    leftover = folder / ".tmp-step-00000099.4242"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    # a newer checkpoint whose weights were truncated after the meta was written
    corrupt = folder / "step-00000050"
    corrupt.mkdir()
    for f in ("model.safetensors", "trainer.pt", "recipe.yaml", "meta.json"):
        (corrupt / f).write_bytes((good / f).read_bytes())
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    # a newer one still that never got its meta
    no_meta = folder / "step-00000060"
    no_meta.mkdir()
    (no_meta / "model.safetensors").write_bytes(data)

    with pytest.warns(ckpt.CheckpointWarning) as record:
        assert ckpt.find_last(run) == good
    messages = " ".join(str(w.message) for w in record)
    assert "step-00000060" in messages and "step-00000050" in messages and ".tmp-step-00000099" in messages
    with pytest.raises(CheckpointError, match="sha256"):
        ckpt.load_checkpoint(corrupt, torch.nn.Linear(1, 1))


def test_a_save_clears_what_killed_saves_left(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / ".tmp-step-00000007.4242").mkdir()  # a checkpoint folder a killed process was writing
    (folder / ".index.json.4242.tmp").write_text('{"last": nu')  # and its index, cut mid-write
    saved = ckpt.save_checkpoint(
        tmp_path,
        model=torch.nn.Linear(2, 1),
        trainer_state={},
        meta={"step": 3, "epoch": 1, "metrics": {"val/loss": 0.5}},
        recipe_text="name: t\n",
        monitor="val/loss",
        mode="min",
        keep_best=1,
    )
    assert sorted(p.name for p in folder.iterdir()) == ["index.json", saved.name]
    assert ckpt.read_index(tmp_path) == {"last": "step-00000003", "best": [["step-00000003", 0.5]]}


def test_resume_refuses_unsafe_recipe_change_and_accepts_safe_ones(tmp_path: Path) -> None:
    from surgery.train import fit

    run = _finished_run(tmp_path)
    text = write_recipe(tmp_path, samples=16, epochs=2, every=1).read_text()
    changed_lr = load_recipe_text(text.replace("lr: 0.003", "lr: 0.01"))
    with pytest.raises(CheckpointError, match=r"train\.optimizer\.lr: 0\.003 -> 0\.01"):
        fit(changed_lr, run, resume=True)
    # --force resumes anyway (the run is already finished: nothing left to train)
    assert fit(changed_lr, run, resume=True, force=True).last_checkpoint == ckpt.find_last(run)
    # more epochs is a safe change: training continues from the last checkpoint
    longer = load_recipe_text(text.replace("epochs: 2", "epochs: 3"))
    result = fit(longer, run, resume=True)
    assert ckpt.read_meta(result.last_checkpoint)["epoch"] == 3


def test_resume_without_checkpoints_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        ckpt.find_last(tmp_path)


def test_safe_fields() -> None:
    assert ckpt.is_safe_change("train.epochs")
    assert ckpt.is_safe_change("monitor.log_every_steps")
    assert ckpt.is_safe_change("train.early_stopping.patience")
    assert not ckpt.is_safe_change("train.optimizer.lr")
    assert not ckpt.is_safe_change("train.epochs_extra")


LEAN = """
name: lean
backbone: {{source: timm, name: test_resnet{weights}}}
input: {{size: [16, 16]}}
surgery: [{{input_channels: 1}}]
heads:
  - {{name: cls, layers: [{{linear: {{out_features: 4}}}}], loss: cross_entropy, metrics: [accuracy]}}
freeze: ["backbone.**"]
data: {{source: synthetic, batch_size: 8, synthetic: {{num_samples: 32, num_classes: 4}}}}
train: {{epochs: 1, optimizer: {{name: adamw, lr: 0.01}}, frozen_batchnorm: {bn}}}
monitor: {{progress: none, histograms: false, graph: false, sample_predictions: 0}}
"""


def test_lean_checkpoint_stores_what_training_changed_and_exports_whole(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from surgery.export import export_run
    from surgery.model import build_model
    from surgery.train import fit

    recipe = load_recipe_text(LEAN.format(weights=", pretrained: false", bn="train"))
    last = fit(recipe, tmp_path / "run").last_checkpoint
    stored = load_file(str(last / ckpt.MODEL_FILE))
    built = build_model(recipe).state_dict()
    # the head, and the BatchNorm statistics that `frozen_batchnorm: train` let change; no frozen weight
    assert {"heads.cls.0.weight", "heads.cls.0.bias"} <= set(stored)
    assert any(k.endswith("running_mean") for k in stored)
    assert not [k for k in stored if k.startswith("backbone.") and k.endswith("weight")]
    frozen = ckpt.read_meta(last)["frozen"]
    assert frozen["tensors"] == len(built) - len(stored) and len(frozen["sha256"]) == 64
    # the bundle is self-contained: every tensor, the frozen ones equal to the built model's
    bundle = load_file(str(export_run(tmp_path / "run") / "model.safetensors"))
    assert set(bundle) == set(built)
    assert all(torch.equal(bundle[k], built[k]) for k in built if k not in stored)
    assert all(torch.equal(bundle[k], stored[k]) for k in stored)


def test_resume_refuses_frozen_weights_that_changed(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from surgery.model import build_model
    from surgery.train import fit

    weights = tmp_path / "backbone.safetensors"
    probe = load_recipe_text(
        LEAN.format(weights=", pretrained: false", bn="eval").replace("surgery: [{input_channels: 1}]", "")
    )
    backbone = {
        k.removeprefix("backbone."): v for k, v in build_model(probe).state_dict().items() if k.startswith("backbone.")
    }
    save_file(backbone, str(weights))
    recipe = load_recipe_text(LEAN.format(weights=f", weights: {weights}", bn="eval"))
    fit(recipe, tmp_path / "run")
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in backbone.items()}, str(weights))
    longer = load_recipe_text(LEAN.format(weights=f", weights: {weights}", bn="eval").replace("epochs: 1", "epochs: 2"))
    with pytest.raises(CheckpointError, match=r"stores only what training changed; its \d+ frozen tensors .* refusing"):
        fit(longer, tmp_path / "run", resume=True)
