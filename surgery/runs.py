"""Run folders: `runs/<name>/<run-id>/`, created once per launch (never once per rank or trial),
the `latest` link to the newest, and `recipe.lock.yaml`, the record of what a run was built from.
`fit` only fills a run folder made here."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from surgery import checkpoint as ckpt
from surgery.doctor import package_versions
from surgery.errors import CheckpointError
from surgery.files import sha256_file
from surgery.schema import Recipe

LOCK_FILE = "recipe.lock.yaml"
LATEST = "latest"  # runs/<name>/latest: a link to the run folder most recently built


def latest_run(recipe_dir: Path) -> Path | None:
    link = recipe_dir / LATEST
    if link.is_symlink() and link.resolve().is_dir():
        return link.resolve()
    runs = (
        [p for p in recipe_dir.iterdir() if p.is_dir() and not p.is_symlink() and (p / ckpt.CHECKPOINTS).is_dir()]
        if recipe_dir.is_dir()
        else []
    )
    return max(runs, key=lambda p: (p.stat().st_mtime, p.name)) if runs else None


def link_latest(run_dir: Path) -> None:
    """Point `runs/<name>/latest` at `run_dir` (atomically: a new link renamed over the old)."""
    link = run_dir.parent / LATEST
    tmp = run_dir.parent / f".{LATEST}.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name, target_is_directory=True)
    os.replace(tmp, link)


def run_folder(runs_root: Path, name: str, run_id: str | None, *, resume: bool) -> Path:
    """`runs/<name>/<run-id>/`: a new timestamped folder, or with `resume` the given/latest run."""
    recipe_dir = Path(runs_root) / name
    if resume:
        run_dir = recipe_dir / run_id if run_id else latest_run(recipe_dir)
        if run_dir is None or not (run_dir / ckpt.CHECKPOINTS).is_dir():
            where = run_dir if run_id else recipe_dir
            raise CheckpointError(f"no run to resume at {where}; run `surgery build` without --resume first")
        return run_dir
    if run_id == LATEST:
        raise CheckpointError(
            f"--run-id {LATEST} names the link to the newest run; use it with --resume, or pick another"
        )
    if run_id is None:
        run_id = datetime.now().strftime("%Y%m%d-%H%M%S")
        base, n = run_id, 1
        while (recipe_dir / run_id).exists():
            n += 1
            run_id = f"{base}-{n}"
    run_dir = recipe_dir / run_id
    if (run_dir / ckpt.CHECKPOINTS).is_dir() and any((run_dir / ckpt.CHECKPOINTS).iterdir()):
        raise CheckpointError(
            f"run {run_dir} already has checkpoints; add --resume to continue it, or pick another --run-id"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _weight_hashes(recipe: Recipe) -> dict[str, str]:
    weights = recipe.backbone.weights
    if not weights:
        return {}
    path = Path(weights)
    files = (
        [path]
        if path.is_file()
        else sorted(
            p
            for p in path.iterdir()
            if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".json", ".txt", ".model")
        )
        if path.is_dir()
        else []
    )
    return {str(p): sha256_file(p) for p in files}


def write_lock(recipe: Recipe, run_dir: Path) -> Path:
    """`recipe.lock.yaml`: the resolved recipe, with package versions and weight hashes as a
    comment header (so the file loads back as the recipe itself)."""
    from surgery.library import provenance_lines
    from surgery.recipe import dump_recipe, recipe_hash

    lines = ["# surgery lock: the resolved recipe of this run; load it like any recipe (comments are ignored)"]
    lines.append(f"# recipe_sha256: {recipe_hash(recipe)}")
    lines.append("# packages: " + ", ".join(f"{k} {v}" for k, v in package_versions().items()))
    if recipe.backbone.pretrained:
        lines.append(f"# pretrained: {recipe.backbone.source} {recipe.backbone.name} (from the zoo's hub/cache)")
    lines.extend(f"# weights: {path} sha256:{digest}" for path, digest in _weight_hashes(recipe).items())
    lines.extend(provenance_lines(recipe))
    path = Path(run_dir) / LOCK_FILE
    tmp = path.with_name(f".{LOCK_FILE}.tmp")
    tmp.write_text("\n".join(lines) + "\n" + dump_recipe(recipe))
    os.replace(tmp, path)
    return path
