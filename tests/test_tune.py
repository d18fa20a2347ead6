"""`surgery tune`: the space is checked before Ray starts, searches run trials through `fit`,
and a search ends in a tuned recipe that rebuilds its best trial."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import cli
from surgery.errors import RecipeError
from surgery.recipe import load_recipe, load_recipe_text, recipe_hash
from surgery.tune import (
    Dimension,
    TrialRow,
    TuneError,
    _ray_train_launcher,
    chosen_values,
    collect_trials,
    concurrency,
    set_override,
    tune_command,
    write_tuned_recipe,
)

ROOT = Path(__file__).resolve().parent.parent

# The quickstart on 128 digits, 4 steps an epoch: a trial is seconds, most of it Ray and imports.
TINY = """\
extends: quickstart
name: tiny
monitor: {progress: none, histograms: false, graph: false, sample_predictions: 0}
export: {formats: [safetensors]}
data: {source: digits, batch_size: 32, limit_train: 128, limit_val: 96}
train: {epochs: 1, scheduler: {name: constant}}
tune:
  metric: val/digit/accuracy
  resources: {cpus: 1}
"""


def write(tmp_path: Path, tune: str, name: str = "tiny.yaml", base: str = TINY) -> Path:
    path = tmp_path / name
    path.write_text(base + "".join(f"  {line}\n" for line in tune.strip().splitlines()))
    return path


def run_cli(capsys, monkeypatch, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["surgery", *args])
    with pytest.raises(SystemExit) as done:
        cli.main()
    out, err = capsys.readouterr()
    return done.value.code, out, err


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if the search gets as far as starting Ray."""

    def refuse() -> bool:
        raise AssertionError("Ray was started for a search that should have been refused")

    monkeypatch.setattr("surgery.tune._start_ray", refuse)


# --------------------------------------------------------------------------- before Ray starts


def test_bad_space_is_rejected_at_its_line_before_ray_starts(tmp_path, capsys, monkeypatch, no_ray) -> None:
    recipe = write(
        tmp_path,
        """
search: random
space:
  train.optimizer.lr: {uniform: [-0.01, 0.1]}
  train.optimzer.momentum: {choice: [0.9]}
  data.batch_size: {choice: [16, big]}
  train.epochs: {uniform: [1, 4]}
  heads[3].loss: {choice: [mse]}
""",
    )
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, monkeypatch, "tune", str(recipe))
    assert code == 2, err
    lines = err.strip().splitlines()
    space_line = TINY.count("\n") + 3  # the line after `space:`
    assert lines[0].startswith(f"{recipe}:{space_line}:")
    assert "tune.space['train.optimizer.lr']: uniform value -0.01" in lines[0] and "must be > 0" in lines[0]
    assert "unknown key 'optimzer' (did you mean 'optimizer'?)" in err
    assert "tune.space['data.batch_size']: choice value big" in err and "expected an integer" in err
    assert "tune.space['train.epochs']: uniform value 2.5" in err  # the middle of the range: not an integer
    assert "uniform value 1.0" not in err  # both ends of [1, 4] are whole numbers of epochs
    assert "heads has 1 item; index 3 is out of range" in err
    assert not (tmp_path / "runs").exists()


def test_every_kind_of_space_problem_is_reported_at_once(tmp_path, capsys, monkeypatch, no_ray) -> None:
    """One the schema refuses, one a value causes, one the search cannot do: all three, each at its line."""
    recipe = write(
        tmp_path,
        """
search: random
space:
  train.optimizer.lr: {loguniform: [0, 0.1]}
  data.batch_size: {choice: [16, big]}
  placement.workers: {choice: [1, 2]}
""",
    )
    code, _, err = run_cli(capsys, monkeypatch, "tune", str(recipe), "--runs", str(tmp_path / "runs"))
    assert code == 2, err
    lines = err.strip().splitlines()
    space_line = TINY.count("\n") + 3
    assert [line.split(" ")[0] for line in lines] == [
        f"{recipe}:{space_line}:39",
        f"{recipe}:{space_line + 1}:22",
        f"{recipe}:{space_line + 2}:24",
    ], err
    assert "loguniform[0]: must be > 0.0, got 0" in lines[0]
    assert "choice value big: expected an integer" in lines[1]
    assert "the placement is fixed for a search" in lines[2]
    assert not (tmp_path / "runs").exists()


