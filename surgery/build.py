"""`surgery build`: load the recipe, make (or find) the run folder once, train it where the recipe
places it, export the bundle."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from surgery.errors import SurgeryError


def build_command(
    recipe_path: str | Path,
    overrides: Sequence[str],
    *,
    resume: bool = False,
    force: bool = False,
    runs_root: Path = Path("runs"),
    run_id: str | None = None,
) -> Path:
    """`surgery build`: load the recipe, make (or find) the run folder, train, export the bundle."""
    from surgery.export import export_run
    from surgery.model import check_fits_in_memory
    from surgery.placement import placement_for
    from surgery.recipe import load_recipe
    from surgery.runs import hold_run, link_latest, run_folder
    from surgery.train import fit

    recipe = load_recipe(recipe_path, overrides)
    if recipe.data is None:
        raise SurgeryError(f"{recipe_path}: the recipe has no `data:` section; `surgery build` needs training data")
    placement = placement_for(recipe)  # a placement this machine cannot carry out fails before any folder exists
    check_fits_in_memory(recipe)  # so does a model bigger than this machine
    run_dir = run_folder(Path(runs_root), recipe.name, run_id, resume=resume)
    with hold_run(run_dir, resume=resume) as hold:  # one process trains in a run at a time
        if hold.restarted:
            print(
                f"run {run_dir} was stopped before its first checkpoint: training it again from the beginning",
                file=sys.stderr,
            )
        link_latest(run_dir)
        try:
            fit(recipe, run_dir, resume=resume and not hold.restarted, force=force, placement=placement)
        finally:
            placement.close()
        export_run(run_dir)
    return run_dir
