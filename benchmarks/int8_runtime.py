"""int8 against float ONNX Runtime on a trained resnet18: speed, and the metric the int8 model
loses on a real validation split. Both in one run.

The model is a torchvision resnet18 trained from scratch by `fit` on scikit-learn's handwritten
digits (1,797 real 8×8 greyscale images, shipped with scikit-learn), upscaled to `--size` pixels
and fed as 3 channels: a small but real validation split of 359 images, not random data. The run is
exported with `model.onnx` and `--quantize int8` (static QDQ, calibrated on 128 seeded training
samples). Reported:

- validation accuracy of the float and the int8 model, the drop, top-1 agreement and the largest
  output difference, as the bundle's manifest records them (the parity gate's input);
- the fastest of N alternating forwards of each at batch 1 and batch 16, on every core and on one
  thread, in the same process: int8's speed-up over float ORT (and float ORT's over eager torch).

    python benchmarks/int8_runtime.py [--size 64] [--epochs 3] [--repeats 20] [--smoke]

`--smoke` runs the same steps on a tiny timm model for a few seconds (it checks the script, its
figures mean nothing). Reports; asserts nothing. About 5 minutes on 2 cores at the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # what serve/runtime.py sets in replicas

RECIPE = """
name: int8-bench
backbone: {{source: {source}, name: {name}, pretrained: false}}
input: {{size: [{size}, {size}]}}
heads:
  - name: digit
    input: pooled
    layers: [{{linear: {{out_features: 10}}}}]
    loss: cross_entropy
    metrics: [accuracy]
data: {{source: digits, val_split: 0.2, batch_size: 64{limits}}}
train:
  epochs: {epochs}
  seed: 0
  optimizer: {{name: adamw, lr: 0.003, weight_decay: 0.0001}}
  scheduler: {{name: onecycle}}
  checkpoint: {{monitor: val/digit/accuracy, mode: max, keep_best: 1}}
monitor: {{progress: none, log_every_steps: 1000, graph: false, histograms: false, sample_predictions: 0}}
export: {{formats: [safetensors, onnx], quantize: int8, calibration_samples: 128}}
"""


def train_and_export(root: Path, source: str, name: str, size: int, epochs: int, limits: str) -> Path:
    from surgery.export import PartialExportError, export_run
    from surgery.recipe import load_recipe_text
    from surgery.train import fit

    recipe = load_recipe_text(
        RECIPE.format(source=source, name=name, size=size, epochs=epochs, limits=limits), filename="int8-bench.yaml"
    )
    run = root / "run"
    fit(recipe, run)
    try:
        return export_run(run)
    except PartialExportError as err:  # a failed parity gate is a result here, not a crash
        print(str(err), file=sys.stderr)
        return err.bundle


def speeds(bundle: Path, threads: int, repeats: int) -> dict[str, dict[int, float]]:
    """Fastest ms per forward of each runtime at batch 1 and 16 on `threads` threads."""
    from surgery.bundle import INT8_ONNX, load_bundle
    from surgery.runtimes import (
        ONNXRUNTIME,
        ONNXRUNTIME_INT8,
        TORCH,
        OnnxRuntime,
        example_batch,
        fastest_ms,
        open_runtime,
        timed,
    )

    loaded = load_bundle(bundle)
    runtimes = {name: open_runtime(loaded, name) for name in (TORCH, ONNXRUNTIME)}
    if (bundle / INT8_ONNX).is_file():  # timed even when its gate failed: here the figure is the point
        heads = [h["name"] for h in loaded.manifest["heads"]]
        runtimes[ONNXRUNTIME_INT8] = OnnxRuntime(
            ONNXRUNTIME_INT8, bundle / INT8_ONNX, loaded.manifest["input_names"], heads
        )
    out: dict[str, dict[int, float]] = {name: {} for name in runtimes}
    for batch in (1, 16):
        inputs = example_batch(loaded, batch)
        for runtime in runtimes.values():
            runtime.run(inputs, threads)  # first use: sessions, allocations
        ms = fastest_ms({name: timed(r, inputs, threads) for name, r in runtimes.items()}, repeats)
        for name, value in ms.items():
            out[name][batch] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="digits upscaled to SIZE×SIZE pixels")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20, help="alternating forwards of each runtime; fastest counts")
    parser.add_argument("--smoke", action="store_true", help="a tiny timm model, a few seconds: checks the script")
    opts = parser.parse_args()
    source, name, limits = "torchvision", "resnet18", ""
    if opts.smoke:
        source, name, limits = "timm", "test_resnet", ", limit_train: 128, limit_val: 64"
        opts.size, opts.epochs, opts.repeats = 16, 1, 3
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="int8-bench-") as tmp:
        bundle = train_and_export(Path(tmp), source, name, opts.size, opts.epochs, limits)
        manifest = json.loads((bundle / "manifest.json").read_text())
        timings = {threads: speeds(bundle, threads, opts.repeats) for threads in sorted({cores, 1})}
    int8 = manifest.get("quantized", {}).get("int8")
    print(f"\n{name}, digits upscaled to {opts.size}×{opts.size}, {opts.epochs} epochs from scratch; {cores} cores")
    if int8 is None:
        print(f"  no int8 model: {manifest['failed_formats'].get('int8')}")
    else:
        head = int8["heads"]["digit"]
        print(
            f"  validation accuracy ({int8['validation_samples']} images): float {head['float_onnx']:.4f}, "
            f"int8 {head['int8_onnx']:.4f}, drop {head['drop'] * 100:+.2f} points; top-1 agreement "
            f"{head['top1_match']:.4f}; max abs diff {head['max_abs_diff']:.3g}; parity gate "
            f"{'passed' if int8['passed'] else 'FAILED: ' + str(int8['reason'])}"
        )
        print(f"  quantization: {int8['method']}")
    for threads, table in timings.items():
        for batch in (1, 16):
            row = {runtime: ms[batch] for runtime, ms in table.items()}
            line = ", ".join(f"{runtime} {value:.2f} ms" for runtime, value in row.items())
            ratios = f"onnxruntime {row['torch'] / row['onnxruntime']:.2f}x torch"
            if "onnxruntime-int8" in row:
                ratios += f"; int8 {row['onnxruntime'] / row['onnxruntime-int8']:.2f}x float onnxruntime"
            print(f"  {threads} thread(s), batch {batch}: {line} ({ratios})")


if __name__ == "__main__":
    main()