def test_re_searching_an_inherited_path_replaces_its_domain(tmp_path) -> None:
    parent = write(
        tmp_path, "space: {train.optimizer.lr: {loguniform: [1.0e-3, 1.0e-1]}, train.seed: {choice: [0, 1]}}"
    )
    child = tmp_path / "child.yaml"
    child.write_text(
        f"extends: {parent.name}\nname: child\ntune:\n  space:\n    train.optimizer.lr: {{choice: [0.01, 0.02]}}\n"
    )
    space = load_recipe(child).tune.space
    assert space["train.optimizer.lr"].kind == "choice" and list(space["train.optimizer.lr"].params) == [0.01, 0.02]
    assert space["train.seed"].kind == "choice"  # paths the child does not search are still the parent's


@pytest.mark.parametrize(
    ("tune", "message"),
    [
        ("search: bohb\nspace: {train.optimizer.lr: {grid: [0.1, 0.2]}}", "use `choice` instead of `grid`"),
        ("search: grid\nspace: {train.optimizer.lr: {uniform: [0.1, 0.2]}}", "write `grid: [...]` here"),
        (
            "search: bohb\nscheduler: asha\nspace: {train.optimizer.lr: {uniform: [0.1, 0.2]}}",
            "runs with its own HyperBand",
        ),
        ("space: {train.optimizer.lr: {uniform: [0.2, 0.1]}}", "low 0.2 must be below high 0.1"),
        ("space: {data.batch_size: {randint: [8, 8]}}", "low 8 must be below high 8"),
        ("space: {data.batch_size: {quniform: [8, 16, 32]}}", "q must be > 0 and at most high - low"),
        ("space: {train.optimizer.lr: {loguniform: [0, 0.1]}}", "must be > 0"),
        ("metric: val/digit/acc\nspace: {train.optimizer.lr: {uniform: [0.1, 0.2]}}", "did you mean"),
    ],
)
def test_searches_the_schema_refuses(tune: str, message: str) -> None:
    text = TINY.replace("tune:\n  metric: val/digit/accuracy\n", "tune:\n") + "".join(
        f"  {line}\n" for line in tune.splitlines()
    )
    with pytest.raises(RecipeError) as err:
        load_recipe_text(text, filename="t.yaml", base_dir=ROOT / "recipes")
    assert message in str(err.value)
    assert str(err.value).startswith("t.yaml:")


def test_domains_produce_exactly_the_values_that_were_checked() -> None:
    steps = Dimension("data.batch_size", "quniform", (16, 120, 16))
    assert steps.corner_values() == [16, 64, 112]  # high is out of step: 112 is the largest value
    assert [steps.decode(x) for x in (16.0, 23.9, 24.1, 119.0, 500.0)] == [16, 16, 32, 112, 112]
    choice = Dimension("train.optimizer", "choice", ({"name": "sgd", "lr": 0.1}, {"name": "adamw"}))
    assert choice.decode(np.int64(1)) == {"name": "adamw"}  # searchers hand back numpy indices
    assert Dimension("data.batch_size", "randint", (8, 12)).corner_values() == [8, 11]
    assert Dimension("x", "loguniform", (1e-4, 1e-2)).corner_values() == pytest.approx([1e-4, 1e-3, 1e-2])


def _recipe(tune: str, *overrides: str):
    return load_recipe_text(TINY + tune, filename="t.yaml", base_dir=ROOT / "recipes", overrides=overrides)


def test_concurrency_follows_the_resources() -> None:
    space = "  space: {train.seed: {choice: [0, 1]}}\n"
    assert concurrency(_recipe(space), {"CPU": 2.0}) == 2
    assert concurrency(_recipe(space, "tune.max_concurrent=1"), {"CPU": 8.0}) == 1
    shared = _recipe(space, "tune.resources.gpus=0.25")
    assert concurrency(shared, {"CPU": 16.0, "GPU": 2.0}) == 8  # four trials share each GPU
    with pytest.raises(TuneError, match=r"one trial needs 4 CPU and 0 GPU \(tune.resources\) .* has 2 CPU and 0 GPU"):
        concurrency(_recipe(space, "tune.resources.cpus=4"), {"CPU": 2.0})
    ddp = _recipe(space, "placement.strategy=ddp", "placement.workers=2")
    assert concurrency(ddp, {"CPU": 5.0}) == 2  # each trial's two workers hold a CPU each
    with pytest.raises(TuneError, match=r"needs 2 CPU and 0 GPU \(placement.workers: 2 Ray Train workers\)"):
        concurrency(ddp, {"CPU": 1.0})


