"""`surgery export --quantize int8`: model.int8.onnx, its metric against the float model's on the
validation split, and the parity gate that decides whether any runtime may use it."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_bert
from test_export import fake_run, run_cli

from surgery.bundle import INT8_ONNX, load_bundle, read_manifest
from surgery.errors import BundleError, ExportError
from surgery.export import PartialExportError, export_bundle
from surgery.model import build_model
from surgery.quantize import gate, monitored_metric, quantize_int8
from surgery.recipe import load_recipe_text
from surgery.runtimes import ONNXRUNTIME, ONNXRUNTIME_INT8, candidates, check_runtime, choose_runtime, open_runtime

TIMM = """
name: tiny-int8
backbone: {source: timm, name: test_resnet, pretrained: false}
input: {size: [32, 32]}
heads:
  - name: species
    layers: [{linear: {out_features: 3}}]
    loss: cross_entropy
    metrics: [f1_macro, accuracy]
  - name: age
    layers: [{linear: {out_features: 1}}]
    loss: mse
data: {source: synthetic, synthetic: {num_samples: 96, num_classes: 3}, batch_size: 8}
export: {formats: [safetensors], calibration_samples: 24, quantize_max_drop: 1.0}
"""


def recipe_from(text: str, tmp_path: Path):
    return load_recipe_text(textwrap.dedent(text), filename=str(tmp_path / "recipe.yaml"), base_dir=tmp_path)


def test_cli_quantize_writes_int8_with_parity_per_head(tmp_path, monkeypatch, capsys):
    recipe = recipe_from(TIMM, tmp_path)
    run = fake_run(tmp_path, recipe, build_model(recipe, load_weights=False), {10: 0.3})
    assert run_cli(monkeypatch, "export", str(run), "--format", "safetensors,onnx", "--quantize", "int8") == 0
    bundle = run / "bundle"
    assert f"bundle: {bundle.resolve()}" in capsys.readouterr().out
    manifest = read_manifest(bundle)  # the closed manifest schema takes the new entry
    assert INT8_ONNX in manifest["files"] and manifest["failed_formats"] == {}
    int8 = manifest["quantized"]["int8"]
    assert int8["file"] == INT8_ONNX and int8["passed"] is True and int8["reason"] is None
    assert int8["method"].startswith("static QDQ") and int8["calibration_samples"] == 24
    assert int8["validation_samples"] == 24 and int8["max_drop"] == 1.0  # synthetic: a quarter of 96 held out
    species, age = int8["heads"]["species"], int8["heads"]["age"]
    assert species["metric"] == "f1_macro" and age["metric"] == "mae"  # the head's first metric; mae for regression
    for head in (species, age):
        assert 0 <= head["max_abs_diff"] < 0.5
        assert head["drop"] == pytest.approx(
            head["float_onnx"] - head["int8_onnx"]
            if head["metric"] != "mae"
            else head["int8_onnx"] - head["float_onnx"]
        )
    assert 0.5 <= species["top1_match"] <= 1 and age["top1_match"] is None

    loaded = load_bundle(bundle)  # every hash, the int8 file's included
    assert candidates(loaded.manifest)[0] == ["torch", ONNXRUNTIME, ONNXRUNTIME_INT8]
    _, choice = choose_runtime(loaded, "auto", threads=1)
    assert set(choice.timing_ms) == {"torch", ONNXRUNTIME, ONNXRUNTIME_INT8}  # a passed gate lets auto time it
    inputs = loaded.model.example_inputs(4)
    floats = open_runtime(loaded, ONNXRUNTIME).run(inputs, 1)
    int8s = open_runtime(loaded, ONNXRUNTIME_INT8).run(inputs, 1)
    assert np.abs(floats["species"] - int8s["species"]).max() < 0.5


def test_a_failing_gate_keeps_the_model_marked_failed_and_no_runtime_uses_it(tmp_path, monkeypatch):
    folder = make_tiny_bert(tmp_path / "bert")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # ONNX Runtime's quantization tools may write scratch files here
    recipe = recipe_from(
        f"""
        name: tiny-bert-int8
        backbone: {{source: transformers, name: {folder}, pretrained: false}}
        input: {{max_length: 16}}
        heads:
          - name: sentiment
            input: tokens
            pool: cls
            layers: [{{linear: {{out_features: 2}}}}]
            loss: cross_entropy
            labels: [neg, pos]
        data: {{source: synthetic, synthetic: {{num_samples: 32, num_classes: 2}}, batch_size: 8}}
        export: {{formats: [safetensors, onnx], quantize: int8, quantize_max_drop: -1}}
        """,
        tmp_path,
    )
    out = tmp_path / "bundle"
    with pytest.raises(PartialExportError) as failed:  # int8 may not beat float by a whole point of accuracy
        export_bundle(build_model(recipe, load_weights=False), recipe, out)
    assert list(cwd.iterdir()) == []
    assert "int8: parity gate failed: head sentiment: accuracy" in str(failed.value)
    assert "> export.quantize_max_drop -1" in str(failed.value) and "kept, marked failed" in str(failed.value)
    manifest = read_manifest(out)
    int8 = manifest["quantized"]["int8"]
    assert int8["passed"] is False and "a drop of" in int8["reason"] and (out / INT8_ONNX).is_file()
    assert int8["method"].startswith("dynamic") and int8["calibration_samples"] == 0  # text: dynamic
    assert "parity gate failed" in manifest["failed_formats"]["int8"]
    assert set(manifest["formats"]) == {"safetensors", "onnx"}

    loaded = load_bundle(out, torch_model=False)  # the tokenizer comes from the bundle, the encoder runs in ORT
    with pytest.raises(BundleError) as refused:
        check_runtime(out, manifest, ONNXRUNTIME_INT8)
    assert "\n" not in str(refused.value) and "failed the parity gate (head sentiment" in str(refused.value)
    runtime, choice = choose_runtime(loaded, "auto")
    assert runtime.name == ONNXRUNTIME and "not onnxruntime-int8: its model.int8.onnx failed the parity gate" in (
        choice.reason
    )


def test_quantize_needs_onnx_and_data(tmp_path):
    recipe = recipe_from(TIMM, tmp_path)
    model = build_model(recipe, load_weights=False)
    with pytest.raises(ExportError, match=r"int8 is quantized from model\.onnx: add onnx"):
        export_bundle(model, recipe, tmp_path / "out", quantize="int8")
    with pytest.raises(ExportError, match="unknown quantization 'int4'"):
        export_bundle(model, recipe, tmp_path / "out", formats=["onnx"], quantize="int4")
    assert not (tmp_path / "out").exists()
    recipe.export.formats, recipe.export.quantize = ["safetensors", "onnx"], "int8"
    with pytest.raises(ExportError, match=r"or skip it \(--quantize none\)"):
        export_bundle(model, recipe, tmp_path / "out", formats=["safetensors"])
    plain = export_bundle(model, recipe, tmp_path / "out", formats=["safetensors"], quantize="none")
    assert read_manifest(plain)["quantized"] == {} and not (plain / INT8_ONNX).exists()
    recipe.data = None
    with pytest.raises(ExportError, match="needs the recipe's `data:`"):
        quantize_int8(model, recipe, tmp_path, ["pixel_values"])


def test_the_recipe_refuses_quantize_without_onnx(tmp_path):
    from surgery.errors import RecipeError

    with pytest.raises(RecipeError, match=r"quantize: int8 is made from model\.onnx: add onnx to formats"):
        recipe_from(TIMM.replace("formats: [safetensors]", "formats: [safetensors], quantize: int8"), tmp_path)
    with pytest.raises(RecipeError, match=r"export\.quantize: expected 'int8', got 'int4'"):
        recipe_from(TIMM.replace("formats: [safetensors]", "formats: [onnx], quantize: int4"), tmp_path)
    with pytest.raises(RecipeError, match=r"serve\.runtime"):
        recipe_from(TIMM + "serve: {runtime: tensorrt}\n", tmp_path)
    recipe = recipe_from(TIMM + "serve: {runtime: onnxruntime-int8}\n", tmp_path)
    assert recipe.serve.runtime == "onnxruntime-int8" and recipe.export.quantize is None


def test_recipes_that_leave_the_new_fields_out_hash_as_before(tmp_path):
    from surgery.recipe import dump_recipe

    recipe = recipe_from(TIMM.replace(", calibration_samples: 24, quantize_max_drop: 1.0", ""), tmp_path)
    dumped = dump_recipe(recipe)  # what recipe_sha256 hashes: bundles exported earlier still match
    assert "quantize" not in dumped and "calibration_samples" not in dumped and "runtime" not in dumped
    assert recipe.export.quantize_max_drop is None and recipe.export.QUANTIZE_MAX_DROP == 0.01


def test_gate_takes_the_worst_head_and_knows_which_way_is_better():
    heads = {
        "a": {"metric": "accuracy", "float_onnx": 0.9, "int8_onnx": 0.89, "drop": 0.01},
        "b": {"metric": "mae", "float_onnx": 0.5, "int8_onnx": 0.53, "drop": 0.03},
        "c": {"metric": None, "float_onnx": None, "int8_onnx": None, "drop": None},
    }
    assert gate(heads, 0.05) == (True, None)
    passed, reason = gate(heads, 0.02)
    assert not passed and reason.startswith("head b: mae 0.5 (float) vs 0.53 (int8), a drop of 0.03 >")
    assert gate({"c": heads["c"]}, 1.0) == (False, "no head has validation targets to measure the int8 model against")


def test_the_monitored_metric(tmp_path):
    recipe = recipe_from(TIMM, tmp_path)
    assert monitored_metric(recipe, "species", "multiclass") == "f1_macro"
    recipe.train.checkpoint.monitor = "val/species/accuracy"
    assert monitored_metric(recipe, "species", "multiclass") == "accuracy"
    assert monitored_metric(recipe, "age", "regression") == "mae"
    assert monitored_metric(recipe, "other", "binary") == "accuracy"


def test_manifest_quantized_entries_are_checked(tmp_path):
    from surgery.bundle import ManifestQuantized

    good = {
        "file": INT8_ONNX,
        "method": "dynamic",
        "calibration_samples": 0,
        "validation_samples": 10,
        "max_drop": 0.01,
        "passed": True,
        "reason": None,
        "heads": {"cls": {"metric": "accuracy", "float_onnx": 0.9, "int8_onnx": 0.9, "drop": 0.0, "top1_match": 1.0,
                          "max_abs_diff": 0.01}},
    }  # fmt: skip
    ManifestQuantized.model_validate(good)
    for bad in ({"file": "../evil.onnx"}, {"passed": "yes"}, {"extra": 1}):
        with pytest.raises(ValueError):
            ManifestQuantized.model_validate({**good, **bad})
    assert json.loads(json.dumps(good)) == good
