"""`serve.runtime`: the same routes answered by eager torch and by ONNX Runtime, real Ray Serve on
127.0.0.1. One app per runtime (`/torch` and `/ort`), each serving an image and a text bundle
(the multi-model layout) exported with `model.onnx`; their answers agree within the bundles'
export tolerance on every route."""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import numpy as np
import pytest
from conftest import TINY_BERT_RECIPE, make_tiny_bert
from PIL import Image

from surgery.errors import BundleError, SurgeryError

pytestmark = pytest.mark.slow

IMAGE_RECIPE = """
name: tiny
backbone: {source: timm, name: test_resnet, pretrained: false}
input: {size: [32, 32]}
heads:
  - name: cls
    layers: [{linear: {out_features: 3}}]
    loss: cross_entropy
    labels: [cat, dog, bird]
  - name: score
    layers: [{linear: {out_features: 1}}]
    loss: bce_with_logits
serve: {max_batch_size: 8, batch_wait_ms: 20}
"""

HEADS = {"tiny": ("cls", "score"), "tinytext": ("sentiment",)}
TEXTS = ["a good movie", "the cat sat on the mat and it was very very bad"]


def _export(recipe_text: str, out, formats=("safetensors", "onnx")):
    from surgery.export import export_bundle
    from surgery.model import build_model
    from surgery.recipe import load_recipe_text

    recipe = load_recipe_text(recipe_text)
    return export_bundle(build_model(recipe, load_weights=False), recipe, out, formats=list(formats))


def _png(color=(200, 10, 10), size=(40, 50), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, fmt)
    return buffer.getvalue()


IMAGES = [_png(), _png((10, 120, 240), (64, 48), "JPEG")]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-runtime")
    return {
        "tiny": _export(IMAGE_RECIPE, root / "tiny"),
        "tinytext": _export(TINY_BERT_RECIPE.format(folder=make_tiny_bert(root / "bert")), root / "text"),
    }


@pytest.fixture(scope="module")
def server(serve_http, bundles):
    from ray import serve

    from serve.app import build_app

    common = {
        "bundles": [str(bundles["tiny"]), str(bundles["tinytext"])],
        "num_cpus": 0.5,
        "threads": 1,
        "replicas": 1,
        "time_solo_threads": False,
    }
    serve.run(build_app({**common, "runtime": "torch"}), name="torch", route_prefix="/torch")
    serve.run(build_app({**common, "runtime": "onnxruntime"}), name="ort", route_prefix="/ort")
    yield {"torch": f"{serve_http}/torch", "ort": f"{serve_http}/ort"}
    serve.delete("ort")
    serve.delete("torch")


def _tolerance(bundle) -> float:
    from surgery.bundle import load_bundle

    return load_bundle(bundle, torch_model=False).recipe.export.tolerance


def _v1(url: str, name: str, **kwargs) -> tuple[dict[str, np.ndarray], httpx.Response]:
    response = httpx.post(f"{url}/v1/models/{name}:predict", timeout=60, **kwargs)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    return {h: np.array([p[h]["output"] for p in predictions], np.float32) for h in HEADS[name]}, response


def _v2(url: str, name: str, inputs: list[dict]) -> dict[str, np.ndarray]:
    response = httpx.post(f"{url}/v2/models/{name}/infer", json={"inputs": inputs}, timeout=60)
    assert response.status_code == 200, response.text
    return {o["name"]: np.array(o["data"], np.float32).reshape(o["shape"]) for o in response.json()["outputs"]}


def _agree(a: dict[str, np.ndarray], b: dict[str, np.ndarray], tolerance: float) -> None:
    assert set(a) == set(b)
    for head in a:
        np.testing.assert_allclose(a[head], b[head], atol=tolerance, rtol=0)


def test_each_app_says_which_runtime_runs_and_why(server):
    for runtime, url in server.items():
        expected = "torch" if runtime == "torch" else "onnxruntime"
        for name in HEADS:
            info = httpx.get(f"{url}/v1/models/{name}", timeout=30).json()
            assert info["runtime"] == {
                "requested": expected,
                "runtime": expected,
                "reason": f"{expected} was asked for",
                "timing_ms": {},
            }
            assert "onnx" in info["formats"] and info["quantized"] == {}
            stats = httpx.get(f"{url}/v1/models/{name}/stats", timeout=30).json()
            assert stats["runtime"] == expected and stats["runtime_reason"] == f"{expected} was asked for"


def test_v1_images_agree_across_runtimes(server, bundles):
    tolerance = _tolerance(bundles["tiny"])
    body = {"inputs": [base64.b64encode(image).decode() for image in IMAGES]}
    answers = {runtime: _v1(url, "tiny", json=body) for runtime, url in server.items()}
    _agree(answers["torch"][0], answers["ort"][0], tolerance)
    pixels = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32).tolist()
    _agree(*(_v1(url, "tiny", json={"inputs": pixels})[0] for url in server.values()), tolerance)
    top = {
        runtime: answer[1].json()["predictions"][0]["cls"]["top_k"][0]["label"] for runtime, answer in answers.items()
    }
    assert top["torch"] == top["ort"]


