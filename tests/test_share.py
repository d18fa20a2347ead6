"""Sharing trained models: pack → pull → load, signatures, and every refusal of a bad archive."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import textwrap
from pathlib import Path

import pytest
import torch

from surgery import archive as archive_module
from surgery.bundle import load_bundle
from surgery.errors import SurgeryError
from surgery.export import export_bundle
from surgery.keys import new_key
from surgery.model import build_model
from surgery.recipe import load_recipe_text
from surgery.share import pack, pull

RECIPE = """
name: shared-tiny
description: A tiny digit classifier to share.
backbone: {source: timm, name: test_resnet, pretrained: false}
input: {size: [16, 16]}
heads:
  - name: digit
    layers: [{linear: {out_features: 3}}]
    loss: cross_entropy
    labels: [a, b, c]
data: {source: digits, batch_size: 8}
export: {formats: [safetensors, onnx, torchscript]}
"""


@pytest.fixture(autouse=True)
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SURGERY_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("SURGERY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    tmp = tmp_path_factory.mktemp("share")
    recipe = load_recipe_text(textwrap.dedent(RECIPE), base_dir=tmp)
    torch.manual_seed(0)
    model = build_model(recipe, load_weights=False).eval()
    return model, export_bundle(model, recipe, tmp / "bundle")


@pytest.fixture
def archive(exported, tmp_path: Path) -> Path:
    return pack(exported[1], tmp_path / "model.tar")[0]


def test_pack_pull_round_trip_loads_the_same_model(exported, archive: Path, tmp_path: Path) -> None:
    model, _ = exported
    folder, signer = pull(str(archive), tmp_path / "pulled")
    assert signer is None
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "bundle", "pack.json", "recipe.yaml"]
    assert not (folder / "bundle" / "model.ts").exists()  # TorchScript holds pickles: left out
    loaded = load_bundle(folder / "bundle")
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded.model(x)["digit"], model(x)["digit"])
    card = (folder / "README.md").read_text()
    for section in (
        "## Task",
        "labels: a, b, c",
        "## Metrics",
        "## Data",
        "## Training",
        "## Provenance",
        "## Intended use",
    ):
        assert section in card
    from serve.launch import resolve_bundle

    assert resolve_bundle(folder) == folder / "bundle"  # `surgery serve FOLDER` takes it as it is


@pytest.fixture(scope="module")
def run_folder(exported, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder as `surgery build` leaves it: its lock (the resolved recipe under provenance
    comments, so not the bundle's recipe.yaml byte for byte) beside bundle/."""
    run = tmp_path_factory.mktemp("runs") / "shared-tiny" / "20250101-000000"
    run.mkdir(parents=True)
    shutil.copytree(exported[1], run / "bundle")
    lock = "# surgery lock: the resolved recipe of this run\n# recipe: shared.yaml\n"
    (run / "recipe.lock.yaml").write_text(lock + (run / "bundle" / "recipe.yaml").read_text())
    return run


def test_pack_pull_of_a_run_folder_loads(exported, run_folder: Path, tmp_path: Path) -> None:
    packed, _ = pack(run_folder, tmp_path / "run.tar")
    folder, _ = pull(str(packed), tmp_path / "pulled")
    assert (folder / "recipe.yaml").read_text() == (run_folder / "recipe.lock.yaml").read_text()
    assert "recipe: shared.yaml" in (folder / "README.md").read_text()  # provenance from the lock
    loaded = load_bundle(folder / "bundle")
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded.model(x)["digit"], exported[0](x)["digit"])


