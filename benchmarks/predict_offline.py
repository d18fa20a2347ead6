"""Offline batch prediction: `surgery predict` against what people write by hand, same images,
same model, same machine, in one run.

(b) `surgery.predict` (local engine, `predict_local`: bundle load, decode, batches, top-k, CSV)
    vs a timm-style `inference.py` loop: `ImageFolder`-like dataset + `DataLoader` (the same
    workers) + model forward + top-k written to CSV. Target: ≥ 0.9× its images/s.
(c) the same job on Ray Data with 2 actors (`--engine ray`, a local Ray started for it, its start
    included) vs the local engine.

Images are 16×16 PNGs in one folder; the model is the quickstart's test_resnet at 16×16, untrained
(speed does not depend on the weights). Run:

    python benchmarks/predict_offline.py [--images 20000] [--batch-size 256] [--workers auto] [--small]

`--small` (200 images, one repeat) only checks that the script runs.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RECIPE = """
name: bench-predict
backbone: {source: timm, name: test_resnet, pretrained: false}
input: {size: [16, 16]}
surgery: [{input_channels: 1}]
heads: [{name: digit, layers: [{linear: {out_features: 10}}], loss: cross_entropy,
         labels: ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]}]
"""


def make_images(folder: Path, count: int) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8), "L").save(folder / f"{i:06d}.png")


def timm_style(bundle: Path, folder: Path, out: Path, batch_size: int, workers: int, top_k: int) -> None:
    """What timm's `inference.py` does: a dataset of files, a DataLoader, forward, top-k, CSV."""
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset

    from surgery.bundle import load_bundle
    from surgery.preprocess import image_eval_transform

    loaded = load_bundle(bundle)
    model, transform = loaded.model.eval(), image_eval_transform(loaded.input_spec)
    labels = loaded.manifest["heads"][0]["labels"]
    files = sorted(folder.iterdir())

    class Files(Dataset):
        def __len__(self) -> int:
            return len(files)

        def __getitem__(self, i: int):
            with Image.open(files[i]) as image:
                return transform(image.convert("L"))

    loader = DataLoader(Files(), batch_size=batch_size, num_workers=workers, shuffle=False)
    with out.open("w", newline="") as f, torch.inference_mode():
        writer = csv.writer(f)
        writer.writerow(["filename", *[f"label_{i}" for i in range(top_k)], *[f"prob_{i}" for i in range(top_k)]])
        done = 0
        for batch in loader:
            probs = model(batch)["digit"].softmax(-1)
            top = probs.topk(top_k, dim=-1)
            for j in range(len(batch)):
                idx = top.indices[j].tolist()
                writer.writerow([files[done + j].name, *[labels[i] for i in idx], *top.values[j].tolist()])
            done += len(batch)


def timed(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", default="auto", help="DataLoader workers for both (auto: surgery's choice)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-ray", action="store_true", help="skip (c)")
    parser.add_argument("--small", action="store_true", help="200 images, one repeat: a smoke run")
    args = parser.parse_args()
    if args.small:
        args.images, args.repeats = 200, 1

    import torch

    from surgery.data_loaders import auto_num_workers
    from surgery.export import export_bundle
    from surgery.model import build_model
    from surgery.predict import PredictSettings, predict_local
    from surgery.recipe import load_recipe_text

    workers = auto_num_workers("auto", torch.device("cpu")) if args.workers == "auto" else int(args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        recipe = load_recipe_text(RECIPE)
        bundle = export_bundle(
            build_model(recipe, load_weights=False), recipe, root / "bundle", formats=["safetensors"]
        )
        make_images(root / "images", args.images)
        settings = PredictSettings(top_k=5, batch_size=args.batch_size, workers=workers)
        ours, theirs = [], []
        for _ in range(args.repeats):  # alternate, so drift on a shared machine hits both
            theirs.append(
                timed(lambda: timm_style(bundle, root / "images", root / "t.csv", args.batch_size, workers, 5))
            )
            ours.append(timed(lambda: predict_local(bundle, [str(root / "images")], root / "s.csv", settings)))
        t_ours, t_theirs = min(ours), min(theirs)
        print(
            f"images {args.images}, batch {args.batch_size}, workers {workers}, torch threads {torch.get_num_threads()}"
        )
        print(f"(b) timm-style inference loop  {args.images / t_theirs:9.0f} images/s  ({t_theirs:.2f}s)")
        print(f"    surgery predict (local)    {args.images / t_ours:9.0f} images/s  ({t_ours:.2f}s)  "
              f"= {t_theirs / t_ours:.2f}x")  # fmt: skip
        if args.no_ray:
            return
        from surgery.predict_ray import predict_on_ray

        t_ray = timed(lambda: predict_on_ray(bundle, [str(root / "images")], root / "r.csv", settings, 2))
        print(f"(c) Ray Data, 2 actors         {args.images / t_ray:9.0f} images/s  ({t_ray:.2f}s, Ray start included)  "
              f"= {t_ours / t_ray:.2f}x local")  # fmt: skip


if __name__ == "__main__":
    main()
