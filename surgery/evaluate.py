"""`surgery evaluate RUN|BUNDLE [--data FOLDER|TABLE] [--split ...]`: score a bundle on data.

Every head's metrics, and for classification heads per-class precision / recall / F1 and the
confusion matrix, printed and written to `evaluations/<name>-<time>/` (`evaluation.json` and a
`confusion_<head>.png` per single-label head). The model runs through a `ModelRunner`, data is
read by the data spec's own source (`surgery.data_split`), and nothing but the new folder is
written: a run's lock, checkpoints and bundle are left as they were.
"""

from __future__ import annotations

import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from surgery.bundle import resolve_bundle
from surgery.data_split import ModelFacts, data_at, split_examples_of
from surgery.errors import DataError, SurgeryError
from surgery.evaluate_report import head_report, print_report
from surgery.files import fsync_tree, temporary_until_renamed, write_json_atomic
from surgery.runner import ModelRunner, open_runner

EVALUATIONS = "evaluations"
REPORT = "evaluation.json"
LOCK = "recipe.lock.yaml"


def evaluate_command(
    target: Path, *, data: Path | None, split: str | None, out: Path | None, batch_size: int = 64
) -> str:
    """Evaluate a run's bundle (or a bundle) on `data` (default: the recipe's `split`, val);
    write the evaluation folder and return the printed report."""
    target = Path(target)
    bundle = resolve_bundle(target)
    run_dir = target.resolve() if (target / LOCK).is_file() else None
    runner = open_runner(bundle)
    recipe = runner.recipe
    if data is not None:
        recipe = data_at(recipe, data, split, runner.spec)
        name, split_read = (Path(data).stem or "data") + (f"-{split}" if split else ""), "val"
    else:
        if run_dir is not None:
            from surgery.recipe import load_recipe

            recipe = load_recipe(run_dir / LOCK)
        split_read = split or "val"
        name = split_read
    facts = ModelFacts.of(runner.heads, runner.spec, runner.tokenizer)
    try:
        examples = split_examples_of(recipe, facts, split_read)
    except DataError as err:
        raise DataError(f"--data {data}: {err}" if data is not None else str(err)) from None
    if len(examples) == 0:
        raise SurgeryError(f"{data or split_read}: no samples to evaluate")
    started = time.perf_counter()
    outputs, targets = run_examples(runner, examples, batch_size)
    heads = {
        h["name"]: head_report(h, _metrics_of(recipe, h["name"]), outputs[h["name"]], targets[h["name"]], examples)
        for h in runner.heads
        if h["name"] in targets
    }
    report = {
        "model": runner.name,
        "bundle": str(bundle),
        "data": str(Path(data).resolve()) if data is not None else f"recipe data ({recipe.data.source}), {split_read}",
        "split": split_read if data is None else split,
        "samples": len(examples),
        "seconds": round(time.perf_counter() - started, 3),
        "created": datetime.now().isoformat(timespec="seconds"),
        "heads": {name: r for name, (r, _png) in heads.items()},
    }
    folder = write_evaluation(
        Path(out) if out is not None else (run_dir or bundle.parent),
        name,
        report,
        {n: p for n, (_r, p) in heads.items()},
    )
    return print_report(report) + f"\nevaluation: {folder}"


def _metrics_of(recipe: Any, head: str) -> list[str]:
    found = next((h for h in recipe.heads if h.name == head), None)
    return list(found.metrics) if found is not None else []


def run_examples(
    runner: ModelRunner, examples: Any, batch_size: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every head's outputs and targets over all examples, with the bundle's preprocessing."""
    from torch.utils.data import DataLoader

    from surgery.data import Collate, ExampleDataset

    loader = DataLoader(
        ExampleDataset(examples, runner.spec),
        batch_size=batch_size,
        shuffle=False,
        collate_fn=Collate(runner.tokenizer, runner.spec),
    )
    outputs: dict[str, list[torch.Tensor]] = {}
    targets: dict[str, list[torch.Tensor]] = {}
    for inputs, batch_targets in loader:
        for name, values in runner.run(inputs).items():
            outputs.setdefault(name, []).append(torch.from_numpy(values))
        for name, values in batch_targets.items():
            targets.setdefault(name, []).append(values)
    return {k: torch.cat(v) for k, v in outputs.items()}, {k: torch.cat(v) for k, v in targets.items()}


def write_evaluation(base: Path, name: str, report: dict[str, Any], images: dict[str, bytes | None]) -> Path:
    """`base/evaluations/<name>-<time>/` with the report and the confusion images, made whole in a
    temporary sibling and renamed into place."""
    parent = base / EVALUATIONS
    parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    final = parent / f"{name}-{stamp}"
    n = 2
    while final.exists():
        final, n = parent / f"{name}-{stamp}-{n}", n + 1
    tmp = parent / f".{final.name}.{os.getpid()}.tmp"
    with temporary_until_renamed(tmp, final):
        tmp.mkdir()
        write_json_atomic(tmp / REPORT, report)
        for head, png in images.items():
            if png is not None:
                (tmp / f"confusion_{head}.png").write_bytes(png)
        fsync_tree(tmp)
        os.replace(tmp, final)
    return final
