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


# --------------------------------------------------------------------------- tampering


SECRET = "root:x:0:0:TOPSECRET-LINE:/root:/bin/bash\n"


def _rehash(bundle: Path, manifest: dict | None = None) -> None:
    """Tamper like someone who knows the format: the file hashes are made to match again."""
    manifest = manifest if manifest is not None else manifest_of(bundle)
    manifest["files"] = hash_files(bundle)
    write_manifest(bundle, manifest)


def _set(path: str, value):
    def edit(manifest: dict) -> None:
        *parents, last = path.split(".")
        target = manifest
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        if value is _DELETE:
            del target[last]
        else:
            target[int(last) if isinstance(target, list) else last] = value

    return edit


_DELETE = object()


def _edits(*edits):
    def edit(manifest: dict) -> None:
        for one in edits:
            one(manifest)

    return edit


MANIFEST_TAMPERING = {
    "head renamed": (_set("heads.0.name", "other"), "heads are not the model's (label)"),
    "heads emptied": (_set("heads", []), "heads: List should have at least 1 item"),
    "out_features changed": (_set("heads.0.out_features", 5), "heads[0].out_features differs from the model's (4)"),
    "output shape changed": (_set("heads.0.output_shape", ["batch", 9]), "output_shape does not end"),
    "labels changed": (_set("heads.0.labels", ["a", "b", "c", "z"]), "heads[0].labels differs"),
    "task changed": (_set("heads.0.task", "regression"), "heads[0].task differs"),
    "head name not an identifier": (_set("heads.0.name", "a b"), "heads.0.name: String should match pattern"),
    "size -1": (_set("input.size", [-1, -1]), "input.size.0: Input should be greater than or equal to 1"),
    "size text": (_set("input.size", "abc"), "input.size: Input should be a valid list"),
    "size changed": (_set("input.size", [64, 64]), "input.size differs from the model's ([32, 32])"),
    "channels wrong": (
        _edits(_set("input.channels", 1), _set("input.mean", [0.5]), _set("input.std", [0.5])),
        "input.channels differs from the model's (3)",
    ),
    "channels wrong for mean": (_set("input.channels", 1), "mean needs 1 or `channels` values"),
    "channels impossible": (_set("input.channels", 7), "1, 3 or 4 channels"),
    "std zero": (_set("input.std", [0]), "input.std.0: Input should be greater than 0"),
    "mean changed": (_set("input.mean", [0.0, 0.0, 0.0]), "input.mean differs"),
    "name a path": (_set("name", "../../evil"), "name: String should match pattern"),
    "name changed": (_set("name", "evil"), "name differs from the bundled recipe's (tiny-bundle)"),
    "no input": (_set("input", _DELETE), "input: Field required"),
    "no heads": (_set("heads", _DELETE), "heads: Field required"),
    "unknown key": (_set("run_this", "rm -rf /"), "run_this: Extra inputs are not permitted"),
    "input kind unknown": (_set("input.kind", "audio"), "input.kind: Input should be"),
    "input names changed": (_set("input_names", ["features"]), "input_names differ"),
    "hash not hex": (_set("recipe_sha256", "zz"), "recipe_sha256: String should match pattern"),
    "format version text": (_set("format_version", "1"), "unknown bundle format_version str"),
}


@pytest.mark.parametrize("case", list(MANIFEST_TAMPERING))
def test_a_tampered_manifest_is_refused_in_one_line(bundle: Path, case: str) -> None:
    edit, message = MANIFEST_TAMPERING[case]
    manifest = manifest_of(bundle)
    edit(manifest)
    write_manifest(bundle, manifest)
    with pytest.raises(BundleError) as info:
        load_bundle(bundle)
    text = str(info.value)
    assert message in text and "\n" not in text, text
    assert "rm -rf" not in text and "../../evil" not in text and "abc" not in text


def test_a_listed_file_behind_a_symlinked_folder_is_never_read(bundle: Path, tmp_path: Path) -> None:
    outside = tmp_path / "etc"
    outside.mkdir()
    (outside / "passwd").write_text(SECRET)
    (bundle / "sub").symlink_to(outside)
    manifest = manifest_of(bundle)
    manifest["files"]["sub/passwd"] = hash_files(outside)["passwd"]
    write_manifest(bundle, manifest)
    with pytest.raises(BundleError, match=r"sub/passwd: leads outside the bundle") as info:
        load_bundle(bundle)
    assert "TOPSECRET" not in str(info.value)


