"""`surgery tune`: hyperparameter search on Ray Tune, ending in a tuned recipe.

A search is a loop of `load_recipe(path, overrides) → fit`: every trial loads the recipe with its
values set at the space's paths (the `--set` syntax), makes its own run folder under the search's
folder and calls the same `fit` as `surgery build`, with a reporter that hands each evaluated
epoch to Ray Tune (so schedulers can stop it early). Nothing here trains.

    runs/<name>/tune-<id>/
        recipe.lock.yaml    the resolved recipe searched (a resume must resolve to the same)
        search.json         how the search was started (recipe, --set, cwd)
        ray/                Ray Tune's experiment state (what `--resume` restores)
        <trial-id>/         one normal run folder per trial, plus trial.json and reports.jsonl
        best -> <trial-id>  the best trial (its bundle/ is exported)
        results.jsonl       one line per trial, best first
        <name>.tuned.yaml   the best trial's recipe: `extends` the original, sets the chosen values

This module is the command (search folders, searcher, scheduler, concurrency, the run and its
end); the space is `surgery.tune_space`, a trial `surgery.tune_trial`, what a search found
`surgery.tune_results`. The names callers import from `surgery.tune` are re-exported here.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from surgery.errors import SurgeryError
from surgery.files import write_json_atomic
from surgery.schema import Recipe, Tune
from surgery.tune_results import (
    TrialRow,
    chosen_values,
    collect_trials,
    results_table,
    write_hparams,
    write_tuned_recipe,
)
from surgery.tune_space import (
    Dimension,
    SearchPlan,
    TuneError,
    _ray_train_launcher,
    check_space,
    load_search,
    metric_mode,
    num_samples,
    scheduler_name,
    set_override,
    trial_resources,
)
from surgery.tune_trial import TrialRecord, TuneReport, run_trial

__all__ = [
    "Dimension",
    "SearchPlan",
    "TrialRecord",
    "TrialRow",
    "TuneError",
    "TuneInterrupted",
    "TuneReport",
    "_ray_train_launcher",
    "check_space",
    "chosen_values",
    "collect_trials",
    "concurrency",
    "run_trial",
    "set_override",
    "tune_command",
    "write_tuned_recipe",
]

SEARCH_PREFIX = "tune-"
SEARCH_FILE = "search.json"
RESULTS_FILE = "results.jsonl"
RAY_DIR = "ray"
BEST_LINK = "best"


class TuneInterrupted(SurgeryError):
    """A search stopped by Ctrl-C; `--resume` continues it."""

    exit_code = 130


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

    kind = scheduler_name(tune_cfg)
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


@contextlib.contextmanager
def _interruptible_start(recipe_path: str, folder: Callable[[], Path | None]) -> Iterator[None]:
    """Ctrl-C while Ray starts and the search is set up stops the command with one line. Ray's
    start-up can swallow the KeyboardInterrupt a SIGINT raises (the search then ran to its end), so
    the signal is also remembered and acted on once start-up returns. Ray Tune installs its own
    handler for the search itself (a graceful stop that `--resume` continues)."""
    interrupted: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        interrupted.append(signum)
        raise KeyboardInterrupt

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, handler) if main else None
    try:
        yield
    except BaseException as exc:  # Ray's processes got the terminal's Ctrl-C too, and may fail otherwise
        if not interrupted and not isinstance(exc, KeyboardInterrupt):
            raise
        interrupted.append(signal.SIGINT)
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
    if interrupted:
        made = folder()
        again = (
            f"; `surgery tune {recipe_path} --resume --search-id {made.name}` starts it again"
            if made is not None and (made / SEARCH_FILE).is_file()
            else ""
        )
        raise TuneInterrupted(f"search interrupted while Ray was starting: no trial ran{again}")


def _start_ray() -> bool:
    """Connect to Ray (`surgery.cluster.start_ray`, the trials' output kept out of the driver's:
    theirs would interleave); True when this process connected, so it shuts Ray down."""
    from surgery.cluster import start_ray

    # a small checkpoint per epoch makes Tune snapshot its state often: that is what `--resume` reads
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    return start_ray(worker_logs=False)


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
    from surgery.cluster import ray_is_connected
    from surgery.recipe import load_recipe
    from surgery.runs import write_lock

    recipe_path = str(recipe_path)
    folder = None
    if resume:  # the search's own --set, unless new ones are given
        folder = _resume_folder(Path(runs_root) / load_recipe(recipe_path, overrides).name, search_id)
        overrides = list(overrides) or list(json.loads((folder / SEARCH_FILE).read_text())["overrides"])
    recipe = load_search(recipe_path, overrides)  # every problem of the space at once, before Ray starts
    if folder is not None:
        _check_same_recipe(folder, recipe)
    recipe_dir = Path(runs_root) / recipe.name
    tune_cfg = recipe.tune
    assert tune_cfg is not None
    connects = not ray_is_connected()
    try:
        with _interruptible_start(recipe_path, lambda: folder):
            _start_ray()
            import ray

            slots = concurrency(recipe, ray.cluster_resources())  # a machine too small: refused before any folder
            if folder is None:
                folder = _new_search_folder(recipe_dir, search_id)
                write_lock(recipe, folder)
                write_json_atomic(
                    folder / SEARCH_FILE,
                    {
                        "recipe": recipe_path,
                        "overrides": list(overrides),
                        "cwd": os.getcwd(),
                        "started": datetime.now(),
                    },
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
        if connects and ray_is_connected():
            import ray

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
            f", scheduler {scheduler_name(tune_cfg)}, "
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
    desc = f"{tune_cfg.search}, scheduler {scheduler_name(tune_cfg)}, {len(rows)} trials"
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
