"""Data-parallel training throughput on this machine, one recipe, three ways, in the same run:

1. one process (`strategy: single`) — the baseline;
2. DDP over 2 local processes (`strategy: ddp, workers: 2`, Gloo on CPU);
3. DDP over 2 Ray Train workers (`engine: ray`, a local Ray started for the run).

Each is a real `surgery build` (a subprocess, as a user runs it). The global batch is the same in
all three (DDP: half of it per worker), so every run takes the same optimizer steps. Throughput is
training samples per second between the first and last logged step in `metrics.jsonl` (process
start-up, model building, Ray start-up and export are excluded; validation between epochs is
included, the same work in all three). Runs alternate; the best of each is kept.

    python benchmarks/ddp_throughput.py [--repeats 2] [--epochs 3] [--size 32] [--batch 64]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RECIPE = """
name: bench-ddp
backbone: {{source: timm, name: resnet10t, pretrained: false}}
input: {{size: [{size}, {size}]}}
heads: [{{name: cls, layers: [{{linear: {{out_features: 10}}}}], loss: cross_entropy, metrics: [accuracy]}}]
data: {{source: synthetic, batch_size: {batch}, synthetic: {{num_samples: {samples}, num_classes: 10}}}}
train: {{epochs: {epochs}, seed: 0, optimizer: {{name: adamw, lr: 0.001}}}}
monitor: {{progress: none, log_every_steps: 4, graph: false, histograms: false, sample_predictions: 0}}
export: {{formats: [safetensors]}}
"""

WAYS = {
    "single process": [],
    "DDP, 2 local processes": ["placement.strategy=ddp", "placement.workers=2", "placement.device=cpu"],
    "DDP, 2 Ray Train workers": [
        "placement.strategy=ddp",
        "placement.workers=2",
        "placement.device=cpu",
        "placement.engine=ray",
    ],
}


def throughput(run: Path, global_batch: int) -> float:
    """Samples/s between the first and the last logged training step."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r]
    first, last = train[0], train[-1]
    return (last["step"] - first["step"]) * global_batch / max(1e-9, last["time"] - first["time"])


def build(recipe: Path, overrides: list[str], runs: Path) -> Path:
    """`surgery build RECIPE --set ...` in a subprocess; the run folder it made."""
    command = [str(Path(sys.executable).parent / "surgery"), "build", str(recipe), "--runs", str(runs)]
    for override in overrides:
        command += ["--set", override]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    name = next(line.split(":", 1)[1].strip() for line in recipe.read_text().splitlines() if line.startswith("name:"))
    return (runs / name / "latest").resolve()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--size", type=int, default=32, help="image side")
    parser.add_argument("--batch", type=int, default=64, help="global batch (DDP: half per worker)")
    parser.add_argument("--samples", type=int, default=2048)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="ddp-bench-"))
    try:
        recipe = folder / "bench.yaml"
        recipe.write_text(RECIPE.format(size=args.size, batch=args.batch, samples=args.samples, epochs=args.epochs))
        best: dict[str, float] = {}
        for _ in range(args.repeats):
            for way, overrides in WAYS.items():
                per_worker = args.batch // 2 if overrides else args.batch
                run = build(recipe, [*overrides, f"data.batch_size={per_worker}"], folder / "runs")
                best[way] = max(best.get(way, 0.0), throughput(run, args.batch))
        base = best["single process"]
        local = best["DDP, 2 local processes"]
        print(
            f"resnet10t {args.size}×{args.size}, global batch {args.batch}, {args.samples} samples, {os.cpu_count()} CPUs"
        )
        print(f"{'':28} {'samples/s':>10} {'vs single':>10} {'vs local DDP':>13}")
        for way, value in best.items():
            print(f"{way:28} {value:10.1f} {value / base:9.2f}× {value / local:12.3f}×")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
