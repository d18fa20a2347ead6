"""Ray clusters as users start them: `RAY_ADDRESS` pointing at a `ray start --head` cluster, which
requires its token, works for build, tune and serve (the token found where Ray's CLI finds it), and
a cluster that refuses us is one line; Ray's noise stays out of the terminal."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from surgery import cluster
from surgery.errors import SurgeryError

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def ray_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A HOME of its own and no Ray settings from outside; RAY_AUTH_MODE restored afterwards."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_ADDRESS"):
        monkeypatch.setenv(name, "x")  # recorded, so whatever the test sets is undone
        monkeypatch.delenv(name)
    monkeypatch.setattr(cluster, "_reload_ray_config", lambda: None)  # Ray's config of this process stays
    return tmp_path


def _fake_ray(monkeypatch: pytest.MonkeyPatch, init) -> None:
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)


def test_a_token_at_hand_turns_token_auth_on_for_ray_address(ray_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}
    _fake_ray(monkeypatch, lambda **kw: seen.update(mode=os.environ.get("RAY_AUTH_MODE"), address=kw["address"]))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6390")
    assert cluster.start_ray(worker_logs=False)
    assert seen == {"mode": None, "address": "127.0.0.1:6390"}  # no token anywhere: Ray's own default

    (ray_env / ".ray").mkdir()
    (ray_env / ".ray" / "auth_token").write_text(secrets.token_hex(32))  # what `ray start` / `ray.init` wrote
    assert cluster.start_ray(worker_logs=False)
    assert seen["mode"] == "token"


@pytest.mark.parametrize("where", ["RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"])
def test_the_token_is_found_where_rays_loader_looks(ray_env: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    token = ray_env / "token.txt"
    token.write_text("secret\n")
    monkeypatch.setenv(where, "secret" if where == "RAY_AUTH_TOKEN" else str(token))
    assert cluster.ray_token_available()
    cluster.use_ray_token()
    assert os.environ["RAY_AUTH_MODE"] == "token"


def test_an_explicit_auth_mode_is_left_alone(ray_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_AUTH_TOKEN", "secret")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    cluster.use_ray_token()
    assert os.environ["RAY_AUTH_MODE"] == "disabled"


def test_a_refused_token_is_one_line_and_rays_noise_stays_out(
    ray_env: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    def refused(**kw: object) -> None:
        for _ in range(20):  # what Ray's C++ GCS client prints, straight to file descriptor 2
            os.write(2, b"gcs_client.cc:210: Failed to get cluster ID: Unauthenticated: InvalidAuthToken\n")
        raise ConnectionError("Failed to connect to Ray cluster at 192.0.2.2:6390")

    _fake_ray(monkeypatch, refused)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6390")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "wrong")
    with pytest.raises(SurgeryError) as info:
        cluster.start_ray(worker_logs=False)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("could not connect to the Ray cluster at RAY_ADDRESS=127.0.0.1:6390: it refused")
    assert "RAY_AUTH_TOKEN=<token> or RAY_AUTH_TOKEN_PATH=<file>" in message
    terminal = capfd.readouterr()
    assert "InvalidAuthToken" not in terminal.err + terminal.out
    log = Path(message.rsplit("(Ray's log: ", 1)[1].rstrip(")"))
    assert "InvalidAuthToken" in log.read_text()
    log.unlink()


# --------------------------------------------------------------------------- a real `ray start --head`


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """`ray start --head` as a user starts it, with the token a local `ray.init` left in
    ~/.ray/auth_token (so the cluster requires it), in a HOME and temp folder of its own; stopped
    afterwards. Yields the environment a user's shell would have: HOME and RAY_ADDRESS, nothing else."""
    home = tmp_path_factory.mktemp("home")
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # Ray's socket paths must stay short
    with contextlib.closing(__import__("socket").socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0")
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=2",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={temp}",
            "--include-dashboard=false",
            "--disable-usage-stats",
            "--block",  # stops every process it started when it is stopped
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        said = []
        for line in head.stdout:
            said.append(line)
            if "Ray runtime started" in line:
                break
        else:
            pytest.fail("`ray start --head` failed:\n" + "".join(said[-20:]))
        assert "Token authentication is enabled" in "".join(said)
        yield {**env, "RAY_ADDRESS": f"127.0.0.1:{port}", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


def _surgery(env: dict[str, str], cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "surgery"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


TINY = ["train.epochs=1", "data.limit_train=256", "data.limit_val=64", "export.formats=[safetensors]"]


def _sets(values: list[str]) -> list[str]:
    return [arg for value in values for arg in ("--set", value)]


@pytest.mark.slow
def test_build_on_a_ray_start_cluster(ray_head: dict[str, str], tmp_path: Path) -> None:
    done = _surgery(ray_head, tmp_path, "build", "quickstart-ddp", *_sets(TINY))
    said = done.stdout + done.stderr
    assert done.returncode == 0, said[-3000:]
    assert "InvalidAuthToken" not in said
    assert said.count("epoch 1/1 done") == 1, said  # rank 0's progress, once; nobody else's
    assert "TrainController" not in said and "Reporting training result" not in said
    run = tmp_path / "runs" / "quickstart-ddp" / "latest"
    assert (run / "bundle" / "model.safetensors").is_file()
    assert "RayTrainWorker" in (run / "ray.log").read_text()  # Ray's output is kept, in the run's log


@pytest.mark.slow
def test_workers_beyond_the_cluster_fail_before_any_folder(ray_head: dict[str, str], tmp_path: Path) -> None:
    done = _surgery(ray_head, tmp_path, "build", "quickstart-ddp", "--set", "placement.workers=3")
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip() == (
        "error: placement.workers is 3 but the Ray cluster has 2 CPU(s); each Ray Train worker takes one CPU: "
        "use `--set placement.workers=2`"
    )
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_tune_on_a_ray_start_cluster(ray_head: dict[str, str], tmp_path: Path) -> None:
    sets = [*TINY, "tune.search=random", "tune.num_samples=1", "data.limit_train=128"]
    done = _surgery(ray_head, tmp_path, "tune", "quickstart-tune", *_sets(sets))
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "InvalidAuthToken" not in done.stdout + done.stderr
    assert "on the Ray cluster at 127.0.0.1:" in done.stdout
    assert list((tmp_path / "runs" / "quickstart-tune").glob("tune-*/quickstart-tune.tuned.yaml"))


@pytest.mark.slow
def test_serve_connects_to_a_ray_start_cluster(ray_head: dict[str, str], tmp_path: Path) -> None:
    script = "import ray\nfrom serve.launch import _start_ray\n_start_ray(False)\nprint(ray.cluster_resources()['CPU'])\nray.shutdown()\n"
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=ray_head, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "2.0"
    assert "InvalidAuthToken" not in done.stderr


@pytest.mark.slow
def test_a_wrong_token_is_one_line(ray_head: dict[str, str], tmp_path: Path) -> None:
    done = _surgery({**ray_head, "RAY_AUTH_TOKEN": "wrong"}, tmp_path, "build", "quickstart-ddp", timeout=300)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "it refused this process's token" in lines[0], done.stderr[-3000:]
    assert not (tmp_path / "runs").exists()
    log = Path(lines[0].rsplit("(Ray's log: ", 1)[1].rstrip(")"))
    assert "InvalidAuthToken" in log.read_text()  # Ray's 20 s of retries, kept out of the terminal
    log.unlink()
