"""A full disk: a checkpoint that doesn't fit is a one-line error naming the path and the space it
needs, its temporary folder is removed, and the last complete checkpoint stays usable. Tested by
injecting ENOSPC (always) and on a real 3-7 MB tmpfs (where this user may mount one)."""

from __future__ import annotations

import errno
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from surgery import checkpoint as ckpt
from surgery.errors import SurgeryError
from surgery.files import human_bytes, temporary_until_renamed


def _save(run: Path, step: int, model: torch.nn.Module) -> Path:
    state = {"optimizer": {"exp_avg": torch.ones(256, 1024)}, "state": {"step": step}}
    return ckpt.save_checkpoint(
        run,
        model=model,
        trainer_state=state,
        meta={"epoch": step, "step": step, "metrics": {}},
        recipe_text="name: x\n",
        monitor="val/loss",
        mode="min",
        keep_best=1,
    )


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(1024, 256)  # 1 MiB of weights; a checkpoint is about 2 MiB


def _leftovers(run: Path) -> list[str]:
    return sorted(p.name for p in (run / ckpt.CHECKPOINTS).iterdir() if p.name.startswith("."))


def _assert_last_checkpoint_usable(run: Path, expected: Path, weights: torch.nn.Module) -> None:
    assert ckpt.find_last(run) == expected
    loaded = _model(99)
    ckpt.load_checkpoint(expected, loaded)
    assert torch.equal(loaded.weight, weights.weight)


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        ),
    ],
    ids=["oserror", "safetensors"],
)
def test_disk_filling_up_during_a_save_is_one_line_and_leaves_the_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: Exception
) -> None:
    run = tmp_path / "run"
    first_model = _model(1)
    first = _save(run, 1, first_model)

    def full(state: object, path: Path, *args: object, **kwargs: object) -> None:
        Path(path).write_bytes(b"\0" * 4096)  # a partly written file, as a real full disk leaves
        raise failure

    monkeypatch.setattr(ckpt.torch, "save", full)
    with pytest.raises(SurgeryError) as caught:
        _save(run, 2, _model(2))
    message = str(caught.value)
    assert "\n" not in message
    assert (
        f"no space left on the device holding {run / 'checkpoints' / 'step-00000002'}: it needs about 2.1 MiB"
        in message
    )
    assert _leftovers(run) == []
    _assert_last_checkpoint_usable(run, first, first_model)


def test_a_checkpoint_that_cannot_fit_is_refused_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import surgery.files as files

    run = tmp_path / "run"
    first_model = _model(1)
    first = _save(run, 1, first_model)
    monkeypatch.setattr(files, "free_bytes", lambda path: 1 << 20)
    with pytest.raises(SurgeryError, match=r"needs about 2\.1 MiB, 1\.0 MiB is free"):
        _save(run, 2, _model(2))
    assert sorted(p.name for p in (run / ckpt.CHECKPOINTS).iterdir()) == ["index.json", "step-00000001"]
    _assert_last_checkpoint_usable(run, first, first_model)


def test_other_write_errors_pass_through_but_still_remove_the_temporary(tmp_path: Path) -> None:
    tmp = tmp_path / ".tmp-x"
    with pytest.raises(PermissionError), temporary_until_renamed(tmp, tmp_path / "x"):
        tmp.mkdir()
        (tmp / "half").write_bytes(b"1")
        raise PermissionError(errno.EACCES, "denied")
    assert not tmp.exists()


def test_human_bytes() -> None:
    assert [human_bytes(n) for n in (0, 1023, 1536, 3 * 2**20, 5 * 2**40)] == [
        "0 B",
        "1023 B",
        "1.5 KiB",
        "3.0 MiB",
        "5.0 TiB",
    ]


# --------------------------------------------------------------------------- a real full disk


@pytest.fixture
def small_disk(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A tmpfs of `request.param` (e.g. "3m"), unmounted afterwards; skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={request.param}", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("small_disk", ["3m"], indirect=True)
def test_a_real_full_disk_mid_write(small_disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import surgery.files as files

    run = small_disk / "run"
    first_model = _model(1)
    first = _save(run, 1, first_model)  # about 2 MiB of the 3
    monkeypatch.setattr(files, "check_free_space", lambda path, needed: None)  # let the writers hit the wall
    monkeypatch.setattr(ckpt, "check_free_space", lambda path, needed: None)
    with pytest.raises(SurgeryError, match=r"no space left on the device holding .*step-00000002: it needs about"):
        _save(run, 2, _model(2))
    assert _leftovers(run) == []
    _assert_last_checkpoint_usable(run, first, first_model)


RECIPE = """
name: tiny
backbone: {source: timm, name: test_resnet, pretrained: false}
input: {size: [16, 16]}
surgery: [{input_channels: 1}]
heads:
  - {name: cls, layers: [{linear: {out_features: 2}}], loss: cross_entropy}
data: {source: synthetic, batch_size: 8, synthetic: {num_samples: 32, num_classes: 2}}
train: {epochs: 3}
monitor: {progress: none, graph: false, histograms: false, sample_predictions: 0}
"""


def _surgery(*args: str) -> subprocess.CompletedProcess[str]:
    code = "import sys; from cli import main; sys.argv = ['surgery', *sys.argv[1:]]; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("small_disk", ["7m"], indirect=True)
def test_build_and_resume_on_a_full_disk_are_one_line_errors(small_disk: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(RECIPE)
    # a checkpoint is about 4.4 MiB (the exact size varies a little with the pickled state): the first fits on the 7 MiB disk, the second doesn't
    built = _surgery("build", str(recipe), "--runs", str(small_disk))
    assert built.returncode == 2
    (line,) = built.stderr.strip().splitlines()
    assert line.startswith("error: no space left on the device holding") and re.search(
        r"it needs about \d\.\d MiB, [\d.]+ (KiB|MiB) is free", line
    )
    run = (small_disk / "tiny" / "latest").resolve()
    assert ckpt.find_last(run).name == "step-00000004"
    (small_disk / "filler").write_bytes(b"\0" * (2 << 20))  # fill what is left, nearly
    resumed = _surgery("build", str(recipe), "--runs", str(small_disk), "--resume")
    assert resumed.returncode == 2
    (line,) = resumed.stderr.strip().splitlines()
    assert line.startswith("error: no space left on the device holding")
    assert not [p for p in run.rglob(".*tmp*")]
    assert ckpt.find_last(run).name == "step-00000004"


def test_a_full_disk_during_export_is_one_line_and_leaves_no_temporary_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch

    from surgery.export import export_bundle
    from surgery.model import build_model
    from surgery.recipe import load_recipe_text

    recipe = load_recipe_text(RECIPE)
    model = build_model(recipe, load_weights=False)

    def full(tensors: object, path: str, *args: object, **kwargs: object) -> None:
        Path(path).write_bytes(b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(SurgeryError, match=rf"no space left on the device holding {tmp_path / 'bundle'}: "):
        export_bundle(model, recipe, tmp_path / "bundle")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
