"""`surgery build quickstart` end to end through the CLI: accuracy, time, and the run folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from surgery.checkpoint import find_best, read_meta
from surgery.recipe import load_recipe


@pytest.mark.slow
def test_quickstart_builds_offline_to_97_percent(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "cli", "build", "quickstart", "--runs", str(tmp_path / "runs"), "--run-id", "first"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=Path(__file__).resolve().parents[1],
    )
    elapsed = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "quickstart" / "first"
    assert f"run: {run}" in done.stdout
    # the run folder layout
    assert {"recipe.lock.yaml", "checkpoints", "tb", "metrics.jsonl", "bundle"} <= {p.name for p in run.iterdir()}
    assert load_recipe(run / "recipe.lock.yaml") == load_recipe("quickstart")
    lock = (run / "recipe.lock.yaml").read_text()
    assert "# packages: python" in lock and "torch" in lock
    best = find_best(run)
    accuracy = read_meta(best)["metrics"]["val/digit/accuracy"]
    assert accuracy >= 0.97, accuracy
    manifest = json.loads((run / "bundle" / "manifest.json").read_text())
    assert manifest["heads"][0]["labels"] == [str(i) for i in range(10)]
    assert "model.safetensors" in manifest["files"]
    assert (run / "bundle" / "model.onnx").is_file()
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val/digit/accuracy" in line for line in lines)
    assert (run.parent / "latest").resolve() == run.resolve()
    print(f"quickstart: accuracy {accuracy:.4f} in {elapsed:.1f}s")
