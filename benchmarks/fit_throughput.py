"""`fit` throughput against a minimal hand-written PyTorch loop, same model, data and batch size,
in the same process (target: ≥ 0.95×).

The baseline is what one would write by hand: a DataLoader over the same tensors, AdamW,
cross-entropy, backward, step, plus one validation pass per epoch. `fit` does the same work and
also checkpoints every epoch (atomically, fsynced), logs TensorBoard scalars, histograms and
metrics.jsonl, and keeps its data order resumable. Both are timed over their training epochs
(model building excluded); the runs alternate and the best of each is kept.

    python benchmarks/fit_throughput.py [--repeats 2] [--epochs 2] [--samples 2048]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from surgery.data import load_data
from surgery.model import build_model
from surgery.placement import SingleDevice
from surgery.recipe import load_recipe_text
from surgery.train import fit, seed_everything

RECIPE = """
name: bench
backbone: {{source: timm, name: resnet10t, pretrained: false}}
input: {{size: [32, 32]}}
heads: [{{name: cls, layers: [{{linear: {{out_features: 10}}}}], loss: cross_entropy, metrics: [accuracy]}}]
data: {{source: synthetic, batch_size: {batch}, synthetic: {{num_samples: {samples}, num_classes: 10}}}}
train: {{epochs: {epochs}, seed: 0, optimizer: {{name: adamw, lr: 0.001}}}}
monitor: {{progress: none, log_every_steps: 8, graph: false}}
"""


def hand_written(recipe, epochs: int) -> tuple[float, int, float]:
    """Seconds for `epochs` of a plain loop (+ a validation pass each epoch), samples trained, and
    samples/s of the training steps alone."""
    seed_everything(recipe.train.seed)
    model = build_model(recipe)
    data = load_data(recipe, model, SingleDevice(torch.device("cpu")))
    (x,), y = data.train.dataset.examples.inputs, data.train.dataset.examples.targets["cls"]
    (vx,), vy = data.val.dataset.examples.inputs, data.val.dataset.examples.targets["cls"]
    train = DataLoader(
        TensorDataset(x, y), batch_size=recipe.data.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    val = DataLoader(TensorDataset(vx, vy), batch_size=recipe.data.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.train.optimizer.lr)
    started = time.perf_counter()
    in_loop = 0.0
    for _ in range(epochs):
        model.train()
        epoch_start = time.perf_counter()
        for inputs, targets in train:
            loss = F.cross_entropy(model(inputs)["cls"], targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        in_loop += time.perf_counter() - epoch_start
        model.eval()
        with torch.inference_mode():
            for inputs, targets in val:
                F.cross_entropy(model(inputs)["cls"], targets)
    return time.perf_counter() - started, epochs * len(x), epochs * len(x) / in_loop


def with_fit(recipe, epochs: int) -> tuple[float, int, float]:
    """Seconds `fit` spends past building the model and data (measured by doing just that), the
    samples trained, and fit's own in-loop samples/s."""
    run = Path(tempfile.mkdtemp(prefix="bench-fit-"))
    try:
        started = time.perf_counter()
        seed_everything(recipe.train.seed)
        model = build_model(recipe)
        load_data(recipe, model, SingleDevice(torch.device("cpu")))
        setup = time.perf_counter() - started
        started = time.perf_counter()
        fit(recipe, run)
        total = time.perf_counter() - started
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        in_loop = [line["train/samples_per_s"] for line in lines if "train/samples_per_s" in line]
        return total - setup, epochs * recipe.data.synthetic.num_samples, sum(in_loop) / max(1, len(in_loop))
    finally:
        shutil.rmtree(run, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--samples", type=int, default=2048)
    args = parser.parse_args()
    recipe = load_recipe_text(RECIPE.format(batch=args.batch, samples=args.samples, epochs=args.epochs))
    base_best, fit_best, loop_best, base_loop_best = float("inf"), float("inf"), 0.0, 0.0
    for _ in range(args.repeats):
        seconds, samples, base_loop = hand_written(recipe, args.epochs)
        base_best = min(base_best, seconds)
        base_loop_best = max(base_loop_best, base_loop)
        seconds, samples, in_loop = with_fit(recipe, args.epochs)
        fit_best = min(fit_best, seconds)
        loop_best = max(loop_best, in_loop)
    base_rate, fit_rate = samples / base_best, samples / fit_best
    print(
        f"model resnet10t 32x32, batch {args.batch}, {args.samples} samples x {args.epochs} epochs, {torch.get_num_threads()} threads"
    )
    print(f"hand-written loop: {base_rate:8.1f} samples/s ({base_best:.2f}s)")
    print(f"fit:               {fit_rate:8.1f} samples/s ({fit_best:.2f}s, incl. checkpoints, TensorBoard, validation)")
    print(
        f"training steps only: fit {loop_best:.1f} samples/s (its train/samples_per_s) vs hand-written {base_loop_best:.1f}"
    )
    print(
        f"ratio fit / hand-written: {fit_rate / base_rate:.3f} end to end, {loop_best / base_loop_best:.3f} training steps only"
    )


if __name__ == "__main__":
    main()
