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
