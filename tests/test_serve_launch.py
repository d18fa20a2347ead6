"""`surgery serve` and `surgery predict` before any server runs: bad bundles fail the command in
seconds, in one line, before Ray starts; a replica's start-up failure is named; a missing input
file is said to be missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from serve.client import _parse_input
from serve.launch import failure_reason
from surgery.errors import SurgeryError

RECIPE = """
name: tiny
backbone: {source: timm, name: test_resnet, pretrained: false}
input: {size: [32, 32]}
heads:
  - name: cls
    layers: [{linear: {out_features: 3}}]
    loss: cross_entropy
"""
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from surgery.export import export_bundle
    from surgery.model import build_model
    from surgery.recipe import load_recipe_text

    recipe = load_recipe_text(RECIPE)
    out = tmp_path_factory.mktemp("launch") / "tiny"
    return export_bundle(build_model(recipe, load_weights=False), recipe, out, formats=["safetensors"])


def _surgery(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-c", "from cli import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=cwd,
    )


def _tampered(bundle: Path, tmp_path: Path) -> Path:
    import shutil

    bad = Path(shutil.copytree(bundle, tmp_path / "bad"))
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["heads"][0]["out_features"] = 5
    (bad / "manifest.json").write_text(json.dumps(manifest))
    return bad


@pytest.mark.parametrize("extra", [[], ["--config-out", "serve.yaml"]])
def test_a_tampered_bundle_fails_serve_before_ray_starts(bundle, tmp_path, extra):
    done = _surgery("serve", str(_tampered(bundle, tmp_path)), "--port", "1", *extra, cwd=tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stdout + done.stderr
    assert "heads[0].out_features differs from the model's (3)" in lines[0]
    assert "Traceback" not in done.stderr and "ray" not in done.stdout.lower()
    assert not (tmp_path / "serve.yaml").exists()


@pytest.mark.parametrize("extra", [[], ["--config-out", "serve.yaml"]])
def test_a_listed_format_that_does_not_load_fails_serve_before_ray_starts(bundle, tmp_path, extra):
    """A garbage model.onnx, re-hashed into the manifest, is refused: never announced as a format."""
    import shutil

    from surgery.bundle import hash_files

    bad = Path(shutil.copytree(bundle, tmp_path / "bad"))
    (bad / "model.onnx").write_bytes(b"\x08\x07 not an onnx model")
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["formats"]["onnx"] = {"file": "model.onnx", "max_abs_diff": 0.0}
    manifest["files"] = hash_files(bad)
    (bad / "manifest.json").write_text(json.dumps(manifest))
    done = _surgery("serve", str(bad), "--port", "1", *extra, cwd=tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stdout + done.stderr
    assert (
        lines[0]
        == f"error: {bad / 'model.onnx'}: listed as the bundle's onnx format, but it is not an ONNX model; export the bundle again"
    )
    assert not (tmp_path / "serve.yaml").exists()


def _greedy(bundle: Path, tmp_path: Path) -> Path:
    """The bundle, its recipe asking for far more than any machine should give (hashes redone)."""
    import shutil

    from surgery.bundle import hash_files

    greedy = Path(shutil.copytree(bundle, tmp_path / "greedy"))
    recipe = greedy / "recipe.yaml"
    recipe.write_text(recipe.read_text() + "\nserve: {replicas: 64, max_body_mb: 100000, request_timeout_s: 1.0e+8}\n")
    manifest = json.loads((greedy / "manifest.json").read_text())
    manifest.update(recipe_sha256=None, files=hash_files(greedy))
    (greedy / "manifest.json").write_text(json.dumps(manifest))
    return greedy


def test_a_recipe_cannot_ask_ray_for_more_than_the_machine_has(bundle, tmp_path, capsys, monkeypatch):
    from serve.config import MAX_BODY_MB, MAX_REQUEST_TIMEOUT_S, RAY_TIMEOUT_MARGIN_S, Machine
    from serve.launch import serve_config

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    greedy = _greedy(bundle, tmp_path)
    config = serve_config({"bundles": [str(greedy)]}, "127.0.0.1", 8000, Machine(cpus=2, memory_bytes=2**34))
    (deployment,) = config["applications"][0]["deployments"]
    assert deployment["num_replicas"] == 2
    # Ray's own timeout (a 408 in text) comes well after the app's JSON 504
    assert config["http_options"]["request_timeout_s"] == MAX_REQUEST_TIMEOUT_S + RAY_TIMEOUT_MARGIN_S
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith(f"warning: {greedy / 'recipe.yaml'}: serve.") for line in lines)
    assert any(line.endswith("serve.replicas 64 capped to 2 (2 CPUs here)") for line in lines), lines

    from serve.app import build_app  # what a replica is given: the same caps

    app = build_app({"bundles": [str(greedy)]})
    ingress = app._bound_deployment  # one bundle: the ingress is the model
    settings = ingress.init_args[1]
    assert settings["max_body_mb"] == {"tiny": MAX_BODY_MB}
    assert settings["request_timeout_s"] == {"tiny": MAX_REQUEST_TIMEOUT_S}


RAY_STATUS_MESSAGE = """The deployment failed to start 3 times in a row. This may be due to a problem with its \
constructor or initial health check failing. See controller logs for details. Error:
ray::ServeReplica:surgery:SurgeryAPI.initialize_and_get_metadata() (pid=1, ip=127.0.0.1)
  File "/x/ray/serve/_private/replica.py", line 1867, in initialize
    raise RuntimeError(traceback.format_exc()) from None
