"""`surgery build`: load the recipe, make (or find) the run folder once, train it where the recipe
places it, export the bundle. A new run that fails before its first step (bad data, a model that
cannot be built) is removed again and `latest` points back where it was."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path

from surgery.errors import SurgeryError
from surgery.schema import Recipe


def build_command(
    recipe_path: str | Path,
    overrides: Sequence[str],
    *,
    resume: bool = False,
    force: bool = False,
    runs_root: Path = Path("runs"),
    run_id: str | None = None,
) -> Path:
    """`surgery build`: load the recipe, make (or find) the run folder, train, export the bundle.
    `recipe_path` may also be a run folder, with `resume`: that run continues from its own
    `recipe.lock.yaml` (with `overrides` on top), wherever it lies.

    Training runs where `placement` says: in this process (one device, a pipeline, or one rank
    under `torchrun`), in `workers` local ddp processes, or on Ray Train; the run folder is made
    once, by this process (rank 0 under `torchrun`), and only that process exports. The launcher is
    handed `fit`: this command owns the training loop, the launchers below it import none."""
    from surgery.export import export_run
    from surgery.model import check_fits_in_memory
    from surgery.placement import launcher_for
    from surgery.recipe import load_recipe
    from surgery.runs import LOCK_FILE, discard_unstarted, hold_run, latest_target, link_latest, run_folder
    from surgery.train import fit

    given = _run_folder(recipe_path)
    if given is not None:  # `surgery build --resume runs/<name>/<run-id>`: that run, from its own lock
        if not resume:
            raise SurgeryError(
                f"{recipe_path} is a run folder: `surgery build {recipe_path} --resume` continues it, "
                f"`surgery build {given / LOCK_FILE}` starts a new run of its recipe"
            )
        if run_id is not None and run_id != given.name:
            raise SurgeryError(f"--run-id {run_id} names another run than {recipe_path} ({given.name})")
        recipe_path, runs_root, run_id = given / LOCK_FILE, given.parent.parent, given.name
    recipe = load_recipe(recipe_path, overrides)
    if given is not None and recipe.name != given.parent.name:
        raise SurgeryError(
            f"{recipe_path}: the run folder's recipe is named {recipe.name!r}, not {given.parent.name!r} "
            "(its parent folder); resume it with `--runs` and `--run-id` instead"
        )
    if recipe.data is None:
        raise SurgeryError(f"{recipe_path}: the recipe has no `data:` section; `surgery build` needs training data")
    launcher = launcher_for(recipe)  # a placement this machine cannot carry out fails before any folder or process
    check_fits_in_memory(recipe)  # so does a model bigger than this machine
    check_training_settings(recipe, resume=resume)  # and settings fit would refuse once it started

    previous_latest = latest_target(runs_root, recipe.name)
    made: list[Path] = []
    try:
        with contextlib.ExitStack() as held:

            def new_run() -> tuple[Path, bool]:
                run_dir = run_folder(Path(runs_root), recipe.name, run_id, resume=resume)
                # The launching process (rank 0 under torchrun) holds the run while it trains and exports.
                hold = held.enter_context(hold_run(run_dir, resume=resume))
                if not resume:
                    made.append(run_dir)  # ours (held): removed again if it fails before its first step
                if hold.restarted:
                    print(
                        f"run {run_dir} was stopped before its first checkpoint: training it again from the beginning",
                        file=sys.stderr,
                    )
                link_latest(run_dir)
                return run_dir, hold.restarted

            try:
                run_dir, restarted = launcher.on_main(new_run)
                launcher.launch(fit, recipe, run_dir, resume=resume and not restarted, force=force)
            finally:
                launcher.close()
            if launcher.is_main:
                export_run(run_dir)
    except BaseException:
        for made_dir in made:  # released by now: a run that failed before its first step leaves nothing
            discard_unstarted(made_dir, previous_latest)
        raise
    return run_dir


def check_training_settings(recipe: Recipe, *, resume: bool) -> None:
    """What `fit` would refuse once started, refused before a run folder exists or `latest` moves:
    `fp16` where training runs on no CUDA device, and `train.cache_features: on` when caching
    would not be exact (asked of the model as built, before any epoch; a resumed run decides at
    its own epoch, in `fit`)."""
    from surgery import features
    from surgery.cluster import ray_address
    from surgery.devices import resolve_device_kind
    from surgery.model import build_model
    from surgery.train_step import check_precision

    placement = recipe.placement
    if recipe.train.precision == "fp16":
        if placement.strategy == "pipeline":
            kinds = [resolve_device_kind(stage.device) for stage in placement.stages]
        elif (
            placement.strategy == "ddp" and (placement.engine == "ray" or ray_address()) and placement.device == "auto"
        ):
            kinds = []  # Ray Train's workers may have GPUs this machine lacks: they check for themselves
        else:
            kinds = [resolve_device_kind(placement.device)]
        for kind in kinds:
            check_precision(recipe.train.precision, kind)
    if recipe.train.cache_features == "on" and not resume:
        model = build_model(recipe, load_weights=False)
        decision = features.decide(model, recipe, epoch=0, applied_through=-1, num_samples=0)
        if not decision.cache:
            raise features.explain_refusal(decision)


def _run_folder(reference: str | Path) -> Path | None:
    """The run folder `reference` names (a folder holding a `recipe.lock.yaml`, `latest`
    followed), or None for a recipe reference."""
    from surgery.runs import LOCK_FILE

    path = Path(reference)
    return path.resolve() if path.is_dir() and (path / LOCK_FILE).is_file() else None
