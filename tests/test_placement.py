"""Placement: pipeline stages give the single-device model's outputs, loss and gradients; DDP on 2
local Gloo processes reaches the single-process weights for the same global batch and resumes
exactly after SIGKILL; Ray Train runs the quickstart and survives a killed worker; bad placements
are one-line errors before any folder or process exists."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from surgery.errors import RecipeError, SurgeryError
from surgery.recipe import load_recipe_text

ROOT = Path(__file__).resolve().parents[1]

VIT = """
name: vit
backbone: {{source: timm, name: test_vit, pretrained: false, kwargs: {{img_size: 16, patch_size: 4}}}}
input: {{size: [16, 16]}}
heads:
  - {{name: cls, layers: [{{linear: {{out_features: 3}}}}], loss: cross_entropy, metrics: [accuracy]}}
data: {{source: synthetic, batch_size: {batch}, synthetic: {{num_samples: {samples}, num_classes: 3}}}}
train:
  epochs: {epochs}
  seed: 0
  optimizer: {{name: sgd, lr: 0.05, momentum: 0.9}}
{train}
monitor: {{progress: none, graph: false, histograms: false, sample_predictions: 0}}
export: {{formats: [safetensors]}}
placement: {placement}
"""

STAGES = """
  strategy: pipeline
  micro_batches: 4
  stages:
    - {modules: [backbone.cls_token, backbone.pos_embed, backbone.patch_embed..backbone.norm_pre, backbone.blocks.0..backbone.blocks.2], device: cpu}
    - {modules: [backbone.blocks.3..backbone.blocks.5, backbone.norm..backbone.head, heads], device: cpu}