def test_a_symlinked_recipe_is_refused_without_quoting_what_it_points_at(bundle: Path, tmp_path: Path) -> None:
    secret = tmp_path / "passwd"
    secret.write_text(SECRET)
    (bundle / "recipe.yaml").unlink()
    (bundle / "recipe.yaml").symlink_to(secret)
    manifest = manifest_of(bundle)
    manifest["files"]["recipe.yaml"] = hash_files(tmp_path)["passwd"]
    write_manifest(bundle, manifest)
    with pytest.raises(BundleError, match="leads outside the bundle") as info:
        load_bundle(bundle)
    assert "TOPSECRET" not in str(info.value)


@pytest.mark.parametrize(
    "text",
    [SECRET, "name: [TOPSECRET-LINE\n", "TOPSECRET-LINE: 1\nname: tiny-bundle\n", "\xff\xfeTOPSECRET"],
)
def test_a_recipe_that_is_not_one_is_refused_without_quoting_it(bundle: Path, text: str) -> None:
    (bundle / "recipe.yaml").write_bytes(text.encode("utf-8", errors="surrogateescape"))
    manifest = manifest_of(bundle)
    manifest["recipe_sha256"] = None
    _rehash(bundle, manifest)
    with pytest.raises(BundleError) as info:
        load_bundle(bundle)
    assert "TOPSECRET" not in str(info.value) and "recipe.yaml" in str(info.value)


def test_a_bundled_recipe_may_not_extend_other_files(bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("name: x\n")
    recipe = bundle / "recipe.yaml"
    recipe.write_text(f"extends: {tmp_path / 'base.yaml'}\n" + recipe.read_text())
    manifest = manifest_of(bundle)
    manifest["recipe_sha256"] = None
    _rehash(bundle, manifest)
    with pytest.raises(BundleError, match="must be resolved"):
        load_bundle(bundle)


def test_files_the_manifest_does_not_list_are_refused(bundle: Path, tmp_path: Path) -> None:
    (bundle / "tokenizer").symlink_to(tmp_path)  # e.g. a tokenizer folder pointing elsewhere
    with pytest.raises(BundleError, match=r"tokenizer: in the bundle but not in its manifest"):
        load_bundle(bundle)


def test_a_symlinked_manifest_leading_outside_is_refused(bundle: Path, tmp_path: Path) -> None:
    real = tmp_path / "manifest.json"
    real.write_text((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").unlink()
    (bundle / "manifest.json").symlink_to(real)
    with pytest.raises(BundleError, match="leads outside the bundle"):
        read_manifest(bundle)


def test_an_untouched_bundle_passes_every_check(bundle: Path) -> None:
    assert load_bundle(bundle).manifest["name"] == "tiny-bundle"


# --------------------------------------------------------------------------- manifest paths and formats


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set("formats.safetensors.file", "../../etc/passwd"), "formats.safetensors.file: a path that leads outside"),
        (_set("formats.onnx.file", "/etc/passwd"), "formats.onnx.file: String should match"),
        (_set("formats.onnx.file", "sub/../model.onnx"), "formats.onnx.file: a path that leads outside"),
        (_set("formats.onnx.file", "model.safetensors"), "formats.onnx.file: must be model.onnx"),
        (_set("formats.evil", {"file": "model.onnx", "max_abs_diff": 0.0}), "an unknown format"),
        (_set("formats.onnx.file", "model.ts"), "must be model.onnx"),
    ],
)
def test_every_path_in_a_manifest_stays_inside_the_bundle(bundle: Path, edit, message: str) -> None:
    manifest = manifest_of(bundle)
    edit(manifest)
    write_manifest(bundle, manifest)
    with pytest.raises(BundleError, match=message) as info:
        read_manifest(bundle)
    assert "\n" not in str(info.value) and "etc/passwd" not in str(info.value)


def test_a_format_file_the_manifest_does_not_hash_is_refused(bundle: Path) -> None:
    manifest = manifest_of(bundle)
    manifest["formats"]["torchscript"] = {"file": "model.ts", "max_abs_diff": 0.0}
    write_manifest(bundle, manifest)
    with pytest.raises(BundleError, match=r"formats\.torchscript\.file: not among the hashed files"):
        read_manifest(bundle)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"a": ' * 100_000 + "1" + "}" * 100_000, "nested too deeply"),
        ('{"format_version": 1, "metrics": {"loss": NaN}}', "NaN is not a JSON number"),
        ('{"format_version": -Infinity}', "-Infinity is not a JSON number"),
        ('{"format_version": 1,}', "not JSON: Expecting property name"),
        ('{"format_version": ' + "9" * 5000 + "}", "not JSON a manifest could hold"),
    ],
)
def test_an_unreadable_manifest_says_what_is_wrong_with_it(bundle: Path, text: str, message: str) -> None:
    (bundle / "manifest.json").write_text(text)
    with pytest.raises(BundleError, match=message) as info:
        read_manifest(bundle)
    assert "not UTF-8" not in str(info.value)
    (bundle / "manifest.json").write_bytes(b'{"name": "\xff"}')
    with pytest.raises(BundleError, match=r"\(not UTF-8\)"):
        read_manifest(bundle)


