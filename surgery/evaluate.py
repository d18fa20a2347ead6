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
from surgery.data_split import ModelView, examples_for, source_for_path
from surgery.errors import DataError, SurgeryError
from surgery.evaluate_report import head_report, print_report
from surgery.files import fsync_tree, temporary_until_renamed, write_json_atomic
from surgery.heads import HeadInfo
from surgery.runner import ModelRunner, open_runner
from surgery.schema import Data

EVALUATIONS = "evaluations"
REPORT = "evaluation.json"
LOCK = "recipe.lock.yaml"


def evaluate_command(
    target: Path,
    *,
    data: Path | None,
    split: str | None,
    out: Path | None,
    batch_size: int = 64,
    runtime: str | None = None,
) -> str:
    """Evaluate a run's bundle (or a bundle) on `data` (default: the recipe's `split`, val);
    write the evaluation folder and return the printed report."""
    target = Path(target)
    bundle = resolve_bundle(target)
    run_dir = target.resolve() if (target / LOCK).is_file() else None
    runner = open_runner(bundle, runtime)
    recipe = runner.recipe
    if data is None and run_dir is not None:
        from surgery.recipe import load_recipe

        recipe = load_recipe(run_dir / LOCK)
    view = ModelView(input_spec=runner.spec, head_info=head_info_of(runner.heads), tokenizer=runner.tokenizer)
    try:
        if data is not None:
            path = _split_folder(Path(data), split)
            if recipe.data is None:  # a bundle trained without a data section: the path says what it is
                section = Data(source=source_for_path(path, "image_folder"), train=str(path))
                recipe = recipe.model_copy(update={"data": section})
            examples = examples_for(recipe, view, path, split or "all")
        else:
            examples = examples_for(recipe, view, None, split or "val")
    except DataError as err:
        raise DataError(f"--data {data}: {err}" if data is not None else str(err)) from None
    if data is not None:
        name, split_read = (Path(data).stem or "data") + (f"-{split}" if split else ""), "val"
    else:
        split_read = name = split or "val"
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
        "runtime": runner.choice.to_dict(),
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


def head_info_of(heads: list[dict[str, Any]]) -> dict[str, HeadInfo]:
    """The heads as a data source asks about them, from a bundle manifest's `heads`."""
    return {
        h["name"]: HeadInfo(
            task=h["task"] or "regression",
            out_features=int(h["out_features"] or 1),
            output_shape=(int(h["out_features"] or 1),),
            labels=tuple(h["labels"]) if h.get("labels") else None,
        )
        for h in heads
    }


def _split_folder(path: Path, split: str | None) -> Path:
    """`--split` on a folder of class folders names its sub-folder (`data/test`); a Hugging Face
    dataset folder keeps its own named splits; a table has no splits."""
    if split is None or (path / "dataset_dict.json").is_file():
        return path
    if not path.is_dir():
        raise DataError(
            f"--data {path}: a table is evaluated whole; --split names a sub-folder of a folder "
            "or a split of a Hugging Face dataset folder"
        )
    if not (path / split).is_dir():
        raise DataError(f"--data {path}: no sub-folder {split!r} (--split names one)")
    return path / split


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