"""


def vit_text(*, batch: int = 8, samples: int = 32, epochs: int = 1, train: str = "", placement: str = "{}") -> str:
    return VIT.format(batch=batch, samples=samples, epochs=epochs, train=train, placement=placement)


def vit(**kwargs: object):
    return load_recipe_text(vit_text(**kwargs))  # type: ignore[arg-type]


def write(tmp_path: Path, text: str, name: str = "vit.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- the recipe language


def test_data_parallel_is_refused_with_the_reason() -> None:
    with pytest.raises(RecipeError, match=r"placement.strategy: data_parallel .* is refused: `ddp` replaces it"):
        vit(placement="{strategy: data_parallel}")


def test_fields_of_another_strategy_are_errors_not_ignored() -> None:
    with pytest.raises(RecipeError) as info:
        vit(placement="{strategy: single, workers: 2, micro_batches: 2, max_failures: 1, engine: ray}")
    fields = {line.split(" ")[1] for line in str(info.value).splitlines()}
    assert fields == {f"placement.{key}:" for key in ("workers", "engine", "max_failures", "micro_batches")}
    with pytest.raises(RecipeError, match=r"placement.max_failures: worker restarts need `engine: ray`"):
        vit(placement="{strategy: ddp, workers: 2, max_failures: 1}")
    with pytest.raises(RecipeError, match="ddp gives each worker its own GPU"):
        vit(placement="{strategy: ddp, device: 'cuda:1'}")
    with pytest.raises(RecipeError, match="needs at least two stages"):
        vit(placement="{strategy: pipeline, stages: [{modules: [backbone, heads], device: cpu}]}")
    with pytest.raises(RecipeError, match="is not a module path"):
        vit(
            placement="{strategy: pipeline, stages: [{modules: ['backbone..'], device: cpu}, {modules: [heads], device: cpu}]}"
        )


# --------------------------------------------------------------------------- bad placements, before anything exists


@pytest.mark.parametrize(
    ("placement", "message"),
    [
        ("{strategy: ddp, workers: 512}", r"placement.workers is 512 but this machine has \d+ CPU core"),
        ("{strategy: single, device: 'cuda:0'}", "CUDA is not available here"),
        ("{strategy: ddp, workers: 2, device: cuda}", "CUDA is not available here"),
        (
            "{strategy: pipeline, stages: [{modules: [backbone], device: cpu}, {modules: [heads], device: 'cuda:1'}]}",
            "CUDA is not available here",
        ),
        (
            "{strategy: pipeline, stages: [{modules: [backbone.patch_embd], device: cpu}, {modules: [heads], device: cpu}]}",
            r"no module 'backbone.patch_embd' \(did you mean 'backbone.patch_embed'",
        ),
        (
            "{strategy: pipeline, stages: [{modules: [heads], device: cpu}, {modules: [backbone], device: cpu}]}",
            r"out of forward order: 'heads' \(stage 0\) runs after 'backbone' \(stage 1\)",
        ),
        (
            "{strategy: pipeline, stages: [{modules: [backbone.patch_embed..backbone.blocks], device: cpu}, {modules: [heads], device: cpu}]}",
            r"leave parts of the model on no stage: backbone.cls_token, backbone.norm, backbone.pos_embed$",
        ),
        (
            "{strategy: pipeline, stages: [{modules: [backbone.norm..backbone.blocks], device: cpu}, {modules: [heads], device: cpu}]}",
            r"range 'backbone.norm..backbone.blocks' runs backwards",
        ),
        (
            "{strategy: pipeline, stages: [{modules: [backbone], device: cpu}, {modules: [backbone.head, heads], device: cpu}]}",
            r"stage 1 names 'backbone.head', which overlaps 'backbone' of stage 0",
        ),
    ],
)
def test_bad_placement_is_one_line_before_any_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, placement: str, message: str
) -> None:
    from surgery.build import build_command

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = write(tmp_path, vit_text(placement=placement))
    with pytest.raises(SurgeryError, match=message) as info:
        build_command(path, (), runs_root=tmp_path / "runs")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "runs").exists()


def test_engine_ray_without_ray_train_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from surgery.build import build_command

    monkeypatch.setitem(sys.modules, "ray.train.torch", None)  # `import ray.train.torch` now fails
    path = write(tmp_path, vit_text(placement="{strategy: ddp, workers: 2, engine: ray}"))
    with pytest.raises(SurgeryError, match=r"Ray Train is not installed; `pip install 'ray\[train\]'`"):
        build_command(path, (), runs_root=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def test_ray_workers_beyond_the_machine_fail_before_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from surgery.build import build_command

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    path = write(tmp_path, vit_text(placement="{strategy: ddp, workers: 64, engine: ray}"))
    started = time.monotonic()
    with pytest.raises(SurgeryError, match=r"placement.workers is 64 but (this machine|the Ray cluster)") as info:
        build_command(path, (), runs_root=tmp_path / "runs")
    assert "\n" not in str(info.value) and "--set placement.workers=" in str(info.value)
    assert not (tmp_path / "runs").exists()
    assert time.monotonic() - started < 10  # no local Ray started to find out


def test_torchrun_world_must_match_the_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from surgery.build import build_command

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    path = write(tmp_path, vit_text(placement="{strategy: ddp, workers: 2}"))
    with pytest.raises(SurgeryError, match=r"torchrun started 4 processes but placement.workers is 2"):
        build_command(path, (), runs_root=tmp_path / "runs")
    path = write(tmp_path, vit_text(placement="{}"), "single.yaml")
    with pytest.raises(SurgeryError, match=r"placement.strategy is 'single'; use `--set placement.strategy=ddp`"):
        build_command(path, (), runs_root=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- launchers


def test_a_launcher_runs_the_function_it_is_given() -> None:
    from surgery.launchers import InProcess
    from surgery.strategies import SingleDevice

    calls: list[tuple[tuple, dict]] = []
    placement = SingleDevice(torch.device("cpu"))
    recipe, run = vit(), Path("runs/vit/r")
    InProcess(placement).launch(lambda *a, **k: calls.append((a, k)), recipe, run, resume=True, force=False)
    assert calls == [((recipe, run), {"resume": True, "force": False, "placement": placement})]


TRAINING = ("surgery.train", "surgery.data", "surgery.optim", "surgery.tune", "surgery.build", "surgery.monitor")


def test_strategies_and_launchers_import_no_training_code() -> None:
    """Launchers receive `fit` from the command; importing it back would make a circle."""
    import ast

    for name in ("cluster", "devices", "ranks", "strategies", "pipeline", "launchers", "ray_train", "placement"):
        tree = ast.parse((ROOT / "surgery" / f"{name}.py").read_text())
        imported = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not [m for m in imported for t in TRAINING if m == t or m.startswith(t + ".") or m.startswith(t + "_")]


# --------------------------------------------------------------------------- pipeline


def test_pipeline_micro_batches_give_the_single_device_outputs_loss_and_gradients() -> None:
    from surgery.heads import compute_losses
    from surgery.model import build_model
    from surgery.placement import placement_for

    recipe = vit(placement=STAGES)
    single, staged = build_model(recipe), build_model(recipe)
    placement = placement_for(recipe)
    net = placement.prepare_model(staged)
    assert placement.unwrap(net) is staged
    inputs = torch.randn(10, 3, 16, 16, generator=torch.Generator().manual_seed(0))  # 4 micro-batches: 3+3+3+1
    targets = {"cls": torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])}
    results = []
    for model, forward in ((single, single), (staged, net)):
        model.train()
        outputs = forward(inputs)
        loss, _ = compute_losses(model, outputs, targets, recipe)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((outputs["cls"].detach(), loss.detach(), grads))
    (out_a, loss_a, grads_a), (out_b, loss_b, grads_b) = results
    torch.testing.assert_close(out_b, out_a)
    torch.testing.assert_close(loss_b, loss_a)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == len(list(single.parameters()))
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    where = placement.parameter_devices(net)
    assert where["backbone.pos_embed"] == "stage0:cpu" and where["heads.cls.0.weight"] == "stage1:cpu"


def test_pipeline_recipe_trains_and_checkpoints_plain_names(tmp_path: Path) -> None:
    from surgery.build import build_command

    run = build_command(write(tmp_path, vit_text(placement=STAGES)), (), runs_root=tmp_path / "runs")
    weights = load_file(str(run / "bundle" / "model.safetensors"))
    assert "backbone.pos_embed" in weights and not any(k.startswith(("model.", "module.")) for k in weights)


def test_plan_shows_each_module_on_its_stage_and_memory_per_stage() -> None:
    from surgery.plan import make_plan

    plan = make_plan(
        vit(
            placement=STAGES.replace("device: cpu}\n    - {", "device: 'cuda:0'}\n    - {").replace(
                "device: cpu}", "device: 'cuda:1'}"
            )
        ),
        depth=3,
    )
    rows = {row["name"]: row["devices"] for row in plan["modules"]}
    assert rows["backbone.blocks.2"] == ["stage0:cuda:0"] and rows["backbone.blocks.3"] == ["stage1:cuda:1"]
    assert rows["backbone.blocks"] == ["stage0:cuda:0", "stage1:cuda:1"]
    memory = plan["memory"]["per_device"]
    assert set(memory) == {"stage0:cuda:0", "stage1:cuda:1"}
    assert all(entry["weights"] > 0 and entry["activations"] > 0 for entry in memory.values())


# --------------------------------------------------------------------------- ddp on local processes


DDP = "{strategy: ddp, workers: 2, device: cpu}"


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from surgery.checkpoint import find_last

    return load_file(str(find_last(run) / "model.safetensors"))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-process DDP run: per-rank batch 4 (global 8), 3 epochs of 8 steps."""
    from surgery.build import build_command

    folder = tmp_path_factory.mktemp("ddp")
    text = vit_text(batch=4, samples=64, epochs=3, train="  checkpoint: {every_steps: 2}", placement=DDP)
    return build_command(write(folder, text), (), runs_root=folder / "runs", run_id="whole")


