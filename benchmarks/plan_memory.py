"""`surgery plan`'s training-memory estimate against the peak measured while training (target:
within ±25%).

Measured: the peak bytes of live tensors during one training step (forward, backward, optimizer
step) of the recipe's model at its batch size, from the profiler's per-op allocations on top of
the weights, buffers and optimizer state already held: what CUDA's `max_memory_allocated`
counts, and what the estimate estimates. With `--rss`, also what `fit` itself logs on a CPU
(`system/peak_mib`: the process's peak resident memory growth in a fresh process, second epoch),
which adds the libraries, allocator caches and the monitoring `fit` loads on first use.

    python benchmarks/plan_memory.py [--rss]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

RECIPES = {
    "quickstart (test_resnet 16×16, batch 64, all trainable)": (
        "quickstart",
        ["train.epochs=2", "monitor.progress=none", "monitor.graph=false"],
    ),
    "resnet18 112×112, batch 32, all trainable": (
        "inline",
        """
name: plan-memory
backbone: {source: timm, name: resnet18}
input: {size: [112, 112]}
heads: [{name: cls, input: pooled, layers: [{linear: {out_features: 10}}], loss: cross_entropy}]
data: {source: synthetic, batch_size: 32, synthetic: {num_samples: 128, num_classes: 10}}
train: {epochs: 2, seed: 0, optimizer: {name: adamw, lr: 0.001}, cache_features: off}
monitor: {progress: none, graph: false, histograms: false, sample_predictions: 0}
""",
    ),
}


def tensor_peak(recipe: object) -> float:
    """Peak bytes of live tensors over one training step (after a first step, so the optimizer
    state exists): weights, buffers and optimizer state, plus the step's own allocations as the
    profiler records them op by op. On CUDA this is what `max_memory_allocated` counts."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from surgery.data import load_data
    from surgery.heads import compute_losses
    from surgery.model import build_model
    from surgery.optim import build_optimizer
    from surgery.placement import SingleDevice

    model = build_model(recipe)  # type: ignore[arg-type]
    data = load_data(recipe, model, SingleDevice(torch.device("cpu")))  # type: ignore[arg-type]
    inputs, targets = next(iter(data.train))
    optimizer = build_optimizer(model, recipe)  # type: ignore[arg-type]
    model.train()

    def step() -> None:
        loss, _ = compute_losses(model, model(*inputs), targets, recipe)  # type: ignore[arg-type]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    held += sum(
        t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)
    )
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return (held + peak) / 2**20


def fit_rss(recipe_arg: str, overrides: list[str], folder: Path) -> float:
    """`fit`'s own CPU figure: the second epoch's peak resident memory growth (fresh process)."""
    code = (
        "import sys; from surgery.recipe import load_recipe; from surgery.train import fit; "
        "fit(load_recipe(sys.argv[1], sys.argv[3:]), sys.argv[2])"
    )
    run = folder / "run"
    subprocess.run(
        [sys.executable, "-c", code, recipe_arg, str(run), *overrides],
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=1800,
    )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["system/peak_mib"] for r in rows if "system/peak_mib" in r][-1]


def main() -> None:
    from surgery.plan import make_plan
    from surgery.recipe import load_recipe

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rss", action="store_true", help="also train each recipe in a fresh process for fit's RSS figure"
    )
    args = parser.parse_args()
    print(
        "| recipe | plan's estimate | measured peak (live tensors, one step) | estimate ÷ measured | fit's RSS growth |"
    )
    print("| --- | --- | --- | --- | --- |")
    for name, (source, spec) in RECIPES.items():
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            if source == "quickstart":
                recipe_arg, overrides = str(ROOT / "recipes" / "quickstart.yaml"), list(spec)  # type: ignore[arg-type]
            else:
                recipe_arg, overrides = str(folder / "recipe.yaml"), []
                Path(recipe_arg).write_text(str(spec))
            recipe = load_recipe(recipe_arg, overrides)
            memory = make_plan(recipe, depth=1)["memory"]["per_device"]
            estimate = sum(entry["total"] for entry in memory.values()) / 2**20
            measured = tensor_peak(recipe)
            rss = f"{fit_rss(recipe_arg, overrides, folder):,.1f} MiB" if args.rss else "-"
        print(f"| {name} | {estimate:,.1f} MiB | {measured:,.1f} MiB | **{estimate / measured:.2f}** | {rss} |")


if __name__ == "__main__":
    main()
