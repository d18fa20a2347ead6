"""Out-of-memory recovery, with the error injected on a CPU: a forward pre-hook raising
`torch.OutOfMemoryError` for batches above a size, as a device too small for them would."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import surgery.model
from surgery.checkpoint import find_last
from surgery.errors import SurgeryError
from surgery.recipe import load_recipe_text
from surgery.train import fit

BASE = """
name: oom
backbone: {{source: timm, name: test_resnet, pretrained: false}}
input: {{size: [16, 16]}}
surgery: [{{input_channels: 1}}]
heads:
  - {{name: cls, layers: [{{linear: {{out_features: 3}}}}], loss: cross_entropy, metrics: [accuracy]}}
data: {{source: synthetic, batch_size: {batch}, synthetic: {{num_samples: 48, num_classes: 3}}}}
train:
  epochs: {epochs}
  seed: 5
  accumulate: {accumulate}
  optimizer: {{name: adamw, lr: 0.01}}
  scheduler: {{name: cosine, warmup_steps: 2}}
monitor: {{progress: plain, log_every_steps: 1, graph: false, histograms: false, sample_predictions: 0}}
"""


def recipe(batch: int = 8, accumulate: int = 1, epochs: int = 1):
    return load_recipe_text(BASE.format(batch=batch, accumulate=accumulate, epochs=epochs))


@pytest.fixture
def memory_for(monkeypatch):
    """`memory_for(n)`: from now on, models built can only take batches of at most n samples."""

    def limit(most: int) -> None:
        build = surgery.model.build_model

        def small_device_model(*args, **kwargs):
            model = build(*args, **kwargs)

            def check(module, inputs):
                if inputs[0].shape[0] > most:
                    raise torch.OutOfMemoryError(
                        f"CUDA out of memory. Tried to allocate 2.00 GiB (batch {inputs[0].shape[0]})"
                    )

            next(model.backbone.children()).register_forward_pre_hook(check)  # the stem: before any BatchNorm
            return model

        monkeypatch.setattr(surgery.model, "build_model", small_device_model)

    return limit


def test_out_of_memory_halves_micro_batch_and_trains_as_the_finer_split_would(
    tmp_path: Path, memory_for, capsys
) -> None:
    reference = fit(recipe(batch=3, accumulate=4), tmp_path / "reference")  # micro-batch 3 × 4 from the start
    memory_for(3)  # batches of 12 do not fit; halving twice gives 3
    run = fit(recipe(batch=12, accumulate=1), tmp_path / "run")
    trained, expected = (
        load_file(str(run.last_checkpoint / "model.safetensors")),
        load_file(str(reference.last_checkpoint / "model.safetensors")),
    )
    assert trained.keys() == expected.keys()
    for name in trained:
        torch.testing.assert_close(trained[name], expected[name], rtol=1e-5, atol=1e-6)
    err = capsys.readouterr().err
    assert (
        "out of memory on cpu at step 1: micro-batch 12 → 6, accumulating 2 per step (effective batch 12 unchanged)"
        in err
    )
    assert "micro-batch 6 → 3, accumulating 4 per step" in err
    assert "out-of-memory retries" in err and "micro-batch (samples)" in err  # the run summary
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["train/micro_batch"] for row in logged if "train/micro_batch" in row] == [6, 3]
    state = torch.load(run.last_checkpoint / "trainer.pt", weights_only=True)["state"]
    assert state["micro_split"] == 4 and state["oom_retries"] == 2


def test_the_split_is_run_state_honoured_on_resume(tmp_path: Path, memory_for, capsys) -> None:
    memory_for(4)
    fit(recipe(batch=8, epochs=1), tmp_path / "run")
    capsys.readouterr()
    fit(recipe(batch=8, epochs=2), tmp_path / "run", resume=True)  # still too small: the split carries over
    assert "out of memory" not in capsys.readouterr().err
    state = torch.load(find_last(tmp_path / "run") / "trainer.pt", weights_only=True)["state"]
    assert state["micro_split"] == 2 and state["epoch"] == 2


def test_out_of_memory_at_micro_batch_one_says_what_to_change(tmp_path: Path, memory_for) -> None:
    memory_for(0)
    with pytest.raises(SurgeryError, match=r"even with micro-batches of 1 sample .* Freeze more of it .* bf16"):
        fit(recipe(batch=4), tmp_path / "run")
