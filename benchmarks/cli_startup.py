"""Wall time of the instant commands (`surgery --help`, `validate`, `schema`, `show`) next to the
baseline they must stay well under: `python -c "import torch"`.

Each command runs in a fresh subprocess, 5 times; the median is reported. Run it from anywhere:

    .venv/bin/python benchmarks/cli_startup.py
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = 5


def median_seconds(argv: list[str]) -> float:
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        subprocess.run(argv, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    surgery = str(Path(sys.executable).parent / "surgery")
    if not Path(surgery).exists():
        surgery = shutil.which("surgery") or sys.exit("no `surgery` command: run `bash .ci/setup` first")
    recipe = sorted((ROOT / "recipes").glob("*.yaml"))[0]
    commands = {
        "surgery --help": [surgery, "--help"],
        f"surgery validate recipes/{recipe.name}": [surgery, "validate", str(recipe)],
        "surgery schema": [surgery, "schema"],
        f"surgery show {recipe.stem}": [surgery, "show", recipe.stem],
    }
    baseline_label = 'python -c "import torch"'
    baseline = median_seconds([sys.executable, "-c", "import torch"])
    width = max(len(label) for label in [*commands, baseline_label])
    print(f"median of {RUNS} runs, each a fresh process\n")
    print(f"{'command':<{width}}  {'seconds':>8}  {'vs import torch':>15}")
    for label, argv in commands.items():
        seconds = median_seconds(argv)
        print(f"{label:<{width}}  {seconds:8.3f}  {seconds / baseline:14.2f}x")
    print(f"{baseline_label:<{width}}  {baseline:8.3f}  {1:14.2f}x")


if __name__ == "__main__":
    main()
