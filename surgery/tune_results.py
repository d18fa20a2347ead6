"""What a search found: every trial read back from its run folder (`collect_trials`, best first),
the results table and TensorBoard's hparams view, and the tuned recipe — a file that `extends` the
original and sets exactly the values the best trial ran with.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from surgery.schema import Recipe
from surgery.tune_space import TuneError, _value_text, set_override
from surgery.tune_trial import TRIAL_FILE, TrialRecord


@dataclass
class TrialRow:
    trial: str
    params: dict[str, Any]
    status: str
    best: float | None
    best_epoch: int | None
    epochs: int
    run_dir: Path
    error: str | None = None
    last: dict[str, float] = field(default_factory=dict)

    def as_json(self, metric: str) -> dict[str, Any]:
        return {
            "trial": self.trial,
            "params": self.params,
            "metric": metric,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "epochs": self.epochs,
            "status": self.status,
            "run_dir": str(self.run_dir),
            "error": self.error,
            "last": self.last,
        }


def collect_trials(folder: Path, metric: str, mode: str) -> list[TrialRow]:
    """Every trial of a search from its run folders, best first (unscored trials last). A trial
    Tune ended before its last epoch (a scheduler's early stop, the time budget) is `stopped`."""
    rows = []
    for trial_file in sorted(folder.glob(f"*/{TRIAL_FILE}")):
        run_dir = trial_file.parent
        if run_dir.is_symlink():  # `best`
            continue
        record = TrialRecord(run_dir)
        info = record.info
        best, epoch = record.best(metric, mode)
        status = info.get("status", "running")
        if status == "running":  # Tune ended it: at its last epoch (a scheduler's max_t), or early
            status = "finished" if record.last_epoch >= info.get("epochs_planned", math.inf) else "stopped"
        last = {k: v for k, v in (record.reports[-1] if record.reports else {}).items() if k != "epoch"}
        rows.append(
            TrialRow(
                trial=info.get("trial", run_dir.name),
                params=info.get("params", {}),
                status=status,
                best=best,
                best_epoch=epoch,
                epochs=record.last_epoch,
                run_dir=run_dir,
                error=info.get("error"),
                last=last,
            )
        )
    sign = 1 if mode == "min" else -1
    rows.sort(key=lambda r: (r.best is None, sign * (r.best if r.best is not None else 0.0), r.trial))
    return rows


def write_hparams(rows: Sequence[TrialRow], metric: str) -> None:
    """Each trial's searched values and score in TensorBoard's hparams view (`<trial>/tb/tune`),
    so the whole search compares side by side with `tensorboard --logdir runs/<name>/tune-<id>`."""
    from torch.utils.tensorboard import SummaryWriter

    for row in rows:
        folder = row.run_dir / "tb" / "tune"
        shutil.rmtree(folder, ignore_errors=True)  # a resumed search writes it again, once
        hparams = {p: v if isinstance(v, int | float | str | bool) else _value_text(v) for p, v in row.params.items()}
        metrics = {"tune/epochs": float(row.epochs)}
        if row.best is not None:
            metrics[f"tune/best/{metric}"] = row.best
        with SummaryWriter(str(row.run_dir / "tb")) as writer:
            writer.add_hparams(hparams, metrics, run_name="tune")


def results_table(rows: Sequence[TrialRow], metric: str, mode: str, title: str) -> Any:
    from rich.table import Table

    paths = list(dict.fromkeys(p for r in rows for p in r.params))
    table = Table(title=title)
    table.add_column("#", justify="right")
    table.add_column("trial")
    for path in paths:
        table.add_column(path, justify="right")
    table.add_column(f"best {metric} ({mode})", justify="right")
    table.add_column("at epoch", justify="right")
    table.add_column("epochs", justify="right")
    table.add_column("status")
    for i, row in enumerate(rows, 1):
        table.add_row(
            str(i),
            row.trial,
            *(_short(row.params.get(p)) for p in paths),
            f"{row.best:.4f}" if row.best is not None else "-",
            str(row.best_epoch or "-"),
            str(row.epochs),
            row.status if not row.error else f"error: {row.error[:60]}",
        )
    return table


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return _value_text(value)


# --------------------------------------------------------------------------- the tuned recipe


def _get(data: Any, steps: Sequence[str | int]) -> Any:
    for step in steps:
        if isinstance(data, dict):
            data = data.get(step)
        elif isinstance(data, list) and isinstance(step, int) and -len(data) <= step < len(data):
            data = data[step]
        else:
            return None
    return data


def chosen_values(recipe: Recipe, paths: Sequence[str]) -> dict[str, Any]:
    """The YAML a tuned recipe sets under its `extends`, for these `--set` paths, with the values
    `recipe` (the trial's) resolved them to. Extends replaces lists whole, so a path through a list
    (`heads[0].layers[1].dropout.p`) restates that list as the trial had it."""
    import copy

    from surgery.recipe import override_path, recipe_to_dict

    resolved = recipe_to_dict(recipe)
    out: dict[str, Any] = {}
    for path in paths:
        steps = override_path(f"{path}=")
        node: Any = out
        for i, step in enumerate(steps[:-1]):
            if isinstance(node, list):
                node = node[step]
                continue
            if step not in node:
                following = steps[i + 1]
                node[step] = copy.deepcopy(_get(resolved, steps[: i + 1])) if isinstance(following, int) else {}
            node = node[step]
        node[steps[-1]] = copy.deepcopy(_get(resolved, steps))
    return out


def write_tuned_recipe(
    out: Path,
    recipe_path: str,
    overrides: Sequence[str],
    best: TrialRow,
    *,
    search_id: str,
    metric: str,
    mode: str,
    search_desc: str,
    threads: int | None = None,
) -> Path:
    """`<name>.tuned.yaml`: `extends` the original recipe and sets exactly the values the best
    trial ran with (the search's own `--set` overrides, then its searched values); its header
    says where it came from. It must load back to the trial's recipe, or nothing is written."""
    from surgery.recipe import load_recipe, override_path, recipe_hash

    trial_recipe = load_recipe(recipe_path, [*overrides, *(set_override(p, v) for p, v in best.params.items())])
    # the search's own settings (`--set tune.num_samples=4`) are not part of what a trial trained
    paths = [*(o.split("=", 1)[0] for o in overrides), *best.params]
    paths = list(dict.fromkeys(p for p in paths if override_path(f"{p}=")[0] != "tune"))
    original = Path(recipe_path).expanduser()
    # a file is extended by its path from the tuned recipe; a shipped recipe by its name
    extends = os.path.relpath(original.resolve(), out.parent.resolve()) if original.is_file() else str(recipe_path)
    header = [
        f"# surgery tuned recipe: the best trial of search {search_id} ({search_desc})",
        f"# best: trial {best.trial}, {metric} = {best.best:.6g} ({mode}) at epoch {best.best_epoch} of "
        f"{best.epochs} ({best.status})",
        f"# searched: {', '.join(best.params)}",
    ]
    if overrides:
        header.append(f"# the search's --set: {' '.join(overrides)}")
    if best.status != "finished":
        header.append("# the trial was stopped early by the scheduler; building this trains every epoch")
    if threads:
        header.append(
            f"# retrain it: surgery build {out.name}  (the trial used {threads} CPU thread(s); on a CPU, "
            f"OMP_NUM_THREADS={threads} repeats it bit for bit)"
        )
    else:
        header.append(f"# retrain it: surgery build {out.name}")
    body = {"extends": extends, **chosen_values(trial_recipe, paths)}
    text = "\n".join(header) + "\n" + yaml.safe_dump(body, sort_keys=False, allow_unicode=True, width=100)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text)
    try:
        tuned = load_recipe(tmp)
        if recipe_hash(tuned.model_copy(update={"tune": None})) != recipe_hash(
            trial_recipe.model_copy(update={"tune": None})
        ):
            raise TuneError(f"{out}: the tuned recipe does not resolve to trial {best.trial}'s recipe")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