def test_placements_a_trial_cannot_carry_out_are_refused_before_ray(tmp_path, no_ray) -> None:
    recipe = write(tmp_path, "space: {train.optimizer.lr: {choice: [0.01]}}")
    ddp = ["placement.strategy=ddp", "placement.workers=2"]
    if _ray_train_launcher() is None:  # this build has no Ray Train launcher for ddp trials
        with pytest.raises(TuneError, match="multi-worker trials need surgery's Ray Train launcher") as err:
            tune_command(recipe, ddp, runs_root=tmp_path / "runs")
        assert "\n" not in str(err.value)
    with pytest.raises(TuneError, match=r"a ddp trial holds its Ray Train workers|Ray Train launcher"):
        tune_command(recipe, [*ddp, "tune.resources.cpus=2"], runs_root=tmp_path / "runs")
    with pytest.raises(RecipeError, match=r"tune.space\['placement.workers'\]: the placement is fixed for a search"):
        tune_command(write(tmp_path, "space: {placement.workers: {choice: [1, 2]}}"), [])
    assert not (tmp_path / "runs").exists()


def test_a_recipe_without_a_search_is_one_line(tmp_path, capsys, monkeypatch, no_ray) -> None:
    code, _, err = run_cli(capsys, monkeypatch, "tune", "quickstart", "--runs", str(tmp_path))
    assert code == 2
    assert err.strip() == "error: quickstart: the recipe has no `tune:` section; `surgery tune` needs a search space"


def test_tuned_recipe_extends_the_original_and_sets_only_the_chosen_values(tmp_path) -> None:
    recipe = write(tmp_path, "space: {train.optimizer.lr: {loguniform: [1.0e-3, 1.0e-1]}}")
    overrides = ["train.epochs=3", "tune.num_samples=2"]
    params = {"train.optimizer.lr": 0.0123, "heads[0].metrics": ["accuracy"], "data.batch_size": 48.0}
    best = TrialRow("abc_00001", params, "finished", 0.91, 3, 3, tmp_path / "abc_00001")
    out = tmp_path / "search" / "tiny.tuned.yaml"
    out.parent.mkdir()
    write_tuned_recipe(
        out,
        str(recipe),
        overrides,
        best,
        search_id="tune-x",
        metric="val/digit/accuracy",
        mode="max",
        search_desc="grid",
    )
    text = out.read_text()
    assert text.startswith("# surgery tuned recipe: the best trial of search tune-x")
    assert "# best: trial abc_00001, val/digit/accuracy = 0.91 (max) at epoch 3 of 3" in text
    tuned = load_recipe(out)
    trial = load_recipe(recipe, [*overrides, *(set_override(p, v) for p, v in params.items())])
    assert recipe_hash(tuned.model_copy(update={"tune": None})) == recipe_hash(trial.model_copy(update={"tune": None}))
    assert tuned.tune == load_recipe(recipe).tune  # the search's own settings are not carried over
    body = [line for line in text.splitlines() if not line.startswith("#")]
    assert body[0] == "extends: ../tiny.yaml"
    assert "# the search's --set: train.epochs=3 tune.num_samples=2" in text
    assert "num_samples" not in "\n".join(body) and "  batch_size: 48" in body  # as the schema reads it
    # extends replaces lists whole: a path into `heads` restates the trial's heads
    heads = chosen_values(trial, ["heads[0].metrics"])["heads"]
    assert heads[0]["metrics"] == ["accuracy"] and heads[0]["labels"] == [str(i) for i in range(10)]


def test_resume_refuses_a_changed_recipe(tmp_path, no_ray) -> None:
    from surgery.runs import write_lock

    recipe = write(tmp_path, "space: {train.optimizer.lr: {choice: [0.01, 0.02]}}")
    folder = tmp_path / "runs" / "tiny" / "tune-a"
    folder.mkdir(parents=True)
    write_lock(load_recipe(recipe), folder)
    (folder / "search.json").write_text(json.dumps({"recipe": str(recipe), "overrides": [], "cwd": str(tmp_path)}))
    with pytest.raises(TuneError, match=r"recipe changed since search tune-a started(.|\n)*train.epochs: 1 -> 2"):
        tune_command(recipe, ["train.epochs=2"], resume=True, runs_root=tmp_path / "runs")
    with pytest.raises(TuneError, match="no search to resume"):
        tune_command(recipe, [], resume=True, runs_root=tmp_path / "elsewhere")


