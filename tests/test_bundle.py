"""Loading bundles: every file verified, nothing unpickled, damaged bundles are clear errors."""

from __future__ import annotations

import json
import pickle
import shutil
import textwrap
from pathlib import Path

import pytest
import torch

from surgery.bundle import hash_files, load_bundle, read_manifest, verify_files
from surgery.errors import BundleError, SurgeryError
from surgery.export import export_bundle
from surgery.model import build_model
from surgery.recipe import load_recipe_text

RECIPE = """
name: tiny-bundle
backbone: {source: timm, name: test_resnet, pretrained: false}
input: {size: [32, 32]}
heads:
  - name: label
    layers: [{linear: {out_features: 4}}]
    loss: cross_entropy
    labels: [a, b, c, d]
freeze: ["backbone.**"]
export: {formats: [safetensors, onnx]}
"""


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    tmp = tmp_path_factory.mktemp("bundle")
    recipe = load_recipe_text(textwrap.dedent(RECIPE), base_dir=tmp)
    torch.manual_seed(0)
    model = build_model(recipe, load_weights=False).eval()
    return model, export_bundle(model, recipe, tmp / "bundle")


@pytest.fixture
def bundle(original, tmp_path: Path) -> Path:
    """A fresh copy of the exported bundle, for a test to damage."""
    return Path(shutil.copytree(original[1], tmp_path / "bundle"))


def manifest_of(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def write_manifest(path: Path, manifest: dict) -> None:
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_loads_the_model_in_eval_mode_with_its_preprocessing(original, bundle: Path) -> None:
    model, _ = original
    loaded = load_bundle(bundle)
    assert not loaded.model.training
    assert loaded.recipe.name == "tiny-bundle"
    assert loaded.input_spec.kind == "image" and loaded.input_spec.size == (32, 32)
    assert loaded.input_spec.mean == model.input_spec.mean
    assert loaded.tokenizer is None
    assert loaded.manifest["heads"][0]["labels"] == ["a", "b", "c", "d"]
    x = model.example_inputs(4)
    with torch.no_grad():
        assert torch.equal(model(*x)["label"], loaded.model(*x)["label"])


def test_frozen_weights_come_back_too(original, bundle: Path) -> None:
    model, _ = original
    loaded = load_bundle(bundle)
    want = model.state_dict()
    got = loaded.model.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_loading_never_unpickles(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("load_bundle unpickled something")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(torch.jit, "load", refuse)
    monkeypatch.setattr(torch.export, "load", refuse)
    assert load_bundle(bundle).model is not None


def test_flipped_byte_is_detected(bundle: Path) -> None:
    weights = bundle / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.safetensors: sha256 mismatch"):
        load_bundle(bundle)


def test_truncated_file_is_detected(bundle: Path) -> None:
    onnx = bundle / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:100])
    with pytest.raises(BundleError, match=r"model\.onnx: sha256 mismatch.*modified or truncated"):
        load_bundle(bundle)


def test_missing_file_is_detected(bundle: Path) -> None:
    (bundle / "recipe.yaml").unlink()
    with pytest.raises(BundleError, match=r"recipe\.yaml: listed in the manifest but missing"):
        load_bundle(bundle)


def test_edited_recipe_is_detected(bundle: Path) -> None:
    recipe = bundle / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("out_features: 4", "out_features: 5"))
    with pytest.raises(BundleError, match="sha256 mismatch"):
        load_bundle(bundle)


def test_manifest_edited_to_match_a_changed_recipe_is_still_caught(bundle: Path) -> None:
    recipe = bundle / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("- d", "- e"))
    manifest = manifest_of(bundle)
    manifest["files"] = hash_files(bundle)  # the files check passes now; the recipe hash does not
    write_manifest(bundle, manifest)
    with pytest.raises(BundleError, match="recipe_sha256"):
        load_bundle(bundle)


def test_unknown_format_version_is_refused(bundle: Path) -> None:
    manifest = manifest_of(bundle)
    manifest["format_version"] = 2
    write_manifest(bundle, manifest)
    with pytest.raises(BundleError, match=r"unknown bundle format_version 2 .*reads 1"):
        load_bundle(bundle)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: (p / "manifest.json").unlink(), "not a bundle"),
        (lambda p: (p / "manifest.json").write_text("{not json"), "unreadable manifest"),
        (lambda p: (p / "manifest.json").write_text("[1, 2]"), "not a JSON object"),
        (lambda p: shutil.rmtree(p), "no such directory"),
    ],
)
def test_damaged_manifest_is_a_clear_error(bundle: Path, damage, message: str) -> None:
    damage(bundle)
    with pytest.raises(BundleError, match=message):
        read_manifest(bundle)


def test_file_entries_cannot_point_outside_the_bundle(bundle: Path) -> None:
    (bundle.parent / "secret.txt").write_text("x")
    manifest = manifest_of(bundle)
    manifest["files"]["../secret.txt"] = hash_files(bundle.parent)["secret.txt"]
    with pytest.raises(BundleError, match="outside the bundle"):
        verify_files(bundle, manifest)


def test_weights_that_do_not_fit_the_recipe_are_refused(bundle: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(bundle / "model.safetensors"))
    del state["heads.label.0.bias"]
    save_file(state, str(bundle / "model.safetensors"))
    manifest = manifest_of(bundle)
    manifest["files"] = hash_files(bundle)
    write_manifest(bundle, manifest)
    with pytest.raises(BundleError, match=r"missing: heads\.label\.0\.bias"):
        load_bundle(bundle)


def test_bundle_errors_reach_the_user_as_one_line(bundle: Path) -> None:
    (bundle / "model.onnx").unlink()
    with pytest.raises(SurgeryError) as info:
        load_bundle(bundle)
    assert info.value.exit_code == 2 and "\n" not in str(info.value)
