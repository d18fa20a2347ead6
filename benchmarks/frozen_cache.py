"""Frozen-backbone training with the feature cache against the same run without it (target: an
epoch ≥ 10× faster, the same metrics).

A resnet18 (random weights: the timing and the equality don't depend on them) with
`freeze: ["backbone.**"]` and a linear head on `pooled`, trained on synthetic 224×224 images.
Both runs are `fit` on the same recipe, `train.cache_features: off` then `on`, alternating when
`--repeats` > 1. An epoch is what the run's `metrics.jsonl` reports as `time/epoch_s` (training
steps) plus the validation pass after it; the cached run's one-off cost of computing the
features is reported separately.

    python benchmarks/frozen_cache.py [--samples 256] [--epochs 3] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from surgery.recipe import load_recipe_text
from surgery.train import fit

RECIPE = """
name: frozen-cache
backbone: {{source: timm, name: resnet18, pretrained: false}}  # offline: the frozen weights' values do not matter here
freeze: ["backbone.**"]
heads: [{{name: cls, input: pooled, layers: [{{linear: {{out_features: 10}}}}], loss: cross_entropy, metrics: [accuracy, f1_macro]}}]
data: {{source: synthetic, batch_size: 32, synthetic: {{num_samples: {samples}, num_classes: 10}}}}
train: {{epochs: {epochs}, seed: 0, optimizer: {{name: adamw, lr: 0.001}}, cache_features: {cache}}}
monitor: {{progress: none, log_every_steps: 1000, graph: false, histograms: false, sample_predictions: 0}}
"""


def one_run(cache: str, samples: int, epochs: int, root: Path) -> dict[str, float | list[float]]:
    recipe = load_recipe_text(RECIPE.format(samples=samples, epochs=epochs, cache=cache))
    run = root / cache
    started = time.perf_counter()
    result = fit(recipe, run)
    total = time.perf_counter() - started
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_s = [r["time/epoch_s"] for r in rows if "time/epoch_s" in r]
    # the validation pass: from the epoch-time row to the metrics row of the same step
    starts = {r["step"]: r["time"] for r in rows if "time/epoch_s" in r}
    val_s = [r["time"] - starts[r["step"]] for r in rows if "val/loss" in r and r["step"] in starts]
    shutil.rmtree(run)
    return {
        "total_s": total,
        "epoch_s": [t + v for t, v in zip(train_s, val_s, strict=False)],
        **{k: v for k, v in result.metrics.items() if k.startswith("val/")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for cache in ("off", "on"):
                runs[cache].append(one_run(cache, args.samples, args.epochs, Path(tmp)))
    off, on = runs["off"][0], runs["on"][0]
    # steady epochs: the cached run's first epoch already trains on cached features (the cache is
    # built before it); every epoch of both runs counts, best repeat kept
    epoch_off = min(min(r["epoch_s"]) for r in runs["off"])
    epoch_on = min(min(r["epoch_s"]) for r in runs["on"])
    build = min(r["total_s"] for r in runs["on"]) - sum(on["epoch_s"])
    print(f"resnet18 frozen + linear head, {args.samples} samples 224×224, batch 32, {args.epochs} epochs")
    print(f"epoch without cache: {epoch_off:.3f} s; with cache: {epoch_on:.4f} s; speed-up {epoch_off / epoch_on:.0f}×")
    print(
        f"whole run: {min(r['total_s'] for r in runs['off']):.1f} s without, {min(r['total_s'] for r in runs['on']):.1f} s "
        f"with (computing the cache and everything else outside epochs: {build:.1f} s)"
    )
    for key in sorted(k for k in off if k.startswith("val/")):
        print(f"{key}: {off[key]:.6f} without, {on[key]:.6f} with (difference {abs(off[key] - on[key]):.2e})")


if __name__ == "__main__":
    main()
