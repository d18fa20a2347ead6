"""`surgery build`'s checks before a run folder exists: what `fit` would refuse once started is
refused first, in one line, with no folder made and `latest` untouched."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from surgery.build import build_command
from surgery.errors import SurgeryError

RECIPE = """
name: prechecked
backbone: {source: timm, name: test_resnet, pretrained: false}
input: {size: [16, 16]}
heads: [{name: cls, layers: [{linear: {out_features: 2}}], loss: cross_entropy}]
data: {source: synthetic, batch_size: 8, synthetic: {num_samples: 16, num_classes: 2}}
train: {epochs: 1}
monitor: {progress: none, graph: false, histograms: false, sample_predictions: 0}
"""


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["train.precision=fp16"],
            r"train\.precision fp16 needs a CUDA device \(this run is on cpu\); use bf16 or fp32",
        ),
        (
            ["train.cache_features=on"],  # nothing is frozen: the backbone trains before the heads' taps
            r"train\.cache_features is on, but caching the heads' inputs would not be exact: trainable parameters",
        ),
    ],
)
def test_settings_fit_refuses_are_refused_before_any_run_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overrides: list[str], message: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = tmp_path / "prechecked.yaml"
    path.write_text(RECIPE)
    with pytest.raises(SurgeryError, match=message) as info:
        build_command(path, overrides, runs_root=tmp_path / "runs")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "runs").exists()