@pytest.mark.slow
def test_a_built_run_packs_pulls_and_loads_as_the_readme_says(tmp_path: Path) -> None:
    """The user's way (issue 21): `surgery build`, `surgery pack runs/<recipe>/latest`, `surgery
    pull`, then the pulled bundle loads."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"}

    def surgery(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "cli", *args], capture_output=True, text=True, env=env, timeout=600
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    surgery("build", "quickstart", "--set", "train.epochs=1", "--runs", "runs")
    surgery("pack", "runs/quickstart/latest", "--out", "q.tar")
    assert "pulled" in surgery("pull", "q.tar")
    assert (tmp_path / "q" / "recipe.yaml").read_text() == (
        tmp_path / "runs/quickstart/latest/recipe.lock.yaml"
    ).read_text()
    loaded = load_bundle(tmp_path / "q" / "bundle")
    assert loaded.manifest["name"] == "quickstart" and loaded.labels["digit"] == [str(i) for i in range(10)]


def test_a_root_file_cannot_stand_in_for_a_bundle_file(run_folder: Path, tmp_path: Path) -> None:
    members = _members(pack(run_folder, tmp_path / "run.tar")[0])
    members["recipe.yaml"] = members.pop("bundle/recipe.yaml")  # the bundle's own recipe moved to the root
    doc = json.loads(members["pack.json"])
    doc["files"]["recipe.yaml"] = doc["files"].pop("bundle/recipe.yaml")
    members["pack.json"] = json.dumps(doc).encode()
    _refused(_write(tmp_path / "x.tar", members), tmp_path, "bundle/recipe.yaml is missing")


def test_load_bundle_refuses_a_lying_safetensors_header_before_building(
    exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib

    bundle = Path(shutil.copytree(exported[1], tmp_path / "b"))
    raw = json.dumps({"w": {"dtype": "F32", "shape": [10**12], "data_offsets": [0, 4 * 10**12]}}).encode()
    (bundle / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 64)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["model.safetensors"] = hashlib.sha256((bundle / "model.safetensors").read_bytes()).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr("surgery.model.build_model", lambda *a, **k: pytest.fail("built a model first"))
    with pytest.raises(SurgeryError, match=r"model.safetensors: not a safetensors file \(its tensors cover"):
        load_bundle(bundle)


def test_signed_round_trip_and_a_tampered_one(exported, tmp_path: Path) -> None:
    new_key("alice")
    signed, _ = pack(exported[1], tmp_path / "signed.tar", sign="alice")
    folder, signer = pull(str(signed), tmp_path / "ok")
    assert signer is not None and signer.endswith("alice") and (folder / "bundle" / "manifest.json").is_file()
    members = _members(signed)
    doc = json.loads(members["pack.json"])
    doc["name"] = "evil"  # any change to the signed manifest breaks the signature
    members["pack.json"] = json.dumps(doc).encode()
    tampered = _write(tmp_path / "tampered.tar", members)
    with pytest.raises(SurgeryError, match="bad signature"):
        pull(str(tampered), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_untrusted_signer_is_refused(exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    new_key("mallory")
    signed, _ = pack(exported[1], tmp_path / "m.tar", sign="mallory")
    monkeypatch.setenv("SURGERY_CONFIG_DIR", str(tmp_path / "someone-else"))
    with pytest.raises(SurgeryError, match="not in your trust list"):
        pull(str(signed), tmp_path / "m")


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def _write(path: Path, members: dict[str, bytes], extra: list[tarfile.TarInfo] = ()) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.size else None)
    return path


def _refused(archive: Path, tmp_path: Path, match: str) -> None:
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SurgeryError, match=match):
        pull(str(archive), tmp_path / "target")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written anywhere


def test_hash_mismatch_is_refused(archive: Path, tmp_path: Path) -> None:
    members = _members(archive)
    members["bundle/model.safetensors"] = members["bundle/model.safetensors"][:-8] + b"\0" * 8
    _refused(_write(tmp_path / "x.tar", members), tmp_path, "does not match its sha256")


def test_unsigned_archive_from_a_url_needs_allow_unsigned(archive: Path, tmp_path: Path, http_folder) -> None:
    url = http_folder(archive.parent) + archive.name
    with pytest.raises(SurgeryError, match="not signed"):
        pull(url, tmp_path / "from-url")
    assert not (tmp_path / "from-url").exists()
    folder, _ = pull(url, tmp_path / "from-url", allow_unsigned=True)
    assert (folder / "bundle" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("name", "match"),
    [("/etc/evil", "absolute path"), ("../evil", "absolute path"), ("bundle/../../evil", "absolute path")],
)
def test_paths_outside_the_folder_are_refused(archive: Path, tmp_path: Path, name: str, match: str) -> None:
    members = _members(archive) | {name: b"boom"}
    _refused(_write(tmp_path / "x.tar", members), tmp_path, match)
    assert not (tmp_path.parent / "evil").exists()


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        (tarfile.SYMTYPE, "is a link"),
        (tarfile.LNKTYPE, "is a link"),
        (tarfile.CHRTYPE, "device"),
        (tarfile.FIFOTYPE, "device"),
    ],
)
def test_links_and_devices_are_refused(archive: Path, tmp_path: Path, kind: bytes, match: str) -> None:
    info = tarfile.TarInfo("bundle/extra")
    info.type = kind
    info.linkname = "/etc/passwd"
    _refused(_write(tmp_path / "x.tar", _members(archive), [info]), tmp_path, match)


@pytest.mark.parametrize("name", ["bundle/model.pkl", "bundle/weights.pt", "bundle/innocent.json"])
def test_pickles_are_refused(archive: Path, tmp_path: Path, name: str) -> None:
    import pickle

    members = _members(archive) | {name: pickle.dumps({"a": 1})}
    _refused(_write(tmp_path / "x.tar", members), tmp_path, "pickle")


def test_members_over_the_size_limit_are_refused(
    archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(archive_module, "MAX_MEMBER_BYTES", 1 << 20)  # model.onnx and the weights are bigger
    _refused(archive, tmp_path, "is over the 1 MiB limit")


def test_too_many_members_are_refused(archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(archive_module, "MAX_MEMBERS", 3)
    _refused(archive, tmp_path, "more than 3 members")


def test_unknown_format_version_is_refused(archive: Path, tmp_path: Path) -> None:
    members = _members(archive)
    doc = json.loads(members["pack.json"])
    doc["format_version"] = 99
    members["pack.json"] = json.dumps(doc).encode()
    _refused(_write(tmp_path / "x.tar", members), tmp_path, "unknown pack format_version 99")


def test_a_member_that_is_both_file_and_folder_is_refused(archive: Path, tmp_path: Path) -> None:
    members = _members(archive) | {"README.md/inner": b"x"}
    _refused(_write(tmp_path / "x.tar", members), tmp_path, "cannot unpack it")


def test_extra_files_not_in_the_manifest_are_refused(archive: Path, tmp_path: Path) -> None:
    members = _members(archive) | {"bundle/notes.txt": b"hello"}
    _refused(_write(tmp_path / "x.tar", members), tmp_path, "files not in pack.json")


def test_pull_never_overwrites(archive: Path, tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    with pytest.raises(SurgeryError, match="exists already"):
        pull(str(archive), tmp_path / "taken")
    assert (tmp_path / "taken" / "mine.txt").read_text() == "keep"


def test_pack_refuses_a_damaged_bundle(exported, tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(exported[1], tmp_path / "b"))
    (bundle / "model.onnx").write_bytes(b"broken")
    with pytest.raises(SurgeryError, match="sha256 mismatch"):
        pack(bundle, tmp_path / "x.tar")


@pytest.mark.slow
def test_pulled_model_serves_and_predicts(exported, archive: Path, tmp_path: Path, free_port) -> None:
    """pack → pull → `surgery serve FOLDER` → `surgery predict`, the prediction equal to the original model's."""
    import signal
    import subprocess
    import sys
    import time

    import httpx
    from PIL import Image

    from surgery.preprocess import images_to_batch

    folder, _ = pull(str(archive), tmp_path / "pulled")
    image_file = tmp_path / "digit.png"
    Image.new("L", (16, 16), 200).save(image_file)
    model, _ = exported
    with torch.inference_mode():
        expected = model(images_to_batch([Image.open(image_file)], load_bundle(folder / "bundle").input_spec))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cli = [sys.executable, "-c", "from cli import main; main()"]
    proc = subprocess.Popen(
        [*cli, "serve", str(folder), "--port", str(port), "--replicas", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail("surgery serve did not come up with the pulled model in 180 s")
        url = f"http://127.0.0.1:{port}/v1/models/shared-tiny"
        out = subprocess.run(
            [*cli, "predict", url, str(image_file)], capture_output=True, text=True, env=env, timeout=60
        )
        assert out.returncode == 0, out.stderr
        top = ["a", "b", "c"][int(expected["digit"][0].argmax())]
        assert str(image_file) in out.stdout and top in out.stdout, out.stdout
        response = httpx.post(f"{url}:predict", content=image_file.read_bytes(), headers={"content-type": "image/png"})
        served = response.json()["predictions"][0]["digit"]["output"]
        torch.testing.assert_close(torch.tensor(served), expected["digit"][0].float(), atol=1e-5, rtol=1e-4)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)


def test_cli_keys_pack_pull_and_a_refusal_as_one_line(exported, tmp_path: Path) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}

    def surgery(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", "from cli import main; main()", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )

    assert surgery("keys", "new", "bob").returncode == 0
    packed = surgery("pack", str(exported[1]), "--out", "m.tar.gz", "--sign", "bob")
    assert packed.returncode == 0 and "left out model.ts" in packed.stdout, packed.stderr
    pulled = surgery("pull", "m.tar.gz")
    assert pulled.returncode == 0 and "signed by" in pulled.stdout and "bob" in pulled.stdout, pulled.stderr
    assert (tmp_path / "m" / "bundle" / "model.safetensors").is_file()
    again = surgery("pull", "m.tar.gz")
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "exists already" in again.stderr