def test_v1_text_agrees_across_runtimes(server, bundles):
    tolerance = _tolerance(bundles["tinytext"])
    torch_out, ort_out = (_v1(url, "tinytext", json={"inputs": TEXTS})[0] for url in server.values())
    _agree(torch_out, ort_out, tolerance)


def test_v2_images_and_text_agree_across_runtimes(server, bundles):
    images = [
        {"name": "image", "datatype": "BYTES", "shape": [2], "data": [base64.b64encode(i).decode() for i in IMAGES]}
    ]
    pixels = np.random.default_rng(1).normal(size=(3, 3, 32, 32)).astype(np.float32)
    tensor = [
        {"name": "pixel_values", "datatype": "FP32", "shape": list(pixels.shape), "data": pixels.ravel().tolist()}
    ]
    text = [{"name": "text", "datatype": "BYTES", "shape": [2], "data": TEXTS}]
    for name, inputs in (("tiny", images), ("tiny", tensor), ("tinytext", text)):
        torch_out, ort_out = (_v2(url, name, inputs) for url in server.values())
        _agree(torch_out, ort_out, _tolerance(bundles[name]))


async def _burst(url: str, n: int) -> list[int]:
    body = {"inputs": [base64.b64encode(IMAGES[0]).decode()]}
    async with httpx.AsyncClient(timeout=60) as client:
        responses = await asyncio.gather(*(client.post(f"{url}/v1/models/tiny:predict", json=body) for _ in range(n)))
    assert all(r.status_code == 200 for r in responses)
    return [r.json()["batch_sizes"][0] for r in responses]


def test_onnxruntime_batches_and_reports_server_timing(server):
    url = server["ort"]
    sizes = asyncio.run(_burst(url, 24))
    assert 1 < max(sizes) <= 8
    _, response = _v1(url, "tiny", content=IMAGES[0], headers={"content-type": "image/png"})
    timing = dict(part.strip().split(";dur=") for part in response.headers["server-timing"].split(","))
    assert list(timing) == ["read", "decode", "queue", "forward", "respond", "total"]
    assert float(timing["forward"]) > 0
    stats = httpx.get(f"{url}/v1/models/tiny/stats", timeout=30).json()
    assert any(int(size) > 1 for size in stats["batch_sizes"]) and stats["threads"].get("1", 0) > 0


def test_auto_in_a_replica_times_the_runtimes_and_reports_why(bundles):
    import torch

    from serve.runtime import ModelServer

    settings = {"threads": 1, "solo_threads": 1, "request_timeout_s": 30, "max_body_mb": 4, "top_k": 5}
    before = torch.get_num_threads()
    try:
        server = ModelServer(str(bundles["tiny"]), {**settings, "runtime": "auto"})
        choice = server.info()["runtime"]
        assert choice["requested"] == "auto" and set(choice["timing_ms"]) == {"torch", "onnxruntime"}
        assert choice["runtime"] == min(choice["timing_ms"], key=choice["timing_ms"].get)
        assert "fastest one-example forward on 1 thread" in choice["reason"]
        stats = server.stats()
        assert stats["runtime"] == choice["runtime"] and stats["runtime_timing_ms"] == choice["timing_ms"]
    finally:
        torch.set_num_threads(before)


def test_a_runtime_the_bundle_cannot_run_is_refused_before_deploying(bundles, tmp_path):
    from serve.app import build_app
    from serve.launch import serve_command

    plain = _export(IMAGE_RECIPE, tmp_path / "plain", formats=["safetensors"])
    with pytest.raises(BundleError) as refused:
        serve_command([plain], runtime="onnxruntime", config_out=tmp_path / "serve.yaml")
    assert "\n" not in str(refused.value) and "runtime onnxruntime refused: the bundle has no model.onnx" in str(
        refused.value
    )
    assert not (tmp_path / "serve.yaml").exists()
    with pytest.raises(BundleError, match="runtime onnxruntime-int8 refused"):
        build_app({"bundles": [str(bundles["tiny"])], "runtime": "onnxruntime-int8"})
    with pytest.raises(SurgeryError, match="unknown --runtime 'tvm'; choose one of auto, torch"):
        serve_command([plain], runtime="tvm", config_out=tmp_path / "serve.yaml")
    serve_command([bundles["tiny"]], runtime="onnxruntime", config_out=tmp_path / "ok.yaml")
    assert "runtime: onnxruntime" in (tmp_path / "ok.yaml").read_text()
