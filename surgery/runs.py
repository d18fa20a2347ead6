"""Run folders: `runs/<name>/<run-id>/`, created once per launch (never once per rank or trial),
the `latest` link to the newest, the lock that keeps one process training in a run at a time, and
`recipe.lock.yaml`, the record of what a run was built from. `fit` only fills a run folder made here.

Races are settled by the filesystem, not by checking first: a new folder is made with an exclusive
`mkdir` (two builds started in the same second get `<stamp>` and `<stamp>-2`), a run is held with
`flock` on `<run>/.lock` (released by the kernel when the holder dies, however it dies), and
`latest` is replaced by renaming a new link over it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from surgery import checkpoint as ckpt
from surgery.errors import CheckpointError
from surgery.files import sha256_file, temporary_until_renamed
from surgery.schema import Recipe
from surgery.versions import package_versions

LOCK_FILE = "recipe.lock.yaml"
LATEST = "latest"  # runs/<name>/latest: a link to the run folder most recently built
HOLD_FILE = ".lock"  # flock'ed by the process training in the run; holds its pid
# What a run killed before its first checkpoint leaves, cleared when it is started again.
_PARTIAL = ("tb", "metrics.jsonl", ckpt.CHECKPOINTS)


def _run_dirs(recipe_dir: Path) -> list[Path]:
    if not recipe_dir.is_dir():
        return []
    return [p for p in recipe_dir.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")]


def latest_run(recipe_dir: Path) -> Path | None:
    """The run `latest` points at; without the link, the newest run folder (one with checkpoints
    first)."""
    link = recipe_dir / LATEST
    if link.is_symlink() and link.resolve().is_dir():
        return link.resolve()
    runs = _run_dirs(recipe_dir)
    return max(runs, key=lambda p: ((p / ckpt.CHECKPOINTS).is_dir(), p.stat().st_mtime, p.name)) if runs else None


def link_latest(run_dir: Path) -> None:
    """Point `runs/<name>/latest` at `run_dir` (atomically: a new link renamed over the old)."""
    link = run_dir.parent / LATEST
    tmp = run_dir.parent / f".{LATEST}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.symlink_to(run_dir.name, target_is_directory=True)
    try:
        os.replace(tmp, link)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def has_checkpoint(run_dir: Path) -> bool:
    """Whether a run has a checkpoint to resume from: a complete one whose files match their
    hashes, the one `checkpoint.find_last` would load (partial or corrupt ones don't count). The
    one answer for the command, launchers and tuning. It only asks: what it skips is warned about
    by the resume that loads one."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ckpt.CheckpointWarning)
        try:
            ckpt.find_last(run_dir)
        except CheckpointError:
            return False
    return True


def run_folder(runs_root: Path, name: str, run_id: str | None, *, resume: bool) -> Path:
    """`runs/<name>/<run-id>/`: a new folder of its own (never one another build also got), or
    with `resume` the given/latest run, checkpoints or not (see `RunHold.restarted`)."""
    recipe_dir = Path(runs_root) / name
    if resume:
        run_dir = recipe_dir / run_id if run_id else latest_run(recipe_dir)
        if run_dir is None or not run_dir.is_dir():
            where = run_dir if run_id else recipe_dir
            raise CheckpointError(f"no run to resume at {where}; run `surgery build` without --resume first")
        return run_dir
    if run_id == LATEST:
        raise CheckpointError(
            f"--run-id {LATEST} names the link to the newest run; use it with --resume, or pick another"
        )
    recipe_dir.mkdir(parents=True, exist_ok=True)
    if run_id is not None:
        run_dir = recipe_dir / run_id
        if has_checkpoint(run_dir):
            raise CheckpointError(
                f"run {run_dir} already has checkpoints; add --resume to continue it, or pick another --run-id"
            )
        run_dir.mkdir(exist_ok=True)  # a named run that never saved may be started again (under its lock)
        return run_dir
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(1, 10_000):
        run_dir = recipe_dir / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            run_dir.mkdir()  # exclusive: of two builds racing for a name, one gets it, the other tries the next
        except FileExistsError:
            continue
        return run_dir
    raise CheckpointError(f"{recipe_dir} already has 10,000 runs named {stamp}*; pick a --run-id")


def trained_a_step(run_dir: Path) -> bool:
    """Whether a run got as far as training: a checkpoint, or a step's scalars in metrics.jsonl."""
    if (run_dir / ckpt.CHECKPOINTS).is_dir():
        return True
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return False
    with metrics.open(encoding="utf-8", errors="replace") as f:
        return any('"train/' in line or '"val/' in line for line in f)


def discard_unstarted(run_dir: Path, previous_latest: str | None) -> bool:
    """Remove a new run that failed before its first step (bad data, a model that cannot be built)
    and point `latest` back where it was: such a folder holds nothing to export or resume, and a
    `latest` moved onto it would hide the last good run. A run that trained is kept."""
    if not run_dir.is_dir() or trained_a_step(run_dir):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    link = run_dir.parent / LATEST
    if link.is_symlink() and os.readlink(link) == run_dir.name:
        if previous_latest is not None:
            tmp = run_dir.parent / f".{LATEST}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
            tmp.symlink_to(previous_latest, target_is_directory=True)
            os.replace(tmp, link)
        else:
            link.unlink(missing_ok=True)
    return True


def latest_target(runs_root: Path, name: str) -> str | None:
    """Where `runs/<name>/latest` points now (as written in the link), None without one."""
    link = Path(runs_root) / name / LATEST
    return os.readlink(link) if link.is_symlink() else None


# --------------------------------------------------------------------------- holding a run


@dataclass
class RunHold:
    """A run held by this process: `restarted` when a resume found no checkpoint, so the run was
    cleared and starts again from the beginning."""

    run_dir: Path
    restarted: bool = False


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"process {pid}" if pid.isdigit() else "another process"


@contextlib.contextmanager
def hold_run(run_dir: Path, *, resume: bool) -> Iterator[RunHold]:
    """Hold `run_dir` while this process trains in it: a second process is refused with the
    holder's pid. The kernel drops the hold when the process ends, even by SIGKILL. Resuming a run
    that has no checkpoint (killed before its first) clears what it left and starts it again."""
    path = Path(run_dir) / HOLD_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CheckpointError(
                f"run {run_dir} is in use by {_holder(path)}; wait for it to finish, or build into another --run-id"
            ) from None
        with contextlib.suppress(OSError):  # on a full disk the hold still holds, it just can't say whose
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        hold = RunHold(Path(run_dir))
        if not resume and has_checkpoint(run_dir):  # checked again now that no one else can write here
            raise CheckpointError(
                f"run {run_dir} already has checkpoints; add --resume to continue it, or pick another --run-id"
            )
        if resume and not has_checkpoint(run_dir):
            for name in _PARTIAL:
                target = Path(run_dir) / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
            hold.restarted = True
        yield hold
    finally:
        os.close(fd)  # closing the descriptor releases the flock


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
    from surgery.provenance import provenance_lines
    from surgery.recipe_dump import dump_recipe, recipe_hash

    lines = ["# surgery lock: the resolved recipe of this run; load it like any recipe (comments are ignored)"]
    lines.append(f"# recipe_sha256: {recipe_hash(recipe, portable=True)}")
    lines.append("# packages: " + ", ".join(f"{k} {v}" for k, v in package_versions().items()))
    lines.extend(f"# weights: {path} sha256:{digest}" for path, digest in _weight_hashes(recipe).items())
    lines.extend(provenance_lines(recipe))
    path = Path(run_dir) / LOCK_FILE
    tmp = path.with_name(f".{LOCK_FILE}.tmp-{os.getpid()}")
    with temporary_until_renamed(tmp, path):
        tmp.write_text("\n".join(lines) + "\n" + dump_recipe(recipe))
        os.replace(tmp, path)
    return path