# --------------------------------------------------------------------------- searches (Ray)


def _search(
    tmp_path: Path, tune: str, *overrides: str, search_id: str = "t", base: str = TINY
) -> tuple[Path, list[dict]]:
    recipe = write(tmp_path, tune, base=base)
    folder = tune_command(recipe, list(overrides), runs_root=tmp_path / "runs", search_id=search_id)
    rows = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    return folder, rows


def _assert_tuned_recipe_validates(folder: Path, best: dict) -> None:
    tuned = load_recipe(folder / "tiny.tuned.yaml")
    for path, value in best["params"].items():
        assert f"{path.split('.')[-1]}: {value}" in (folder / "tiny.tuned.yaml").read_text()
    assert tuned.name == "tiny"
    assert (folder / "best").resolve() == Path(best["run_dir"]).resolve()
    assert (Path(best["run_dir"]) / "bundle" / "manifest.json").is_file()


@pytest.mark.slow
def test_grid_search_ends_in_a_tuned_recipe_that_rebuilds_the_best_trial(ray_session, tmp_path, monkeypatch) -> None:
    from surgery.build import build_command

    monkeypatch.chdir(tmp_path)
    folder, rows = _search(
        tmp_path,
        "search: grid\nspace:\n  train.optimizer.lr: {grid: [0.003, 0.03]}\n  data.batch_size: {grid: [16, 32]}",
    )
    assert len(rows) == 4 and {r["status"] for r in rows} == {"finished"}
    assert sorted((r["params"]["train.optimizer.lr"], r["params"]["data.batch_size"]) for r in rows) == [
        (0.003, 16),
        (0.003, 32),
        (0.03, 16),
        (0.03, 32),
    ]
    scores = [r["best"] for r in rows]
    assert scores == sorted(scores, reverse=True)  # best first, by the trial's best epoch
    best = rows[0]
    trial_dir = Path(best["run_dir"])
    assert trial_dir.parent == folder and folder.parent.name == "tiny"
    assert {"recipe.lock.yaml", "checkpoints", "tb", "metrics.jsonl"} <= {p.name for p in trial_dir.iterdir()}
    assert (trial_dir / "tb" / "tune").is_dir()  # the hparams view of the search
    _assert_tuned_recipe_validates(folder, best)

    assert "OMP_NUM_THREADS=1 repeats it bit for bit" in (folder / "tiny.tuned.yaml").read_text()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the trial ran (tune.resources.cpus: 1)
    try:
        rebuilt = build_command(folder / "tiny.tuned.yaml", [], runs_root=tmp_path / "rebuilt")
    finally:
        torch.set_num_threads(threads)
    evaluated = [json.loads(line) for line in (rebuilt / "metrics.jsonl").read_text().splitlines()]
    final = {k: v for k, v in [e for e in evaluated if "val/digit/accuracy" in e][-1].items() if k.startswith("val/")}
    assert final == {k: v for k, v in best["last"].items() if k.startswith("val/")}
    assert final["val/digit/accuracy"] == best["best"]


@pytest.mark.slow
def test_asha_stops_poor_trials_early(ray_session, tmp_path, monkeypatch) -> None:
    # One learning rate that learns and three that cannot: whichever order the trials reach epoch
    # 1 in, a poor one arriving after the good one is below the rung's median and is stopped.
    monkeypatch.chdir(tmp_path)
    folder, rows = _search(
        tmp_path,
        "search: grid\nscheduler: asha\nreduction_factor: 2\n"
        "space: {train.optimizer.lr: {grid: [0.01, 1.0e-7, 2.0e-7, 3.0e-7]}}",
        "train.epochs=3",
        "data.limit_train=512",
    )
    assert len(rows) == 4
    assert rows[0]["params"]["train.optimizer.lr"] == 0.01
    assert rows[0]["epochs"] == 3 and rows[0]["status"] == "finished"
    stopped = [r for r in rows if r["status"] == "stopped"]
    assert stopped and all(r["epochs"] < 3 for r in stopped), rows
    _assert_tuned_recipe_validates(folder, rows[0])


