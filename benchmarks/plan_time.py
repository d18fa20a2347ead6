"""`surgery plan` wall time next to the baseline: bare `timm.create_model` + one forward of the same model.

Both are measured two ways, median of `--repeats` runs each:
- cold: a fresh Python process (what a user waits for at the shell; includes imports);
- warm: in one process after imports (what the plan itself costs over the bare model).

    python benchmarks/plan_time.py [--model resnet50] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def recipe_text(model: str) -> str:
    return f"""name: plan-bench
backbone: {{source: timm, name: {model}, pretrained: true}}
heads:
  - name: out
    layers: [{{linear: {{out_features: 10}}}}]
    loss: cross_entropy
freeze: ["backbone.**"]
"""


BASELINE = """
import sys, torch, timm
from timm.data import resolve_data_config
m = timm.create_model(sys.argv[1], pretrained=False)
cfg = resolve_data_config({{}}, model=m)
with torch.no_grad():
    m.eval()(torch.randn(1, *cfg["input_size"]))
"""


def cold(cmd: list[str], repeats: int) -> float:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def warm(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "plan-bench.yaml"
        recipe.write_text(recipe_text(args.model))
        plan_cold = cold([sys.executable, "cli.py", "plan", str(recipe)], args.repeats)
        base_cold = cold([sys.executable, "-c", BASELINE.replace("{{}}", "{}"), args.model], args.repeats)

        import timm
        import torch
        from timm.data import resolve_data_config

        from surgery.plan import plan_command

        def baseline() -> None:
            m = timm.create_model(args.model, pretrained=False)
            with torch.no_grad():
                m.eval()(torch.randn(1, *resolve_data_config({}, model=m)["input_size"]))

        plan_warm = warm(lambda: plan_command(recipe, (), depth=3, as_json=False), args.repeats)
        base_warm = warm(baseline, args.repeats)
    print(f"model: timm {args.model}, torch threads: {torch.get_num_threads()}, median of {args.repeats}")
    print(f"{'':28}{'surgery plan':>14}{'create+forward':>16}{'ratio':>8}")
    print(f"{'cold (fresh process)':28}{plan_cold:>13.2f}s{base_cold:>15.2f}s{plan_cold / base_cold:>8.2f}")
    print(f"{'warm (imports done)':28}{plan_warm:>13.2f}s{base_warm:>15.2f}s{plan_warm / base_warm:>8.2f}")


if __name__ == "__main__":
    main()
