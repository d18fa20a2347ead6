"""Data loading on the CPU: surgery's image pipeline against a hand-written torchvision
`ImageFolder` + `DataLoader` loop, and how start-up cost grows with the number of rows.

(a) images: a folder of 16×16 PNGs in 10 class folders (20,000; `--small`: 2,000), generated into a
    temporary folder. For surgery (`load_data` over `image_folder`, its `num_workers` default and
    each of 0/1/2) and for the baseline (`ImageFolder` + `DataLoader`, each of 0/1/2 workers, its
    best kept): time to the first training step (loading, listing, checking, first batch, one
    step of a tiny ResNet) and training samples/s over one epoch of that model. Each surgery run
    is a first build (its image checks not yet remembered); one more, "rebuild", runs after them.
(b) scale: `load_data` of a CSV of 4 feature columns + a label with 2k / 20k / 200k rows
    (`--small`: 2k / 20k), each in a fresh process: start-up seconds and peak RSS.

    python benchmarks/data_loading.py [--small] [--json]

It reports; it asserts nothing (see DESIGN.md). Numbers depend on the machine's idle cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RECIPE = """
name: bench-data
backbone: {{source: timm, name: test_resnet, pretrained: false}}
input: {{size: [16, 16]}}
heads: [{{name: cls, layers: [{{linear: {{out_features: 10}}}}], loss: cross_entropy}}]
data: {{source: image_folder, train: {train}, val_split: 0.05, batch_size: 64, num_workers: {workers}}}
train: {{epochs: 1, seed: 0, optimizer: {{name: adamw, lr: 0.001}}}}
"""

TABLE_RECIPE = """
name: bench-table
backbone: {{source: tabular, name: mlp, pretrained: false, kwargs: {{features: 4}}}}
heads: [{{name: cls, layers: [{{linear: {{out_features: 3}}}}], loss: cross_entropy}}]
data: {{source: csv, train: {train}, feature_columns: [a, b, c, d], batch_size: 256}}
"""


def make_images(root: Path, n: int) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"c{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def _steps(model: Any, batches: Any, started: float) -> tuple[float, float]:
    """(seconds to the first step, samples/s after it) of one epoch of AdamW steps."""
    import torch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    first, samples, after = None, 0, 0.0
    for inputs, target in batches:
        loss = torch.nn.functional.cross_entropy(model(*inputs), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if first is None:
            first, after = time.perf_counter() - started, time.perf_counter()
        else:
            samples += len(target)
    return float(first or 0.0), samples / max(time.perf_counter() - after, 1e-9)


def surgery_images(train: Path, workers: int | str) -> tuple[float, float]:
    import torch

    from surgery.data import load_data
    from surgery.model import build_model
    from surgery.placement import SingleDevice
    from surgery.recipe import load_recipe_text

    recipe = load_recipe_text(RECIPE.format(train=train, workers=workers))
    model = build_model(recipe)
    started = time.perf_counter()
    data = load_data(recipe, model, SingleDevice(torch.device("cpu")))
    net = _Head(model)
    return _steps(net, ((inputs, targets["cls"]) for inputs, targets in data.train), started)


class _Head:
    """The model's one head as a callable returning logits (what the loss reads)."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, *inputs: Any) -> Any:
        return self.model(*inputs)["cls"]

    def parameters(self) -> Any:
        return self.model.parameters()


def baseline_images(train: Path, workers: int) -> tuple[float, float]:
    import timm
    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    model = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    started = time.perf_counter()
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    folder = datasets.ImageFolder(str(train), transform=tf)
    loader = DataLoader(
        folder, batch_size=64, shuffle=True, num_workers=workers, generator=torch.Generator().manual_seed(0)
    )
    return _steps(_Plain(model), (((x,), y) for x, y in loader), started)


class _Plain:
    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, *inputs: Any) -> Any:
        return self.model(*inputs)

    def parameters(self) -> Any:
        return self.model.parameters()


def scale_child(rows: int, folder: str) -> None:
    """In a fresh process: write the table, then time `load_data` and report peak RSS."""
    import random

    import torch

    from surgery.data import load_data
    from surgery.model import build_model
    from surgery.placement import SingleDevice
    from surgery.recipe import load_recipe_text

    path = Path(folder) / f"t{rows}.csv"
    rng = random.Random(0)
    with path.open("w") as f:
        f.write("a,b,c,d,label\n")
        for i in range(rows):
            f.write(f"{rng.random():.4f},{rng.random():.4f},{rng.random():.4f},{rng.random():.4f},k{i % 3}\n")
    recipe = load_recipe_text(TABLE_RECIPE.format(train=path))
    model = build_model(recipe)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    load_data(recipe, model, SingleDevice(torch.device("cpu")))
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "rows": rows,
                "startup_s": round(seconds, 3),
                "peak_rss_mib": round(peak / 1024, 1),
                "growth_mib": round((peak - before) / 1024, 1),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="2,000 images; scale rows 2k and 20k")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--scale-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scale_child:
        scale_child(args.scale_child, args.folder)
        return
    images = 2_000 if args.small else 20_000
    rows = [2_000, 20_000] if args.small else [2_000, 20_000, 200_000]
    results: dict[str, Any] = {"images": images}
    with tempfile.TemporaryDirectory() as tmp:
        train = make_images(Path(tmp) / "train", images)
        baseline_images(train, 0)  # warm-up, untimed: torch's first steps and the page cache, for both sides
        results["surgery"] = {}
        for w in ("auto", 0, 1, 2):  # each as a first build: no image checks remembered
            os.environ["SURGERY_CACHE_DIR"] = tempfile.mkdtemp(dir=tmp)
            results["surgery"][str(w)] = surgery_images(train, w)
        results["surgery_again"] = surgery_images(train, "auto")  # a rebuild: the checks remembered
        results["baseline"] = {str(w): baseline_images(train, w) for w in (0, 1, 2)}
        results["scale"] = [
            json.loads(
                subprocess.run(
                    [sys.executable, __file__, "--scale-child", str(n), "--folder", tmp],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            for n in rows
        ]
    if args.json:
        print(json.dumps(results, indent=2))
        return
    best = max(results["baseline"].items(), key=lambda kv: kv[1][1])
    print(f"images: {images} 16×16 PNG, batch 64, test_resnet, CPU")
    print(f"{'loop':<28}{'first step (s)':>16}{'samples/s':>12}")
    for name, (first, rate) in results["surgery"].items():
        print(f"{'surgery num_workers=' + name:<28}{first:>16.2f}{rate:>12.0f}")
    for name, (first, rate) in results["baseline"].items():
        mark = " (best)" if name == best[0] else ""
        print(f"{'ImageFolder workers=' + name + mark:<28}{first:>16.2f}{rate:>12.0f}")
    again = results["surgery_again"]
    print(f"{'surgery auto, rebuild':<28}{again[0]:>16.2f}{again[1]:>12.0f}")
    print(f"surgery auto / best baseline samples/s: {results['surgery']['auto'][1] / best[1][1]:.2f}×")
    print(
        f"time to first step, best baseline / surgery auto: first build {best[1][0] / results['surgery']['auto'][0]:.2f}×, "
        f"rebuild {best[1][0] / again[0]:.2f}×"
    )
    print(f"{'rows':>8}{'start-up (s)':>14}{'peak RSS (MiB)':>16}{'growth (MiB)':>14}")
    for row in results["scale"]:
        print(f"{row['rows']:>8}{row['startup_s']:>14.2f}{row['peak_rss_mib']:>16.0f}{row['growth_mib']:>14.0f}")


if __name__ == "__main__":
    main()