@pytest.mark.slow
def test_ddp_two_processes_reach_the_single_process_weights(ddp_run: Path, tmp_path: Path) -> None:
    from surgery.train import fit

    single = fit(vit(batch=8, samples=64, epochs=3, train="  checkpoint: {every_steps: 2}"), tmp_path / "single")
    a, b = _weights(ddp_run), load_file(str(single.last_checkpoint / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    rows = [json.loads(line) for line in (ddp_run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 24  # 64 samples / (2 ranks × 4) = 8 steps an epoch
    assert (ddp_run / "bundle" / "model.safetensors").is_file()


@pytest.mark.slow
def test_ddp_killed_mid_epoch_resumes_to_the_uninterrupted_result(ddp_run: Path, tmp_path: Path) -> None:
    from surgery.checkpoint import find_last

    text = vit_text(batch=4, samples=64, epochs=3, train="  checkpoint: {every_steps: 2}", placement=DDP)
    path = write(tmp_path, text)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [
        str(Path(sys.executable).parent / "surgery"),
        "build",
        str(path),
        "--runs",
        str(tmp_path / "runs"),
        "--run-id",
        "r",
    ]
    first = tmp_path / "runs" / "vit" / "r" / "checkpoints" / "step-00000002"
    process = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True, stderr=subprocess.PIPE)
    try:
        while not first.is_dir() and process.poll() is None:
            time.sleep(0.01)
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and both workers, mid-epoch 1
    finally:
        process.wait(timeout=60)
    run = tmp_path / "runs" / "vit" / "r"
    killed_at = int(find_last(run).name[5:])
    assert killed_at < 24, "the run finished before it could be killed"
    resumed = subprocess.run([*command, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _weights(run), _weights(ddp_run)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)


@pytest.mark.slow
def test_a_killed_ddp_worker_is_one_line_and_elastics_report_goes_to_the_run(tmp_path: Path) -> None:
    import psutil

    path = write(tmp_path, vit_text(batch=4, samples=64, epochs=50, placement=DDP))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [str(Path(sys.executable).parent / "surgery"), "build", str(path), "--runs", str(tmp_path / "runs")]
    process = subprocess.Popen(
        command, cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        checkpoints = tmp_path / "runs" / "vit" / "latest" / "checkpoints"
        workers: list[psutil.Process] = []
        while process.poll() is None and not (len(workers) == 2 and checkpoints.is_dir()):
            time.sleep(0.1)
            with contextlib.suppress(psutil.Error):
                children = psutil.Process(process.pid).children(recursive=True)
                # the two spawned workers, not multiprocessing's resource tracker beside them
                workers = [c for c in children if "spawn_main" in " ".join(c.cmdline())]
        assert len(workers) == 2, f"the build ended (exit {process.returncode}) before its two workers were seen"
        workers[-1].kill()  # a worker dies (the OOM killer, a kill -9)
        _, err = process.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    said = err.decode()
    assert process.returncode == 2, said[-3000:]
    assert re.fullmatch(r"error: ddp worker \d failed: Signal 9 \(SIGKILL\) received by PID \d+", said.strip()), said
    assert "SIGKILL" in (tmp_path / "runs" / "vit" / "latest" / "elastic.log").read_text()


@pytest.mark.slow
def test_a_torchrun_world_mismatch_is_printed_once(tmp_path: Path) -> None:
    torchrun = Path(sys.executable).parent / "torchrun"
    surgery = Path(sys.executable).parent / "surgery"
    command = [str(torchrun), "--nproc-per-node", "2", str(surgery), "build", "quickstart-ddp", "--runs", "runs"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [*command, "--set", "placement.workers=1"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode != 0
    line = "torchrun started 2 processes but placement.workers is 1; use `--set placement.workers=2`"
    assert done.stderr.count(f"error: {line}") == 1, done.stderr  # rank 0's, not once per rank
    assert f"traceback : {line}" in done.stderr  # torchrun's own failure summary names it too
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- ddp on Ray Train


def _quickstart(tmp_path: Path, placement: str, epochs: int = 1) -> Path:
    text = (ROOT / "recipes" / "quickstart.yaml").read_text()
    text = text.replace("epochs: 4", f"epochs: {epochs}").replace(
        "formats: [safetensors, onnx]", "formats: [safetensors]"
    )
    text = text.replace("monitor:\n", "monitor:\n  progress: none\n")
    text = text.replace("  batch_size: 64\n", "  batch_size: 64\n  limit_train: 512\n  limit_val: 128\n")
    return write(tmp_path, text + f"placement: {placement}\n", "quickstart.yaml")


@pytest.mark.slow
def test_ray_train_two_workers_run_the_quickstart(ray_session, tmp_path: Path) -> None:
    from surgery.build import build_command

    path = _quickstart(tmp_path, "{strategy: ddp, workers: 2, engine: ray}")
    run = build_command(path, (), runs_root=tmp_path / "runs")
    assert (run / "recipe.lock.yaml").is_file() and any((run / "tb").iterdir())
    assert json.loads((run / "bundle" / "manifest.json").read_text())["heads"]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4  # 512 training digits / (2 workers × 64)


def _ray_workers(state: str | None = None) -> list[dict]:
    """Ray Train workers of the connected Ray, from the GCS actor table (`ray.util.state` would
    need the dashboard, which the test Rays don't start)."""
    from ray._private.state import actors

    return [a for a in actors(actor_state_name=state).values() if a["ActorClassName"] == "RayTrainWorker"]


@pytest.mark.slow
def test_ray_train_worker_killed_restarts_from_the_last_checkpoint(ray_session, tmp_path: Path) -> None:
    from surgery.checkpoint import find_last
    from surgery.ray_train import train_on_ray
    from surgery.recipe import load_recipe
    from surgery.runs import run_folder
    from surgery.train import fit

    path = _quickstart(tmp_path, "{strategy: ddp, workers: 2, engine: ray, max_failures: 1}", epochs=3)
    recipe = load_recipe(path, ["train.checkpoint.every_steps=2"])
    run = run_folder(tmp_path / "runs", recipe.name, "r", resume=False)
    outcome: dict[str, object] = {}
    thread = threading.Thread(target=lambda: outcome.update(result=train_on_ray(fit, recipe, run)), daemon=True)
    thread.start()
    first = run / "checkpoints" / "step-00000002"
    while not first.is_dir() and thread.is_alive():
        time.sleep(0.02)
    alive = _ray_workers("ALIVE")
    assert len(alive) == 2
    os.kill(alive[-1]["Pid"], signal.SIGKILL)
    before = {worker["ActorID"] for worker in _ray_workers()}
    thread.join(timeout=600)
    assert "result" in outcome, "the run did not finish after its worker was restarted"
    assert len({worker["ActorID"] for worker in _ray_workers()} - before) == 2  # a new group of two workers
    assert find_last(run).name == "step-00000012"  # 3 epochs of 4 steps
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in rows]
    assert steps == sorted(steps) and max(steps) == 12
    logged = [(row["step"], key) for row in rows for key in row if key not in ("step", "epoch", "time")]
    assert len(logged) == len(set(logged))  # a step logs several lines (train, epoch, val), but no scalar twice


@pytest.mark.slow
def test_ray_train_run_failed_after_rotation_resumes(ray_session, tmp_path: Path) -> None:
    """`keep_best: 0` keeps only the last checkpoint, so the rotation removes checkpoints Ray was
    given and its run snapshot still lists; `build --resume` after a failure continues anyway."""
    from surgery.build import build_command
    from surgery.checkpoint import find_last

    path = _quickstart(tmp_path, "{strategy: ddp, workers: 2, engine: ray}", epochs=8)
    sets = ["train.checkpoint.keep_best=0"]
    outcome: dict[str, str] = {}

    def first() -> None:
        try:
            build_command(path, sets, runs_root=tmp_path / "runs", run_id="r")
        except SurgeryError as exc:
            outcome["error"] = str(exc)

    thread = threading.Thread(target=first, daemon=True)
    thread.start()
    run = tmp_path / "runs" / "quickstart" / "r"
    first_epoch, snapshot = run / "checkpoints" / "step-00000004", run / "checkpoint_manager_snapshot.json"

    def ray_lists_a_rotated_checkpoint() -> bool:  # Ray's controller takes reports every few seconds
        listed = snapshot.is_file() and first_epoch.name in snapshot.read_text()
        return listed and not first_epoch.exists()

    while not ray_lists_a_rotated_checkpoint() and thread.is_alive():
        time.sleep(0.02)
    os.kill(_ray_workers("ALIVE")[-1]["Pid"], signal.SIGKILL)  # no max_failures: the run fails
    thread.join(timeout=600)
    assert "error" in outcome and "\n" not in outcome["error"]
    assert int(find_last(run).name[5:]) < 32, "the run finished before it could be killed"
    build_command(path, sets, resume=True, runs_root=tmp_path / "runs", run_id="r")
    assert find_last(run).name == "step-00000032"  # 8 epochs of 4 steps
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and max(steps) == 32


@pytest.mark.slow
def test_ray_train_on_two_nodes_one_worker_each(tmp_path: Path) -> None:
    """A simulated two-node cluster (one CPU each) needs its own Ray: it runs in a subprocess so
    it never meets the session's Ray."""
    path = _quickstart(tmp_path, "{strategy: ddp, workers: 2, engine: ray}")
    script = f"""
import json, ray
from ray.cluster_utils import Cluster
from ray._private.state import actors
from surgery.build import build_command
cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 1, "include_dashboard": False}})
cluster.add_node(num_cpus=1)
ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
try:
    run = build_command({str(path)!r}, (), runs_root={str(tmp_path / "runs")!r})
    workers = [a for a in actors().values() if a["ActorClassName"] == "RayTrainWorker"]
    nodes = {{a["Address"]["NodeID"] for a in workers}}
    print(json.dumps({{"run": str(run), "nodes": len(nodes), "cluster": len(ray.nodes())}}))
finally:
    ray.shutdown()
    cluster.shutdown()
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["cluster"] == 2 and report["nodes"] == 2
    assert (Path(report["run"]) / "bundle" / "model.safetensors").is_file()


# --------------------------------------------------------------------------- shipped recipes


TINY_BUILD = ["train.epochs=1", "data.limit_train=256", "data.limit_val=64", "export.formats=[safetensors]"]


def test_shipped_pipeline_recipe_validates_plans_and_builds(tmp_path: Path) -> None:
    from surgery.build import build_command
    from surgery.plan import make_plan
    from surgery.recipe import load_recipe

    recipe = load_recipe("quickstart-pipeline")
    memory = make_plan(recipe, depth=1)["memory"]["per_device"]
    assert set(memory) == {"stage0:cuda:0", "stage1:cuda:1"}
    on_cpu = [*TINY_BUILD, "placement.stages[0].device=cpu", "placement.stages[1].device=cpu"]
    run = build_command("quickstart-pipeline", on_cpu, runs_root=tmp_path / "runs")
    assert (run / "bundle" / "model.safetensors").is_file()


@pytest.mark.slow
def test_shipped_ddp_recipe_validates_plans_and_builds(tmp_path: Path) -> None:
    from surgery.build import build_command
    from surgery.plan import make_plan
    from surgery.recipe import load_recipe

    recipe = load_recipe("quickstart-ddp", ["placement.device=cpu"])
    assert list(make_plan(recipe, depth=1)["memory"]["per_device"]) == ["cpu ×2 (each)"]
    run = build_command("quickstart-ddp", [*TINY_BUILD, "placement.device=cpu"], runs_root=tmp_path / "runs")
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4  # 256 samples / (2 workers × 32)
    assert (run / "bundle" / "model.safetensors").is_file()


@pytest.mark.slow
def test_build_under_torchrun_makes_one_run_folder(tmp_path: Path) -> None:
    torchrun = Path(sys.executable).parent / "torchrun"
    surgery = Path(sys.executable).parent / "surgery"
    sets = [*TINY_BUILD, "placement.device=cpu", "monitor.progress=none"]
    command = [str(torchrun), "--nproc-per-node", "2", str(surgery), "build", "quickstart-ddp", "--runs", "runs"]
    command += [arg for s in sets for arg in ("--set", s)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = [p for p in (tmp_path / "runs" / "quickstart-ddp").iterdir() if not p.is_symlink()]
    assert len(runs) == 1 and (runs[0] / "bundle" / "model.safetensors").is_file()
    steps = [json.loads(line)["step"] for line in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4  # 256 samples / (2 ranks × 32)


@pytest.mark.slow
def test_a_worker_error_is_one_line_from_the_launcher(tmp_path: Path) -> None:
    from surgery.build import build_command

    # data is read by the workers: a folder that is not there fails each of them (settings the
    # command can check, such as fp16 on a CPU, are refused before any worker starts)
    text = vit_text(placement=DDP).replace("source: synthetic,", f"source: image_folder, train: {tmp_path / 'none'},")
    path = write(tmp_path, text)
    with pytest.raises(SurgeryError, match=r"^ddp worker \d failed: DataError: .*none"):
        build_command(path, (), runs_root=tmp_path / "runs")
