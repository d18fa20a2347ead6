"""Placement on GPUs, bf16: one GPU vs DDP over every GPU vs a two-stage pipeline (4 micro-batches),
same recipe, same global batch, each a real `surgery build`. Prepared for a machine with GPUs; no
test needs it. With one GPU, DDP runs 1 worker and both pipeline stages share `cuda:0`: the
figures then show each strategy's overhead, not its speed-up.

Throughput is measured as in `ddp_throughput.py` (samples/s between the first and last logged
step of `metrics.jsonl`); peak memory comes from the `system/cuda_*` scalars fit logs (rank 0, first stage).

    python benchmarks/gpu_placement.py [--model resnet50] [--size 224] [--batch 128] [--samples 8192]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddp_throughput import build, throughput

RECIPE = """
name: bench-gpu
backbone: {{source: timm, name: {model}, pretrained: false}}
input: {{size: [{size}, {size}]}}
heads: [{{name: cls, layers: [{{linear: {{out_features: 10}}}}], loss: cross_entropy, metrics: [accuracy]}}]
data: {{source: synthetic, batch_size: {batch}, num_workers: 4, synthetic: {{num_samples: {samples}, num_classes: 10}}}}
train: {{epochs: {epochs}, seed: 0, precision: bf16, optimizer: {{name: adamw, lr: 0.001}}}}
monitor: {{progress: none, log_every_steps: 8, graph: false, histograms: false, sample_predictions: 0}}
export: {{formats: [safetensors]}}
"""


def peak_memory(run: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    peaks: dict[str, float] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("system/cuda"):
                peaks[key] = max(peaks.get(key, 0.0), float(value))
    return peaks


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=128, help="global batch")
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    gpus = torch.cuda.device_count()
    if gpus == 0:
        raise SystemExit("no CUDA device: this benchmark needs a GPU")
    second = "cuda:1" if gpus > 1 else "cuda:0"
    ways = {
        "single GPU": [f"data.batch_size={args.batch}"],
        f"DDP ×{gpus}": [
            "placement.strategy=ddp",
            f"placement.workers={gpus}",
            "placement.device=cuda",
            f"data.batch_size={args.batch // gpus}",
        ],
        f"pipeline cuda:0 + {second}, 4 micro-batches": [
            "placement.strategy=pipeline",
            "placement.micro_batches=4",
            "placement.stages=[{modules: [backbone.conv1..backbone.layer2], device: 'cuda:0'}, "
            f"{{modules: [backbone.layer3..backbone.fc, heads], device: '{second}'}}]",
            f"data.batch_size={args.batch}",
        ],
    }
    folder = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    try:
        recipe = folder / "bench.yaml"
        recipe.write_text(RECIPE.format(**vars(args)))
        results = {}
        for way, overrides in ways.items():
            run = build(recipe, overrides, folder / "runs")
            results[way] = (throughput(run, args.batch), peak_memory(run))
        base = results["single GPU"][0]
        print(f"{args.model} {args.size}², bf16, global batch {args.batch}, {gpus} × {torch.cuda.get_device_name(0)}")
        for way, (value, memory) in results.items():
            print(f"{way:44} {value:9.1f} samples/s {value / base:6.2f}×  {json.dumps(memory)}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
