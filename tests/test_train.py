"""The training loop: precision, accumulation, max_steps, early stopping, gradual unfreezing,
run folders."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from surgery.checkpoint import find_last, read_index, read_meta, trained_model
from surgery.errors import CheckpointError, ExportError, SurgeryError
from surgery.model import build_model
from surgery.recipe import load_recipe_text
from surgery.runs import run_folder
from surgery.train import fit
from surgery.train_state import TrainingDiverged

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


# --------------------------------------------------------------------------- non-finite steps


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_learning_rate_that_blows_up_stops_the_run_in_one_line(tmp_path: Path, precision: str) -> None:
    train = f"  precision: {precision}\n  clip_grad_norm: 0.5\n"
    blown = recipe(samples=64, epochs=2, train=train).model_copy(deep=True)
    blown.train.optimizer.lr = 1e30
    with pytest.raises(TrainingDiverged) as caught:
        fit(blown, tmp_path / "run")
    message = str(caught.value)
    assert "\n" not in message
    assert re.fullmatch(
        rf"training diverged in {precision}: step \d+ had a non-finite (loss|gradient norm) \(5 steps in a row\); "
        r"lower train\.optimizer\.lr, set or lower train\.clip_grad_norm, or .*",
        message,
    ), message
    # the run stopped before an epoch ended: nothing was checkpointed, so nothing can be exported
    with pytest.raises(CheckpointError):
        find_last(tmp_path / "run")


def test_a_non_finite_step_is_skipped_and_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import surgery.train_step

    calls = [0]
    real_forward = surgery.train_step.forward

    def poisoned(net, inputs):  # the third training batch is NaN: its forward updates BatchNorm with NaN
        calls[0] += 1
        if calls[0] == 3:
            inputs = tuple(x * float("nan") for x in inputs)
        return real_forward(net, inputs)

    monkeypatch.setattr(surgery.train_step, "forward", poisoned)
    result = fit(recipe(samples=32, epochs=1), tmp_path / "run")
    assert torch.isfinite(torch.tensor(result.metrics["val/loss"]))  # BatchNorm statistics were put back
    trainer = torch.load(result.last_checkpoint / "trainer.pt", weights_only=True)
    assert trainer["state"]["nonfinite_steps"] == 1 and trainer["state"]["nonfinite_in_a_row"] == 0
    weights = load_file(str(result.last_checkpoint / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(line["step"], line["train/nonfinite_steps"]) for line in lines if "train/nonfinite_steps" in line] == [
        (3, 1)
    ]


def test_non_finite_weights_are_never_checkpointed_nor_exported(tmp_path: Path) -> None:
    from surgery.export import export_bundle
    from surgery.train_state import check_finite_weights

    model = build_model(recipe())
    with torch.no_grad():
        model.heads.cls[0].weight[0, 0] = float("inf")
    with pytest.raises(TrainingDiverged, match=r"the weights became non-finite by step 7 \(heads\.cls\.0\.weight\)"):
        check_finite_weights(model, 7, "bf16")
    with pytest.raises(ExportError, match="weights are not finite"):
        export_bundle(model, recipe(), tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_fp16_overflow_is_the_scalers_until_its_scale_is_below_one() -> None:
    from surgery.placement import SingleDevice
    from surgery.train_step import nonfinite_part

    one = SingleDevice(torch.device("cpu"))
    finite, inf, nan = torch.tensor(1.0), torch.tensor(float("inf")), torch.tensor(float("nan"))
    assert nonfinite_part(finite, finite, one, precision="fp32", scale=1.0) is None
    assert nonfinite_part(nan, nan, one, precision="bf16", scale=1.0) == "loss"
    assert nonfinite_part(finite, inf, one, precision="fp32", scale=1.0) == "gradient norm"
    assert nonfinite_part(finite, inf, one, precision="fp16", scale=1024.0) is None  # GradScaler skips, recalibrates
    assert nonfinite_part(finite, inf, one, precision="fp16", scale=0.5) == "gradient norm"
    assert nonfinite_part(nan, inf, one, precision="fp16", scale=1024.0) == "loss"


# --------------------------------------------------------------------------- evaluation, ranking, patience


def test_unevaluated_checkpoints_are_resumable_but_never_ranked(tmp_path: Path) -> None:
    # 4 steps an epoch, a checkpoint every step: the mid-epoch ones of epoch 2 carry epoch 1's metrics
    train = "  checkpoint: {every_steps: 1, keep_best: 10}\n"
    fit(recipe(samples=32, epochs=2, train=train), tmp_path / "run")
    index = read_index(tmp_path / "run")
    assert sorted(name for name, _ in index["best"]) == ["step-00000004", "step-00000008"]
    # the end of an epoch that eval_every_epochs skips is not evaluated either
    train = "  eval_every_epochs: 2\n  checkpoint: {keep_best: 10}\n"
    fit(recipe(samples=32, epochs=3, train=train), tmp_path / "two")
    assert sorted(name for name, _ in read_index(tmp_path / "two")["best"]) == ["step-00000008", "step-00000012"]


def test_a_mid_epoch_checkpoint_says_it_was_not_evaluated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from surgery.export import export_command, export_run
    from surgery.train_state import Checkpointer

    class Killed(Exception):
        pass

    save = Checkpointer.save

    def save_then_die(self, state, *, evaluated):
        path = save(self, state, evaluated=evaluated)
        if state.step == 5:
            raise Killed  # the run dies right after its mid-epoch checkpoint
        return path

    monkeypatch.setattr(Checkpointer, "save", save_then_die)
    with pytest.raises(Killed):
        fit(recipe(samples=32, epochs=2, train="  checkpoint: {every_steps: 5, keep_best: 10}\n"), tmp_path / "run")
    mid = find_last(tmp_path / "run")
    meta = read_meta(mid)
    assert mid.name == "step-00000005" and meta["evaluated"] is False and "val/loss" in meta["metrics"]  # epoch 1's
    assert [name for name, _ in read_index(tmp_path / "run")["best"]] == ["step-00000004"]
    exported = json.loads((export_run(tmp_path / "run", ["safetensors"]) / "manifest.json").read_text())
    assert exported["source"].endswith("step-00000004")  # the best is the evaluated one, not the newest
    bundle = export_command(mid, ["safetensors"], tmp_path / "bundle")
    assert not [k for k in json.loads((bundle / "manifest.json").read_text())["metrics"] if k.startswith("val/")]


def test_patience_counts_epochs_when_evaluating_every_second_epoch(tmp_path: Path) -> None:
    # evaluations after epochs 2, 4, 6...: the first sets the best; after epoch 6, 4 epochs passed without
    # improvement, which spends a patience of 3 (counted in evaluations it would last until epoch 8)
    train = "  eval_every_epochs: 2\n  early_stopping: {monitor: val/loss, patience: 3, min_delta: 100.0}\n"
    result = fit(recipe(samples=16, epochs=10, train=train), tmp_path / "run")
    assert result.stopped_early
    assert read_meta(result.last_checkpoint)["epoch"] == 6
