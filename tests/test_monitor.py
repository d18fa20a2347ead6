"""TensorBoard events and metrics.jsonl, read back with TensorBoard's own reader."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from surgery.monitor import Progress
from surgery.recipe import load_recipe_text
from surgery.train import fit

RECIPE = """
name: mon
backbone: {source: timm, name: test_resnet, pretrained: false}
input: {size: [16, 16]}
surgery: [{input_channels: 1}]
heads:
  - {name: cls, layers: [{linear: {out_features: 3}}], loss: cross_entropy, metrics: [accuracy], labels: [a, b, c]}
data: {source: synthetic, batch_size: 8, synthetic: {num_samples: 48, num_classes: 3}}
train: {epochs: 2, optimizer: {name: sgd, lr: 0.05}, lr_groups: [{params: "heads.**", lr_scale: 2.0}]}
monitor: {progress: plain, log_every_steps: 2, sample_predictions: 4}
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    fit(load_recipe_text(RECIPE), run_dir)
    return run_dir


def test_tensorboard_scalars_histograms_images_graph(run: Path) -> None:
    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    scalars = set(tags["scalars"])
    expected = {
        "train/loss",
        "train/samples_per_s",
        "lr/scale_1",
        "lr/scale_2",
        "system/rss_mib",
        "val/loss",
        "val/cls/loss",
        "val/cls/accuracy",
    }
    assert expected <= scalars, expected - scalars
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6, 8, 10, 12]  # 6 steps/epoch, every 2
    assert [e.step for e in events.Scalars("val/cls/accuracy")] == [6, 12]  # once per epoch
    lrs = {e.step: e.value for e in events.Scalars("lr/scale_2")}
    assert lrs[2] == pytest.approx(0.1)  # base lr × the head group's lr_scale
    assert "weights/heads.cls.0.weight" in tags["histograms"] and "grads/heads.cls.0.weight" in tags["histograms"]
    assert [e.step for e in events.Images("val/predictions")] == [6, 12]
    assert tags["graph"] is True
    hparams = EventAccumulator(str(run / "tb" / "hparams"))
    hparams.Reload()
    assert "hparam/val/cls/accuracy" in hparams.Tags()["scalars"]


def test_metrics_jsonl_has_the_same_scalars(run: Path) -> None:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [line for line in lines if "train/loss" in line]
    assert [line["step"] for line in train] == [2, 4, 6, 8, 10, 12]
    assert {"train/samples_per_s", "lr/scale_1", "system/rss_mib", "epoch", "time"} <= set(train[0])
    val = [line for line in lines if "val/cls/accuracy" in line]
    assert [line["step"] for line in val] == [6, 12]
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert [round(e.value, 5) for e in events.Scalars("val/loss")] == [round(line["val/loss"], 5) for line in val]


def test_plain_progress_lines_and_summary(tmp_path: Path) -> None:
    stream = (tmp_path / "out.txt").open("w+")
    progress = Progress("auto", stream=stream)  # a file is not a terminal: plain lines
    assert progress.mode == "plain"
    progress.start_epoch(0, 2, 10)
    progress.update(5, {"train/loss": 0.5}, 123.0, log=True)
    progress.end_epoch({"val/loss": 0.25})
    progress.summary("run summary", {"val/loss": 0.25, "steps": 10})
    stream.seek(0)
    text = stream.read()
    assert "epoch 1/2 [5/10] loss 0.5  123 samples/s" in text
    assert re.search(r"epoch 1/2 done in [0-9.]+s  val/loss 0.25", text)
    assert "run summary" in text and re.search(r"steps +10", text)


def test_classification_reports_grad_norm_epoch_time_and_memory(run: Path) -> None:
    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    scalars = set(tags["scalars"])
    per_class = {f"val/cls/{kind}/{label}" for kind in ("precision", "recall", "f1") for label in "abc"}
    expected = {"train/grad_norm", "time/epoch_s", "system/peak_mib", "system/plan_estimate_mib", *per_class}
    assert expected <= scalars, expected - scalars
    assert all(e.value > 0 for e in events.Scalars("train/grad_norm"))
    assert [e.step for e in events.Images("val/cls/confusion_matrix")] == [6, 12]
    assert {"val/cls/pr/a", "val/cls/pr/b", "val/cls/pr/c"} <= set(tags["tensors"])  # PR curves
    # per-class recall, weighted by class size, is the accuracy
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "val/cls/recall/a" in r][-1]
    assert all(0.0 <= last[k] <= 1.0 for k in per_class)


def test_confusion_matrix_counts() -> None:
    import torch

    from surgery.metrics import confusion_matrix, per_class
    from surgery.monitor import confusion_image

    matrix = confusion_matrix(torch.tensor([0, 1, 1, 2, 2, 2]), torch.tensor([0, 1, 2, 2, 2, 0]), 3)
    assert matrix.tolist() == [[1, 0, 1], [0, 1, 0], [0, 1, 2]]  # rows: true class
    scores = per_class(matrix)
    assert scores["precision"].tolist() == pytest.approx([1.0, 0.5, 2 / 3])
    assert scores["recall"].tolist() == pytest.approx([0.5, 1.0, 2 / 3])
    image = confusion_image(matrix, ["zero", "one", "two"])
    assert image.shape[0] == 3 and float(image.min()) >= 0.0 and float(image.max()) <= 1.0


def test_wandb_offline_writes_its_run_files(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no `wandb login` netrc: `auto` means offline
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    text = RECIPE.replace("monitor: {", "monitor: {wandb: {project: surgery-test}, ").replace("epochs: 2", "epochs: 1")
    run_dir = tmp_path / "run"
    fit(load_recipe_text(text), run_dir)
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((run_dir / "wandb").rglob("*"))[:20]
    log = next(runs[0].glob("run-*.wandb")).read_bytes()
    for key in (b"train/loss", b"val/cls/accuracy", b"val/cls/confusion_matrix", b"surgery-test"):
        assert key in log, key