RuntimeError: Traceback (most recent call last):
  File "/x/serve/runtime.py", line 72, in __init__
    loaded = load_bundle(Path(bundle))
surgery.errors.BundleError: /b/model.safetensors: sha256 mismatch (manifest fca7…, file c3f2…); export the bundle again
"""


def test_a_replica_that_cannot_start_is_named_with_its_reason():
    assert failure_reason("SurgeryAPI", RAY_STATUS_MESSAGE) == (
        "a replica of SurgeryAPI could not start: /b/model.safetensors: sha256 mismatch "
        "(manifest fca7…, file c3f2…); export the bundle again"
    )
    other = "Traceback (most recent call last):\n  File x\nModuleNotFoundError: No module named 'timm'\n"
    assert (
        failure_reason("model-a", other)
        == "a replica of model-a could not start: ModuleNotFoundError: No module named 'timm'"
    )
    assert failure_reason("model-a", "") is None


def test_predict_says_a_missing_file_is_missing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("missing-file.png", "sub/dir/x.jpg", "./nothing"):
        with pytest.raises(SurgeryError, match=f"{name}: no such file"):
            _parse_input(name)
    (tmp_path / "folder").mkdir()
    with pytest.raises(SurgeryError, match="is a folder"):
        _parse_input("folder")
    assert _parse_input("a fine day") == ("text", "a fine day")
    assert _parse_input("good") == ("text", "good")
    assert _parse_input("[1, 2]") == ("json", [1, 2])
    (tmp_path / "x.png").write_bytes(b"png")
    assert _parse_input("x.png") == ("file", Path("x.png"))


@pytest.mark.parametrize("length", [256, 300, 1000, 4095, 5000])
def test_predict_takes_long_inline_arrays_and_text_as_data(tmp_path, monkeypatch, length):
    """Longer than a file name may be (255 bytes a part): data, never "File name too long"."""
    monkeypatch.chdir(tmp_path)
    values = [round(i / 7, 3) for i in range(length)]
    array = json.dumps(values)[:length]
    array = array[: array.rindex(",")] + "]"
    assert _parse_input(array) == ("json", json.loads(array))
    assert _parse_input(array.replace(" ", "")) == ("json", json.loads(array))
    text = ("word " * length)[:length]
    assert _parse_input(text) == ("text", text)
    assert _parse_input("x" * length) == ("text", "x" * length)


def test_predict_command_fails_on_a_missing_file_before_sending(tmp_path):
    done = _surgery("predict", "http://127.0.0.1:9/v1/models/m", "missing-file.png", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip() == "error: missing-file.png: no such file", done.stderr


def test_the_detach_hint_says_how_rays_cli_reaches_this_ray(capsys):
    from serve.launch import _announce

    _announce([], "127.0.0.1", 8000, detach=True)
    out = capsys.readouterr().out
    assert "`RAY_AUTH_MODE=token serve shutdown -y`" in out  # Ray's CLI does not turn token auth on itself