def _listed(bundle: Path, name: str, file: str, data: bytes) -> dict:
    """`data` written as the bundle's `name` format and listed, hashes redone (a careful forger)."""
    (bundle / file).write_bytes(data)
    manifest = manifest_of(bundle)
    manifest["formats"][name] = {"file": file, "max_abs_diff": 0.0}
    _rehash(bundle, manifest)
    return manifest_of(bundle)


def _onnx_bytes(location: str | None = None, output: str = "label") -> bytes:
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", TensorProto.FLOAT, [1], [1.0])
    if location is not None:
        weight.ClearField("float_data")
        weight.data_location = TensorProto.EXTERNAL
        weight.external_data.add(key="location", value=location)
    graph = helper.make_graph(
        [helper.make_node("Mul", ["pixel_values", "w"], [output])],
        "g",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [None, 3, 32, 32])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, [None, 3, 32, 32])],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _torch_archive(kind: str) -> bytes:
    import io

    module, example = torch.nn.Linear(2, 2), (torch.zeros(2, 2),)
    buffer = io.BytesIO()
    if kind == "torchscript":
        torch.jit.save(torch.jit.trace(module, example), buffer)
    else:
        torch.export.save(torch.export.export(module, example), buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("name", "file", "data", "message"),
    [
        ("onnx", "model.onnx", b"\x08\x07garbage" * 100, "is not an ONNX model"),
        ("onnx", "model.onnx", lambda: _onnx_bytes()[:-9], "is not an ONNX model"),
        ("onnx", "model.onnx", lambda: _onnx_bytes("../../etc/passwd"), "a file the manifest does not list"),
        ("onnx", "model.onnx", lambda: _onnx_bytes(output="other"), "not the manifest's input names"),
        ("torchscript", "model.ts", b"PK\x03\x04 garbage", "is not a TorchScript archive"),
        ("torchscript", "model.ts", lambda: _torch_archive("pt2"), "lacks the members torch writes"),
        ("torchscript", "model.ts", lambda: _torch_archive("torchscript")[:-40], "not a readable zip"),
        ("pt2", "model.pt2", pickle.dumps({"weights": 1}), "is not a torch.export archive"),
        ("pt2", "model.pt2", lambda: _torch_archive("torchscript"), "lacks the members torch writes"),
    ],
)
def test_a_listed_format_its_file_cannot_back_is_refused(bundle: Path, name, file, data, message) -> None:
    from surgery.formats import verify_formats

    manifest = _listed(bundle, name, file, data() if callable(data) else data)
    with pytest.raises(BundleError, match=message) as info:
        verify_formats(bundle, manifest)
    text = str(info.value)
    assert text.startswith(f"{bundle / file}: listed as the bundle's {name} format") and "\n" not in text


def test_a_flipped_byte_inside_a_torch_archive_is_caught_by_its_crc(bundle: Path) -> None:
    import io
    import struct
    import zipfile

    from surgery.formats import verify_formats

    data = bytearray(_torch_archive("torchscript"))
    member = next(m for m in zipfile.ZipFile(io.BytesIO(data)).infolist() if m.filename.endswith("data/0"))
    name_length, extra_length = struct.unpack_from("<HH", data, member.header_offset + 26)
    data[member.header_offset + 30 + name_length + extra_length] ^= 0xFF  # a weight's first byte
    manifest = _listed(bundle, "torchscript", "model.ts", bytes(data))
    with pytest.raises(BundleError, match="is damaged \\(a member fails its CRC check\\)"):
        verify_formats(bundle, manifest)


def test_formats_as_exported_pass(bundle: Path) -> None:
    from surgery.formats import verify_formats

    verify_formats(bundle, manifest_of(bundle))  # safetensors and a real ONNX export
    _listed(bundle, "torchscript", "model.ts", _torch_archive("torchscript"))
    verify_formats(bundle, _listed(bundle, "pt2", "model.pt2", _torch_archive("pt2")))


def test_a_bundle_exported_before_a_field_existed_still_loads(bundle: Path) -> None:
    # An older surgery wrote no `top_k` under `serve:` (as if the field had not existed): the
    # recipe now loads with the default filled in, and its new dump differs from the file.
    import hashlib

    recipe = bundle / "recipe.yaml"
    text = "".join(line for line in recipe.read_text().splitlines(keepends=True) if "top_k:" not in line)
    assert text != recipe.read_text()
    recipe.write_text(text)
    manifest = manifest_of(bundle)
    manifest["recipe_sha256"] = hashlib.sha256(text.encode()).hexdigest()  # what that export recorded
    _rehash(bundle, manifest)
    assert load_bundle(bundle).recipe.serve.top_k == 5
