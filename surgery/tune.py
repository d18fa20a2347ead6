"""`surgery tune`: hyperparameter search on Ray Tune, ending in a tuned recipe.

A search is a loop of `load_recipe(path, overrides) → fit`: every trial loads the recipe with its
values set at the space's paths (the `--set` syntax), makes its own run folder under the search's
folder and calls the same `fit` as `surgery build`, with a placement whose `report` hands each
evaluated epoch to Ray Tune (so schedulers can stop it early). Nothing here trains.

    runs/<name>/tune-<id>/
        recipe.lock.yaml    the resolved recipe searched (a resume must resolve to the same)
        search.json         how the search was started (recipe, --set, cwd)
        ray/                Ray Tune's experiment state (what `--resume` restores)
        <trial-id>/         one normal run folder per trial, plus trial.json and reports.jsonl
        best -> <trial-id>  the best trial (its bundle/ is exported)
        results.jsonl       one line per trial, best first
        <name>.tuned.yaml   the best trial's recipe: `extends` the original, sets the chosen values

Before Ray starts, every path of the space and every value a domain can produce (each listed
value, both ends and the middle of a range) is loaded into the recipe and validated; a problem is
reported at the line of the space entry that produces it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from surgery.errors import RecipeError, SurgeryError
from surgery.schema import Domain, Recipe, Tune

SEARCH_PREFIX = "tune-"
SEARCH_FILE = "search.json"
RESULTS_FILE = "results.jsonl"
RAY_DIR = "ray"
BEST_LINK = "best"
TRIAL_FILE = "trial.json"  # in each trial's run folder: its values and status
REPORTS_FILE = "reports.jsonl"  # in each trial's run folder: the epochs handed to Tune, replayed on restore


class TuneError(SurgeryError):
    """A search that cannot start or resume as asked."""


class TuneInterrupted(SurgeryError):
    """A search stopped by Ctrl-C; `--resume` continues it."""

    exit_code = 130


# --------------------------------------------------------------------------- the space


def _value_text(value: Any) -> str:
    """A value as `--set` reads it (YAML, one line)."""
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip().removesuffix("\n...").strip()


def set_override(path: str, value: Any) -> str:
    return f"{path}={_value_text(value)}"


@dataclass(frozen=True)
class Dimension:
    """One searched recipe path and its domain, as plain data (it travels to Ray workers)."""

    path: str
    kind: str
    params: tuple[Any, ...]

    @classmethod
    def of(cls, path: str, domain: Domain) -> Dimension:
        return cls(path, domain.kind, tuple(domain.params))

    def quantize(self, x: float) -> float:
        low, high, q = self.params
        steps = math.floor((min(max(x, low), high) - low) / q + 0.5)
        steps = min(steps, math.floor((high - low) / q + 1e-9))
        return round(low + steps * q, 12)

    def corner_values(self) -> list[Any]:
        """Every value this domain can produce that validation must see: all listed values, both
        ends of a range and a value inside it (an integer field rejects 2.5, not 2.0 or 3.0)."""
        if self.kind in ("grid", "choice"):
            return list(self.params)
        low, high = self.params[0], self.params[1]
        if self.kind == "randint":
            return list(dict.fromkeys([low, high - 1]))
        if self.kind == "loguniform":
            return [low, math.sqrt(low * high), high]
        if self.kind == "quniform":
            return list(dict.fromkeys([self.quantize(low), self.quantize((low + high) / 2), self.quantize(high)]))
        return [low, (low + high) / 2, high]

    def ray_domain(self) -> Any:
        """The Ray Tune domain. Listed values are searched by index (so any YAML value works with
        every searcher); quniform is sampled uniformly and stepped here (TuneBOHB drops Ray's
        quantization)."""
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(range(len(self.params))))
        if self.kind == "choice":
            return tune.choice(list(range(len(self.params))))
        if self.kind == "loguniform":
            return tune.loguniform(*self.params)
        if self.kind == "randint":
            return tune.randint(*self.params)
        return tune.uniform(self.params[0], self.params[1])

    def decode(self, raw: Any) -> Any:
        raw = raw.item() if hasattr(raw, "item") else raw  # numpy scalars from the searchers
        if self.kind in ("grid", "choice"):
            return self.params[int(raw)]
        if self.kind == "randint":
            return int(raw)
        if self.kind == "quniform":
            return self.quantize(float(raw))
        return float(raw)


@dataclass(frozen=True)
class SearchPlan:
    """Everything a trial needs to load its recipe and find its folder (sent to every trial)."""

    recipe_path: str
    overrides: tuple[str, ...]
    cwd: str
    folder: str
    dimensions: tuple[Dimension, ...]
    metric: str
    mode: str

    def values(self, config: Mapping[str, Any]) -> dict[str, Any]:
        return {d.path: d.decode(config[d.path]) for d in self.dimensions}

    def trial_overrides(self, values: Mapping[str, Any]) -> list[str]:
        return [*self.overrides, *(set_override(p, v) for p, v in values.items())]


def metric_mode(tune: Tune) -> str:
    """`tune.mode`, or its default: minimise a loss, maximise any other metric."""
    if tune.mode is not None:
        return tune.mode
    return "min" if tune.metric.endswith("loss") else "max"


def trial_refusal(recipe: Recipe) -> str | None:
    """Why a trial of `recipe` cannot run: a placement this build cannot carry out in a trial
    (never quietly trained on one device instead)."""
    from surgery.placement import placement_for

    placement = recipe.placement
    if placement.strategy == "single":
        return None
    if placement.strategy == "ddp":
        if _ray_train_launcher() is None:
            return (
                "placement.strategy 'ddp': multi-worker trials need surgery's Ray Train launcher, which this "
                "build lacks; search with `placement.strategy: single`, then build the tuned recipe with ddp"
            )
        return None
    try:
        placement_for(recipe).close()
    except SurgeryError as err:
        return str(err)
    return None


def _ray_train_launcher() -> Any:
    """`surgery.placement.train_on_ray` (`fit` on Ray Train's TorchTrainer), where this build has it."""
    try:
        from surgery.placement import train_on_ray  # type: ignore[attr-defined]
    except ImportError:
        return None
    return train_on_ray


def trial_resources(recipe: Recipe) -> tuple[float, float]:
    """(CPUs, GPUs) one trial holds. A ddp trial's Tune function holds nothing itself: its Ray
    Train workers take one CPU each (and one GPU each on CUDA)."""
    assert recipe.tune is not None
    placement = recipe.placement
    if placement.strategy == "ddp":
        return float(placement.workers), float(placement.workers if placement.device.startswith("cuda") else 0)
    return recipe.tune.resources.cpus, recipe.tune.resources.gpus


def num_samples(tune: Tune) -> int:
    """`tune.num_samples`, or its default: the grid once, 8 samples otherwise."""
    return tune.num_samples or (1 if tune.search == "grid" else 8)


def check_space(recipe_path: str | Path, overrides: Sequence[str], recipe: Recipe) -> None:
    """Load the recipe with every value each domain can produce, and refuse the search (before Ray
    starts) with every problem found, each at the line of the space entry that produced it."""
    from surgery.model import check_fits_in_memory
    from surgery.recipe import field_location, load_recipe

    assert recipe.tune is not None
    check_fits_in_memory(recipe)
    problems: list[str] = []
    for path, domain in recipe.tune.space.items():
        where = field_location(recipe_path, overrides, ("tune", "space", path))
        label = f"{where} tune.space[{path!r}]"
        if path.split(".")[0].split("[")[0] == "placement":
            problems.append(f"{label}: the placement is fixed for a search (it sets what each trial holds)")
            continue
        for value in Dimension.of(path, domain).corner_values():
            override = set_override(path, value)
            try:
                trial = load_recipe(recipe_path, [*overrides, override])
            except RecipeError as err:
                for line in err.problems:
                    detail = line.removeprefix(f"--set {override}").lstrip(" :")
                    problems.append(f"{label}: {domain.kind} value {_value_text(value)}: {detail}")
                continue
            except SurgeryError as err:
                problems.append(f"{label}: {domain.kind} value {_value_text(value)}: {err}")
                continue
            if reason := trial_refusal(trial):
                problems.append(f"{label}: {domain.kind} value {_value_text(value)}: {reason}")
                continue
            try:
                check_fits_in_memory(trial)  # a value that makes the model bigger than this machine
            except SurgeryError as err:
                problems.append(f"{label}: {domain.kind} value {_value_text(value)}: {err}")
    if problems:
        raise RecipeError(list(dict.fromkeys(problems)))


# --------------------------------------------------------------------------- a trial


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill
    return rows


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


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
        _write_json(self.run_dir / TRIAL_FILE, {**self.info, **fields})

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


class TrialPlacement:
    """The placement the trial's recipe asks for (one device, pipeline stages), with `report`
    handing each evaluated epoch to Ray Tune, once across restarts."""

    def __init__(self, inner: Any, record: TrialRecord) -> None:
        self._inner = inner
        self._record = record

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def report(self, epoch: int, metrics: Mapping[str, float], checkpoint: Path | None) -> None:
        if epoch + 1 <= self._record.last_epoch:  # a resumed fit re-evaluating an epoch Tune has
            return
        _report_to_tune(self._record.add(epoch + 1, metrics))


def _fit_on_ray_train(recipe: Recipe, run_dir: Path, record: TrialRecord, *, resume: bool) -> None:
    """A ddp trial: the Tune function starts a Ray Train `TorchTrainer` (surgery's launcher);
    Ray Train's report callback records each epoch in the trial's folder and passes it to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class RecordingTuneReport(TuneReportCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            values = {k: v for k, v in metrics[0].items() if isinstance(v, int | float) and k != "epoch"}
            epoch = int(metrics[0]["epoch"])
            if epoch <= record.last_epoch:  # replayed to Tune already
                return
            super().after_report(run_context, [record.add(epoch, values)], None)

    _ray_train_launcher()(recipe, run_dir, resume=resume, callbacks=[RecordingTuneReport()])


def run_trial(config: dict[str, Any], plan: SearchPlan) -> None:
    """The Ray Tune function of one trial: load the recipe with the trial's values, make (or find)
    its run folder, and `fit` it, reporting each evaluated epoch."""
    import torch
    from ray import tune

    from surgery import checkpoint as ckpt
    from surgery.placement import placement_for
    from surgery.recipe import load_recipe
    from surgery.runs import run_folder
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
    try:
        ckpt.find_last(run_dir)
        resume = True
    except SurgeryError:
        resume = False
        shutil.rmtree(run_dir / ckpt.CHECKPOINTS, ignore_errors=True)  # only interrupted saves
    run_folder(folder.parent, folder.name, trial_id, resume=resume)
    try:
        if recipe.placement.strategy == "ddp":
            _fit_on_ray_train(recipe, run_dir, record, resume=resume)
        else:
            placement = TrialPlacement(placement_for(recipe), record)
            try:
                fit(recipe, run_dir, resume=resume, force=False, placement=placement)
            finally:
                placement.close()
    except Exception as err:
        record.update(status="error", error=f"{type(err).__name__}: {err}")
        raise
    record.update(status="finished")


# --------------------------------------------------------------------------- the search


def _max_epochs(recipe: Recipe) -> int:
    """Most epochs a trial can run (the schedulers' budget): `train.epochs`, or the largest value
    the space gives it."""
    assert recipe.tune is not None
    domain = recipe.tune.space.get("train.epochs")
    if domain is None:
        return recipe.train.epochs
    return max(int(v) for v in Dimension.of("train.epochs", domain).corner_values())


def _searcher(tune_cfg: Tune, concurrency: int) -> Any:
    from ray.tune.search import ConcurrencyLimiter

    if tune_cfg.search == "bohb":
        from ray.tune.search.bohb import TuneBOHB

        return ConcurrencyLimiter(TuneBOHB(seed=tune_cfg.seed), max_concurrent=concurrency)
    if tune_cfg.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = optuna.samplers.TPESampler(seed=tune_cfg.seed)
        return ConcurrencyLimiter(OptunaSearch(sampler=sampler), max_concurrent=concurrency)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=tune_cfg.seed, max_concurrent=concurrency)


def _scheduler(tune_cfg: Tune, max_epochs: int) -> Any:
    from ray.tune import schedulers

    kind = tune_cfg.scheduler or ("hyperband" if tune_cfg.search == "bohb" else "none")
    if tune_cfg.search == "bohb":
        return schedulers.HyperBandForBOHB(
            time_attr="epoch", max_t=max_epochs, reduction_factor=tune_cfg.reduction_factor
        )
    if kind == "asha":
        return schedulers.ASHAScheduler(
            time_attr="epoch",
            max_t=max_epochs,
            grace_period=min(tune_cfg.grace_period, max_epochs),
            reduction_factor=tune_cfg.reduction_factor,
        )
    if kind == "hyperband":
        return schedulers.HyperBandScheduler(
            time_attr="epoch", max_t=max_epochs, reduction_factor=tune_cfg.reduction_factor
        )
    return schedulers.FIFOScheduler()


def concurrency(recipe: Recipe, resources: Mapping[str, float]) -> int:
    """Trials that can run at once on these resources (and at most `max_concurrent`), so no trial
    waits on resources held by others; a machine too small for one trial is an error, not a search
    that waits forever."""
    assert recipe.tune is not None
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    need_cpus, need_gpus = trial_resources(recipe)
    if need_cpus > cpus or need_gpus > gpus:
        what = (
            f"placement.workers: {recipe.placement.workers} Ray Train workers"
            if recipe.placement.strategy == "ddp"
            else "tune.resources"
        )
        raise TuneError(
            f"one trial needs {need_cpus:g} CPU and {need_gpus:g} GPU ({what}) but this Ray "
            f"{'cluster' if os.environ.get('RAY_ADDRESS') else 'machine'} has {cpus:g} CPU and {gpus:g} GPU; "
            "ask for less per trial or add machines"
        )
    fit = math.floor(cpus / need_cpus + 1e-9) if need_cpus else math.inf
    if need_gpus:
        fit = min(fit, math.floor(gpus / need_gpus + 1e-9))
    limit = recipe.tune.max_concurrent or fit
    return int(max(1, min(fit, limit)))


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


# --------------------------------------------------------------------------- the command


def _check_runnable(recipe: Recipe) -> None:
    """What this machine or package set cannot carry out, refused before anything starts."""
    import importlib.util

    assert recipe.tune is not None
    if reason := trial_refusal(recipe):
        raise TuneError(reason)
    if recipe.placement.strategy == "ddp" and "resources" in recipe.tune.model_fields_set:
        raise TuneError(
            "tune.resources: a ddp trial holds its Ray Train workers (one CPU each, one GPU each on CUDA); "
            "set placement.workers instead"
        )
    needs = {"bohb": ("hpbandster", "ConfigSpace"), "optuna": ("optuna",)}.get(recipe.tune.search, ())
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    if missing:
        raise TuneError(f"tune.search {recipe.tune.search!r} needs {', '.join(missing)}: pip install 'surgery[tune]'")
    if recipe.placement.device.startswith("cuda") and not trial_resources(recipe)[1]:
        raise TuneError("placement.device asks for CUDA but tune.resources.gpus is 0: give each trial a GPU share")


def _search_folders(recipe_dir: Path) -> list[Path]:
    return sorted(p for p in recipe_dir.glob(f"{SEARCH_PREFIX}*") if (p / SEARCH_FILE).is_file())


def _new_search_folder(recipe_dir: Path, search_id: str | None) -> Path:
    if search_id is None:
        base = SEARCH_PREFIX + datetime.now().strftime("%Y%m%d-%H%M%S")
        search_id, n = base, 1
        while (recipe_dir / search_id).exists():
            n += 1
            search_id = f"{base}-{n}"
    elif not search_id.startswith(SEARCH_PREFIX):
        search_id = SEARCH_PREFIX + search_id
    folder = recipe_dir / search_id
    if (folder / SEARCH_FILE).exists():
        raise TuneError(f"search {folder} already exists; add --resume to continue it, or pick another --search-id")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _resume_folder(recipe_dir: Path, search_id: str | None) -> Path:
    if search_id is not None:
        folder = recipe_dir / (search_id if search_id.startswith(SEARCH_PREFIX) else SEARCH_PREFIX + search_id)
        if not (folder / SEARCH_FILE).is_file():
            raise TuneError(f"no search to resume at {folder}")
        return folder
    found = _search_folders(recipe_dir)
    if not found:
        raise TuneError(f"no search to resume under {recipe_dir}; run `surgery tune` without --resume first")
    return found[-1]


def _check_same_recipe(folder: Path, recipe: Recipe) -> None:
    from surgery.recipe import load_recipe, recipe_diff, recipe_hash

    locked = load_recipe(folder / "recipe.lock.yaml")
    if recipe_hash(locked) == recipe_hash(recipe):
        return
    changes = [f"  {path}: {old!r} -> {new!r}" for path, old, new in recipe_diff(locked, recipe)]
    raise TuneError(
        f"the recipe changed since search {folder.name} started; resuming it would mix trials of two recipes:\n"
        + "\n".join(changes)
    )


def _start_ray() -> bool:
    """Connect to `RAY_ADDRESS`, or start a local Ray; True when this process started it."""
    import ray

    # a small checkpoint per epoch makes Tune snapshot its state often: that is what `--resume` reads
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level="WARNING", log_to_driver=False)
    else:  # a Ray of our own: never another user's `ray start` instance found on this machine
        ray.init(address="local", include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    return True


def tune_command(
    recipe_path: str | Path,
    overrides: Sequence[str],
    *,
    resume: bool = False,
    runs_root: Path = Path("runs"),
    search_id: str | None = None,
    out: Path | None = None,
    echo: Any = print,
) -> Path:
    """`surgery tune`: check the space, run (or resume) the search on Ray Tune, then write the
    results table, results.jsonl and the tuned recipe, and export the best trial's bundle.
    Returns the search folder."""
    from surgery.recipe import load_recipe
    from surgery.runs import write_lock

    recipe_path = str(recipe_path)
    recipe = load_recipe(recipe_path, overrides)
    if recipe.tune is None:
        raise TuneError(f"{recipe_path}: the recipe has no `tune:` section; `surgery tune` needs a search space")
    if recipe.data is None:
        raise TuneError(f"{recipe_path}: the recipe has no `data:` section; trials need training data")
    recipe_dir = Path(runs_root) / recipe.name
    folder = None
    if resume:
        folder = _resume_folder(recipe_dir, search_id)
        started = json.loads((folder / SEARCH_FILE).read_text())
        overrides = list(overrides) or list(started["overrides"])
        recipe = load_recipe(recipe_path, overrides)
        _check_same_recipe(folder, recipe)
    tune_cfg = recipe.tune
    assert tune_cfg is not None
    _check_runnable(recipe)
    check_space(recipe_path, overrides, recipe)
    started_ray = _start_ray()
    try:
        import ray

        slots = concurrency(recipe, ray.cluster_resources())  # a machine too small: refused before any folder
        if folder is None:
            folder = _new_search_folder(recipe_dir, search_id)
            write_lock(recipe, folder)
            _write_json(
                folder / SEARCH_FILE,
                {"recipe": recipe_path, "overrides": list(overrides), "cwd": os.getcwd(), "started": datetime.now()},
            )
        folder = folder.resolve()
        plan = SearchPlan(
            recipe_path=recipe_path,
            overrides=tuple(overrides),
            cwd=os.getcwd(),
            folder=str(folder),
            dimensions=tuple(Dimension.of(p, d) for p, d in tune_cfg.space.items()),
            metric=tune_cfg.metric,
            mode=metric_mode(tune_cfg),
        )
        _run_search(plan, tune_cfg, recipe, folder, slots, resume=resume, echo=echo)
    finally:
        if started_ray:
            ray.shutdown()
    return _finish(plan, tune_cfg, recipe, folder, out=out, echo=echo)


def _run_search(
    plan: SearchPlan, tune_cfg: Tune, recipe: Recipe, folder: Path, slots: int, *, resume: bool, echo: Any
) -> None:
    from ray import tune

    cpus, gpus = trial_resources(recipe)
    ddp = recipe.placement.strategy == "ddp"
    # a ddp trial's Tune function only starts its TorchTrainer, whose workers hold the CPUs/GPUs;
    # it asks for a token of memory (Ray needs a non-empty request) so it never takes a worker's CPU
    held = {"cpu": 0, "gpu": 0, "memory": 1 << 20} if ddp else {"cpu": cpus, "gpu": gpus}
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan), held)
    where = f"the Ray cluster at {os.environ['RAY_ADDRESS']}" if os.environ.get("RAY_ADDRESS") else "this machine"
    ray_dir = folder / RAY_DIR
    if resume and tune.Tuner.can_restore(str(ray_dir)):
        echo(f"resuming search {folder.name} on {where}: finished trials are kept, unfinished ones continue")
        tuner = tune.Tuner.restore(str(ray_dir), trainable=trainable, resume_unfinished=True, resume_errored=False)
    else:
        max_epochs = _max_epochs(recipe)
        echo(
            f"search {folder.name}: {tune_cfg.search}"
            f"{' (grid ×' + str(num_samples(tune_cfg)) + ')' if tune_cfg.search == 'grid' else ', ' + str(num_samples(tune_cfg)) + ' trials'}"
            f", scheduler {tune_cfg.scheduler or ('hyperband' if tune_cfg.search == 'bohb' else 'none')}, "
            f"{slots} at a time on {where} ({cpus:g} CPU, {gpus:g} GPU each"
            f"{f', in {recipe.placement.workers} Ray Train workers' if ddp else ''})"
        )
        tuner = tune.Tuner(
            trainable,
            param_space={d.path: d.ray_domain() for d in plan.dimensions},
            tune_config=tune.TuneConfig(
                metric=plan.metric,
                mode=plan.mode,
                num_samples=num_samples(tune_cfg),
                search_alg=_searcher(tune_cfg, slots),
                scheduler=_scheduler(tune_cfg, max_epochs),
                time_budget_s=tune_cfg.time_budget_s,
                reuse_actors=True,  # a trial starts in a warm process: imports and data are not paid again
            ),
            run_config=tune.RunConfig(
                name=RAY_DIR,
                storage_path=str(folder),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                failure_config=tune.FailureConfig(max_failures=0),
                verbose=0,
            ),
        )
    tuner.fit()
    # Ctrl-C: Tune saved its state, the trials it stopped as pending, and returned. (A search that
    # ran out leaves none pending; HyperBandForBOHB may leave trials paused, which is no interrupt.)
    saved = tune.ExperimentAnalysis(str(ray_dir)).trials
    unfinished = sum(t.status in ("PENDING", "RUNNING") for t in saved)
    if unfinished:
        raise TuneInterrupted(
            f"search {folder.name} interrupted with {unfinished} trial(s) unfinished; continue it with "
            f"`surgery tune {plan.recipe_path} --resume --search-id {folder.name}`"
        )


def _trial_threads(recipe: Recipe) -> int | None:
    """CPU threads a single-device CPU trial trained with (None when that does not decide its numbers)."""
    cpus, gpus = trial_resources(recipe)
    return max(1, int(cpus)) if recipe.placement.strategy == "single" and not gpus else None


def _finish(plan: SearchPlan, tune_cfg: Tune, recipe: Recipe, folder: Path, *, out: Path | None, echo: Any) -> Path:
    from rich.console import Console

    rows = collect_trials(folder, plan.metric, plan.mode)
    with (folder / f".{RESULTS_FILE}.tmp").open("w") as f:
        f.writelines(json.dumps(r.as_json(plan.metric), default=str) + "\n" for r in rows)
    os.replace(folder / f".{RESULTS_FILE}.tmp", folder / RESULTS_FILE)
    write_hparams(rows, plan.metric)
    desc = (
        f"{tune_cfg.search}, scheduler {tune_cfg.scheduler or ('hyperband' if tune_cfg.search == 'bohb' else 'none')}"
        f", {len(rows)} trials"
    )
    Console(width=200).print(results_table(rows, plan.metric, plan.mode, f"{recipe.name}: {folder.name} ({desc})"))
    echo(f"results: {folder / RESULTS_FILE}")
    echo(f"tensorboard --logdir {folder}")
    scored = [r for r in rows if r.best is not None]
    if not scored:
        raise TuneError(f"no trial of search {folder.name} reported {plan.metric}; see the errors above")
    best = scored[0]
    link = folder / BEST_LINK
    tmp = folder / f".{BEST_LINK}.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(best.run_dir.name, target_is_directory=True)
    os.replace(tmp, link)
    tuned = Path(out) if out is not None else folder / f"{recipe.name}.tuned.yaml"
    write_tuned_recipe(
        tuned,
        plan.recipe_path,
        plan.overrides,
        best,
        search_id=folder.name,
        metric=plan.metric,
        mode=plan.mode,
        search_desc=desc,
        threads=_trial_threads(recipe),
    )
    echo(f"best: trial {best.trial}, {plan.metric} = {best.best:.4f} at epoch {best.best_epoch} ({best.run_dir})")
    echo(f"tuned recipe: {tuned}")
    if tune_cfg.export_best:
        from surgery.export import export_run

        echo(f"best bundle: {export_run(best.run_dir)}")
    return folder
