"""One trial of `surgery tune`: the Ray Tune function that loads the recipe with the trial's values,
makes (or finds) its run folder under the search's folder and calls the same `fit` as
`surgery build`, with a reporter that hands each evaluated epoch to Ray Tune (so schedulers can
stop it early). A ddp trial runs `fit` on Ray Train instead, its reports passed on to Tune.

Each trial keeps its own record in its run folder (`trial.json`: values and status;
`reports.jsonl`: every epoch handed to Tune), so a restored trial replays what Tune missed and a
finished trial is never trained again.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from surgery.files import write_json_atomic
from surgery.schema import Recipe
from surgery.tune_space import SearchPlan, _ray_train_launcher

if TYPE_CHECKING:
    from surgery.launchers import Fit

TRIAL_FILE = "trial.json"  # in each trial's run folder: its values and status
REPORTS_FILE = "reports.jsonl"  # in each trial's run folder: the epochs handed to Tune, replayed on restore


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill
    return rows


class TrialRecord:
    """A trial's own record in its run folder: its values and status (`trial.json`) and every
    epoch it reported (`reports.jsonl`), so a restored trial can replay what Tune missed and a
    finished trial is never trained again."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.reports = _read_jsonl(run_dir / REPORTS_FILE)

    @property
    def info(self) -> dict[str, Any]:
        path = self.run_dir / TRIAL_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def update(self, **fields: Any) -> None:
        write_json_atomic(self.run_dir / TRIAL_FILE, {**self.info, **fields})

    @property
    def last_epoch(self) -> int:
        return max((r["epoch"] for r in self.reports), default=0)

    def add(self, epoch: int, metrics: Mapping[str, float]) -> dict[str, Any]:
        row = {"epoch": epoch, **{k: float(v) for k, v in metrics.items()}}
        with (self.run_dir / REPORTS_FILE).open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.reports.append(row)
        return row

    def best(self, metric: str, mode: str) -> tuple[float | None, int | None]:
        """The trial's score: its best epoch's `metric`, and that epoch."""
        scored = [(r[metric], r["epoch"]) for r in self.reports if isinstance(r.get(metric), float | int)]
        scored = [s for s in scored if math.isfinite(s[0])]
        if not scored:
            return None, None
        pick = min if mode == "min" else max
        return pick(scored, key=lambda s: s[0])


def _report_to_tune(row: Mapping[str, Any]) -> None:
    """Hand an epoch to Tune with a small checkpoint naming it (the weights stay in the run
    folder), so a trial Tune pauses or restores continues from its run folder, not from scratch."""
    import tempfile

    from ray import tune

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "epoch.json").write_text(json.dumps({"epoch": row["epoch"]}))
        tune.report(dict(row), checkpoint=tune.Checkpoint.from_directory(tmp))


def _restored_epoch() -> int:
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        return int(json.loads((Path(folder) / "epoch.json").read_text())["epoch"])


class TuneReport:
    """The reporter of a trial's `fit` in the trial's own process (one device, pipeline stages):
    each evaluated epoch is recorded in the trial's folder and handed to Ray Tune, once across
    restarts."""

    def __init__(self, record: TrialRecord) -> None:
        self._record = record

    def report(self, epoch: int, metrics: Mapping[str, float], checkpoint: Path | None) -> None:
        if epoch + 1 <= self._record.last_epoch:  # a resumed fit re-evaluating an epoch Tune has
            return
        _report_to_tune(self._record.add(epoch + 1, metrics))


def _fit_on_ray_train(fit: Fit, recipe: Recipe, run_dir: Path, record: TrialRecord, *, resume: bool) -> None:
    """A ddp trial: the Tune function starts a Ray Train `TorchTrainer` running `fit` (surgery's
    launcher); Ray Train's report callback records each epoch in the trial's folder and passes it
    to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class RecordingTuneReport(TuneReportCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            values = {k: v for k, v in metrics[0].items() if isinstance(v, int | float) and k != "epoch"}
            epoch = int(metrics[0]["epoch"])
            if epoch <= record.last_epoch:  # replayed to Tune already
                return
            super().after_report(run_context, [record.add(epoch, values)], None)

    _ray_train_launcher()(fit, recipe, run_dir, resume=resume, callbacks=[RecordingTuneReport()])


def run_trial(config: dict[str, Any], plan: SearchPlan) -> None:
    """The Ray Tune function of one trial: load the recipe with the trial's values, make (or find)
    its run folder, and `fit` it, reporting each evaluated epoch."""
    import torch
    from ray import tune

    from surgery import checkpoint as ckpt
    from surgery.placement import placement_for
    from surgery.recipe import load_recipe
    from surgery.runs import has_checkpoint, run_folder
    from surgery.train import fit

    os.chdir(plan.cwd)  # Tune starts trials in their own folder; relative paths are the user's
    threads = int(float(os.environ.get("OMP_NUM_THREADS", "0") or 0))
    if threads > 0:
        torch.set_num_threads(threads)
    trial_id = tune.get_context().get_trial_id()
    values = plan.values(config)
    recipe = load_recipe(plan.recipe_path, plan.trial_overrides(values))
    folder = Path(plan.folder)
    run_dir = folder / trial_id
    run_dir.mkdir(parents=True, exist_ok=True)
    record = TrialRecord(run_dir)
    if not record.info:
        record.update(
            trial=trial_id,
            params=values,
            status="running",
            epochs_planned=recipe.train.epochs,
            started=datetime.now().isoformat(),
        )
    restored = _restored_epoch()
    for row in record.reports:  # epochs Tune lost (a driver killed, a trial paused) are replayed
        if row["epoch"] > restored:
            _report_to_tune(row)
    if record.info.get("status") == "finished":
        return
    resume = has_checkpoint(run_dir)
    if not resume:
        shutil.rmtree(run_dir / ckpt.CHECKPOINTS, ignore_errors=True)  # only interrupted saves
    run_folder(folder.parent, folder.name, trial_id, resume=resume)
    try:
        if recipe.placement.strategy == "ddp":
            _fit_on_ray_train(fit, recipe, run_dir, record, resume=resume)
        else:
            placement = placement_for(recipe)
            try:
                fit(recipe, run_dir, resume=resume, force=False, placement=placement, reporter=TuneReport(record))
            finally:
                placement.close()
    except Exception as err:
        record.update(status="error", error=f"{type(err).__name__}: {err}")
        raise
    record.update(status="finished")