@pytest.mark.slow
@pytest.mark.parametrize("search", ["bohb", "optuna"])
def test_model_based_searches(ray_session, tmp_path, monkeypatch, search: str) -> None:
    monkeypatch.chdir(tmp_path)
    folder, rows = _search(
        tmp_path,
        f"search: {search}\nnum_samples: 4\nreduction_factor: 2\n"
        "space:\n  train.optimizer.lr: {loguniform: [1.0e-3, 5.0e-2]}\n  data.batch_size: {choice: [16, 32]}",
        "train.epochs=2",
    )
    assert len(rows) == 4 and all(r["best"] is not None for r in rows)
    assert all(1e-3 <= r["params"]["train.optimizer.lr"] <= 5e-2 for r in rows)
    assert all(isinstance(r["params"]["data.batch_size"], int) for r in rows)
    _assert_tuned_recipe_validates(folder, rows[0])


@pytest.mark.slow
def test_a_killed_search_resumes_without_rerunning_finished_trials(ray_session, tmp_path, monkeypatch) -> None:
    recipe = write(tmp_path, "search: grid\nspace: {train.optimizer.lr: {grid: [0.003, 0.01, 0.02, 0.03]}}")
    search = tmp_path / "runs" / "tiny" / "tune-k"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "cli", "tune", str(recipe), "--runs", str(tmp_path / "runs"), "--search-id", "k"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: the Ray it started is ended with it below
    )
    try:
        deadline = time.monotonic() + 300
        finished: dict[Path, float] = {}
        while not finished and time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.5)
            for trial in search.glob("*/trial.json"):
                if json.loads(trial.read_text() or "{}").get("status") == "finished":
                    finished[trial.parent] = (trial.parent / "metrics.jsonl").stat().st_mtime_ns
        assert finished, driver.stderr.read().decode()[-3000:] if driver.poll() is not None else "no trial finished"
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):  # what is left of the Ray the driver started
            os.killpg(driver.pid, signal.SIGKILL)
        driver.stderr.close()
    assert not (search / "results.jsonl").exists()

    monkeypatch.chdir(tmp_path)
    tune_command(recipe, [], resume=True, runs_root=tmp_path / "runs")
    rows = collect_trials(search, "val/digit/accuracy", "max")
    assert len(rows) == 4 and {r.status for r in rows} == {"finished"}
    for run_dir, mtime in finished.items():  # trained once, before the kill
        assert (run_dir / "metrics.jsonl").stat().st_mtime_ns == mtime
        assert len((run_dir / "reports.jsonl").read_text().splitlines()) == 1
    assert (search / "tiny.tuned.yaml").is_file()


@pytest.mark.slow
def test_ctrl_c_while_ray_starts_stops_the_search(tmp_path) -> None:
    import psutil

    recipe = write(tmp_path, "search: grid\nspace: {train.optimizer.lr: {grid: [0.01, 0.02]}}")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    driver = subprocess.Popen(
        [sys.executable, "-m", "cli", "tune", str(recipe), "--runs", str(tmp_path / "runs")],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    try:
        deadline = time.monotonic() + 180
        starting = False
        while not starting and time.monotonic() < deadline and driver.poll() is None:
            with contextlib.suppress(psutil.Error):
                names = {child.name() for child in psutil.Process(driver.pid).children(recursive=True)}
                starting = bool(names & {"gcs_server", "raylet"})
            time.sleep(0.05)
        assert starting, "Ray never started"
        os.killpg(driver.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole foreground group
        stopped = time.monotonic()
        _, err = driver.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):  # what is left of the Ray the driver started
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("error: search interrupted while Ray was starting: no trial ran"), (
        err
    )
    assert time.monotonic() - stopped < 60
    assert not list((tmp_path / "runs").glob("tiny/tune-*/*/trial.json"))  # no trial started


@pytest.mark.slow
@pytest.mark.skipif(_ray_train_launcher() is None, reason="this build has no Ray Train launcher for ddp trials")
def test_ddp_trials_run_on_ray_train(ray_session, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    folder, rows = _search(
        tmp_path,
        "search: grid\nspace: {train.optimizer.lr: {grid: [0.01]}}",
        "placement.strategy=ddp",
        "placement.workers=2",
        "placement.engine=ray",
        base=TINY.replace("  resources: {cpus: 1}\n", ""),  # a ddp trial's workers say what it holds
    )
    assert len(rows) == 1 and rows[0]["status"] == "finished"
    assert rows[0]["best"] is not None and rows[0]["epochs"] == 1  # reported through Ray Train to Tune
    assert load_recipe(Path(rows[0]["run_dir"]) / "recipe.lock.yaml").placement.workers == 2
    _assert_tuned_recipe_validates(folder, rows[0])
