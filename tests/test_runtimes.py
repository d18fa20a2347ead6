"""Model runtimes: torch, ONNX Runtime and int8 behind one interface, chosen by name or by timing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from surgery.bundle import load_bundle
from surgery.errors import BundleError
from surgery.export import export_bundle
from surgery.model import build_model
from surgery.recipe import load_recipe_text
from surgery.runtimes import (
    ONNXRUNTIME,
    ONNXRUNTIME_INT8,
    TORCH,
    candidates,
    check_runtime,
    choose_runtime,
    example_batch,
    fastest_ms,
    open_runtime,
    ort_providers,
    unavailable,
)

RECIPE = """
name: tiny
backbone: {source: timm, name: test_resnet, pretrained: false}
input: {size: [32, 32]}
heads:
  - name: cls
    layers: [{linear: {out_features: 3}}]
    loss: cross_entropy
  - name: score
    layers: [{linear: {out_features: 1}}]
    loss: bce_with_logits
"""


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runtimes")
    recipe = load_recipe_text(RECIPE)
    model = build_model(recipe, load_weights=False)
    return {
        "onnx": export_bundle(model, recipe, root / "onnx", formats=["safetensors", "onnx"]),
        "plain": export_bundle(model, recipe, root / "plain", formats=["safetensors"]),
    }


def test_torch_and_onnxruntime_agree_within_the_export_tolerance(bundles):
    loaded = load_bundle(bundles["onnx"])
    tolerance = loaded.recipe.export.tolerance
    inputs = example_batch(loaded, 3)
    eager = open_runtime(loaded, TORCH).run(inputs, threads=1)
    onnx = open_runtime(loaded, ONNXRUNTIME)
    for threads in (1, 2):  # one session per thread count, same answers
        graph = onnx.run(inputs, threads)
        assert set(graph) == set(eager) == {"cls", "score"}
        for head, values in eager.items():
            assert graph[head].dtype == np.float32 and graph[head].shape == values.shape
            np.testing.assert_allclose(graph[head], values, atol=tolerance, rtol=0)
    # numpy inputs work as well as tensors
    again = onnx.run([x.numpy() for x in inputs], 1)
    np.testing.assert_array_equal(again["cls"], onnx.run(inputs, 1)["cls"])


def test_auto_times_every_runtime_the_bundle_allows_and_keeps_the_fastest(bundles):
    loaded = load_bundle(bundles["onnx"])
    runtime, choice = choose_runtime(loaded, "auto", threads=1)
    assert choice.requested == "auto" and choice.runtime == runtime.name
    assert set(choice.timing_ms) == {TORCH, ONNXRUNTIME} and all(v > 0 for v in choice.timing_ms.values())
    assert choice.runtime == min(choice.timing_ms, key=choice.timing_ms.get)
    assert "fastest one-example forward on 1 thread" in choice.reason and "not onnxruntime-int8" in choice.reason
    assert choice.to_dict()["timing_ms"] == choice.timing_ms


def test_a_bundle_without_onnx_runs_torch_and_says_why(bundles):
    loaded = load_bundle(bundles["plain"])
    runtime, choice = choose_runtime(loaded, "auto")
    assert runtime.name == TORCH and choice.timing_ms == {}
    assert "the only runtime this bundle allows" in choice.reason and "no model.onnx" in choice.reason
    for name in (ONNXRUNTIME, ONNXRUNTIME_INT8):
        with pytest.raises(BundleError) as refused:
            choose_runtime(loaded, name)
        message = str(refused.value)
        assert "\n" not in message and f"runtime {name} refused" in message and "--format onnx" in message


def test_named_runtime_is_opened_without_timing(bundles):
    loaded = load_bundle(bundles["onnx"], torch_model=False)
    assert loaded.model is None
    runtime, choice = choose_runtime(loaded, ONNXRUNTIME, threads=1)
    assert runtime.name == ONNXRUNTIME and choice.reason == "onnxruntime was asked for" and choice.timing_ms == {}
    runtime, choice = choose_runtime(loaded, "auto")  # without the torch model, auto has one runtime left
    assert runtime.name == ONNXRUNTIME and "loaded without the PyTorch model" in choice.reason
    with pytest.raises(BundleError, match="torch runtime needs it"):
        open_runtime(loaded, TORCH)


def test_what_a_manifest_allows():
    manifest = {"formats": {"safetensors": {}, "onnx": {"file": "model.onnx", "dynamic_batch": True}}}
    assert candidates(manifest) == (
        [TORCH, ONNXRUNTIME],
        {ONNXRUNTIME_INT8: unavailable(manifest, ONNXRUNTIME_INT8)},
    )
    assert "--quantize int8" in unavailable(manifest, ONNXRUNTIME_INT8)
    fixed = {"formats": {"onnx": {"file": "model.onnx", "dynamic_batch": False}}}
    assert "fixed batch size" in unavailable(fixed, ONNXRUNTIME)
    failed = {**manifest, "quantized": {"int8": {"passed": False, "reason": "head cls: accuracy fell 3 points"}}}
    assert (
        unavailable(failed, ONNXRUNTIME_INT8)
        == "its model.int8.onnx failed the parity gate (head cls: accuracy fell 3 points)"
    )
    passed = {**manifest, "quantized": {"int8": {"passed": True, "reason": None}}}
    assert candidates(passed)[0] == [TORCH, ONNXRUNTIME, ONNXRUNTIME_INT8]
    with pytest.raises(BundleError, match="unknown runtime 'tensorrt'; choose one of auto, torch"):
        check_runtime("b", manifest, "tensorrt")
    check_runtime("b", {}, "auto")  # torch is always there


def test_fastest_of_alternating_runs():
    calls: list[str] = []
    seconds = {"a": iter([0.5, 0.002, 0.003]), "b": iter([0.004, 0.1, 0.001])}

    def run(key: str):
        def once() -> float:
            calls.append(key)
            return next(seconds[key])

        return once

    assert fastest_ms({"a": run("a"), "b": run("b")}, repeats=3) == {"a": 2.0, "b": 1.0}
    assert calls == ["a", "b"] * 3


def test_cuda_execution_provider_where_present(monkeypatch):
    import onnxruntime as ort

    assert ort_providers("cpu") == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(BundleError, match="no CUDA execution provider"):
            ort_providers("cuda")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert ort_providers("cuda:1") == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    with pytest.raises(BundleError, match="unknown device 'tpu'"):
        ort_providers("tpu")


def test_manifest_records_whether_the_onnx_batch_is_dynamic(bundles):
    manifest = json.loads((bundles["onnx"] / "manifest.json").read_text())
    assert manifest["formats"]["onnx"]["dynamic_batch"] is True and manifest["quantized"] == {}
