"""Eager torch on CUDA against ONNX Runtime's CUDA execution provider, same bundle, same process.
Prepared for a machine with a GPU and `onnxruntime-gpu`; no test needs it.

A torchvision model (random weights: speed does not depend on them) is exported with
`model.onnx`; both runtimes come from `surgery.runtimes` (what serving and batch prediction use),
opened with `device="cuda"`. Each batch size is timed as the fastest of N alternating forwards,
inputs from host memory and outputs back to it (what a replica does), and the largest difference
between the two runtimes' outputs is reported next to the bundle's export tolerance (torch's
TF32 convolutions may exceed it; say so rather than hide it).

    python benchmarks/gpu_runtime.py [--model resnet18] [--size 224] [--batches 1,16,64] [--repeats 30]

Reports; asserts nothing. Without a CUDA device or the CUDA execution provider it says which is
missing and exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

RECIPE = """
name: gpu-runtime
backbone: {{source: torchvision, name: {model}, pretrained: false}}
input: {{size: [{size}, {size}]}}
heads: [{{name: cls, input: logits, layers: [{{linear: {{out_features: 10}}}}], loss: cross_entropy}}]
export: {{formats: [safetensors, onnx]}}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cuda", help="cuda or cuda:N")
    opts = parser.parse_args()

    import torch

    from surgery.bundle import load_bundle
    from surgery.errors import SurgeryError
    from surgery.export import export_bundle
    from surgery.model import build_model
    from surgery.recipe import load_recipe_text
    from surgery.runtimes import ONNXRUNTIME, TORCH, example_batch, fastest_ms, open_runtime, timed

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark needs a GPU")
    recipe = load_recipe_text(RECIPE.format(model=opts.model, size=opts.size))
    with tempfile.TemporaryDirectory(prefix="gpu-runtime-") as tmp:
        bundle = export_bundle(build_model(recipe, load_weights=False), recipe, Path(tmp) / "bundle")
        loaded = load_bundle(bundle)
        try:
            runtimes = {name: open_runtime(loaded, name, device=opts.device) for name in (TORCH, ONNXRUNTIME)}
        except SurgeryError as err:
            raise SystemExit(str(err)) from None
        print(f"{opts.model} {opts.size}×{opts.size} on {torch.cuda.get_device_name(opts.device)}")
        print(f"onnxruntime providers: {runtimes[ONNXRUNTIME].providers}")
        for batch in (int(b) for b in opts.batches.split(",")):
            inputs = example_batch(loaded, batch)
            outputs = {name: runtime.run(inputs) for name, runtime in runtimes.items()}  # first use
            diff = float(np.abs(outputs[TORCH]["cls"] - outputs[ONNXRUNTIME]["cls"]).max())
            ms = fastest_ms({name: timed(runtime, inputs, None) for name, runtime in runtimes.items()}, opts.repeats)
            print(
                f"  batch {batch:3d}: torch {ms[TORCH]:8.2f} ms, onnxruntime {ms[ONNXRUNTIME]:8.2f} ms "
                f"({ms[TORCH] / ms[ONNXRUNTIME]:.2f}x); {batch * 1000 / ms[ONNXRUNTIME]:8.1f} img/s on onnxruntime; "
                f"max abs diff {diff:.2g} (export tolerance {recipe.export.tolerance:g})"
            )


if __name__ == "__main__":
    main()
