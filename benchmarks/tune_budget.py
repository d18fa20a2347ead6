"""Random search vs ASHA vs BOHB on the quickstart's learning rate × batch size, at the same budget.

Each search gets the same number of trials (`--trials`, each up to the recipe's 4 epochs) on the
same space (`recipes/quickstart-tune.yaml`: lr log-uniform in [1e-3, 1e-1], batch size in
{16, 32, 64, 128}) and seed, one CPU per trial on one local Ray. Random search (no scheduler) is
the baseline: it trains every trial to the end. ASHA stops poor trials at epochs 1 and 2; BOHB
(TuneBOHB + HyperBandForBOHB) does the same and also picks its points from a model of the trials
so far. Reported: trial-epochs spent, best validation accuracy (each trial scored by its best
epoch), wall time, and the ratios against random search.

    python benchmarks/tune_budget.py [--trials 12] [--searches random,asha,bohb]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

SEARCHES = {
    "random": ["tune.search=random", "tune.scheduler=none"],
    "asha": ["tune.search=random", "tune.scheduler=asha"],
    "bohb": ["tune.search=bohb"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--searches", default="random,asha,bohb")
    args = parser.parse_args()

    import ray

    from surgery.tune import tune_command

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    figures = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            os.chdir(tmp)
            for name in args.searches.split(","):
                started = time.perf_counter()
                folder = tune_command(
                    "quickstart-tune",
                    [*SEARCHES[name], f"tune.num_samples={args.trials}", "tune.seed=0"],
                    runs_root=Path(tmp) / "runs",
                    search_id=name,
                    echo=lambda *_: None,
                )
                elapsed = time.perf_counter() - started
                rows = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
                figures[name] = {
                    "trials": len(rows),
                    "trial_epochs": sum(r["epochs"] for r in rows),
                    "stopped": sum(r["status"] == "stopped" for r in rows),
                    "best": max(r["best"] for r in rows if r["best"] is not None),
                    "best_params": rows[0]["params"],
                    "seconds": elapsed,
                }
    finally:
        ray.shutdown()

    base = figures.get("random")
    print(f"\n{'search':8} {'trials':>6} {'stopped':>7} {'trial-epochs':>12} {'best acc':>9} {'wall s':>7}  vs random")
    for name, f in figures.items():
        ratio = (
            f"{f['trial_epochs'] / base['trial_epochs']:.2f}× epochs, {f['best'] - base['best']:+.4f} acc, "
            f"{f['seconds'] / base['seconds']:.2f}× time"
            if base
            else ""
        )
        print(
            f"{name:8} {f['trials']:>6} {f['stopped']:>7} {f['trial_epochs']:>12} {f['best']:>9.4f} "
            f"{f['seconds']:>7.1f}  {ratio}"
        )
    for name, f in figures.items():
        print(f"{name}: best trial {f['best_params']}")


if __name__ == "__main__":
    main()
