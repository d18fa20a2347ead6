"""`surgery serve`: real Ray Serve, real HTTP on 127.0.0.1, tiny bundles.

One Ray session (the `ray_session` fixture) serves two applications for the whole file: `tiny`
(an image bundle, the model deployment is the ingress) at `/`, and `tiny` + `tinytext` behind a
bearer token at `/secure` (the multi-model layout: an ingress routing to one deployment each).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import PER_CLIENT_LIMIT, TINY_BERT_RECIPE, make_tiny_bert
from PIL import Image

pytestmark = pytest.mark.slow

TOKEN = "s3cret-token"

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
serve: {max_batch_size: 8, batch_wait_ms: 20, top_k: 2}
"""


def _export(recipe_text: str, out: Path) -> Path:
    from surgery.export import export_bundle
    from surgery.model import build_model
    from surgery.recipe import load_recipe_text

    recipe = load_recipe_text(recipe_text)
    return export_bundle(build_model(recipe, load_weights=False), recipe, out, formats=["safetensors"])


def _png(color=(200, 10, 10), size=(40, 50), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    image = _export(IMAGE_RECIPE, root / "tiny-bundle")
    text = _export(TINY_BERT_RECIPE.format(folder=make_tiny_bert(root / "bert")), root / "text-bundle")
    return {"tiny": image, "tinytext": text}


@pytest.fixture(scope="module")
def server(serve_http, bundles) -> str:
    from ray import serve

    from serve.app import build_app

    # one replica: its stats see every batch; a lone request may use both cores
    common = {"num_cpus": 0.5, "threads": 1, "solo_threads": 2, "replicas": 1, "time_solo_threads": False}
    serve.run(build_app({"bundles": [str(bundles["tiny"])], **common}), name="surgery", route_prefix="/")
    secure = {
        "bundles": [str(bundles["tiny"]), str(bundles["tinytext"])],
        "token_sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
    }
    serve.run(build_app({**secure, **common}), name="secure", route_prefix="/secure")
    yield serve_http
    serve.delete("secure")
    serve.delete("surgery")


def _predict(url: str, name: str = "tiny", **kwargs) -> httpx.Response:
    return httpx.post(f"{url}/v1/models/{name}:predict", timeout=60, **kwargs)


def _in_process(bundle: Path, images: list[Image.Image]) -> dict:
    import torch

    from surgery.bundle import load_bundle
    from surgery.preprocess import images_to_batch

    loaded = load_bundle(bundle)
    with torch.inference_mode():
        return loaded.model(images_to_batch(images, loaded.input_spec))


# --------------------------------------------------------------------------- metadata


def test_health_metadata_and_docs(server):
    assert httpx.get(f"{server}/healthz").json() == {"status": "ok"}
    models = httpx.get(f"{server}/v1/models").json()["models"]
    assert [m["name"] for m in models] == ["tiny"]
    info = httpx.get(f"{server}/v1/models/tiny").json()
    assert info["input"]["kind"] == "image" and info["input"]["size"] == [32, 32]
    assert {h["name"]: h["labels"] for h in info["heads"]} == {"cls": ["cat", "dog", "bird"], "score": None}
    assert info["batching"] == {"max_batch_size": 8, "batch_wait_timeout_s": 0.02}
    assert httpx.get(f"{server}/docs").status_code == 200
    assert "/v1/models/{name}:predict" in httpx.get(f"{server}/openapi.json").json()["paths"]


# --------------------------------------------------------------------------- predictions


def test_served_prediction_equals_in_process(server, bundles):
    import torch

    png, jpeg = _png(), _png((10, 120, 240), (64, 48), "JPEG")
    expected = _in_process(bundles["tiny"], [Image.open(io.BytesIO(png)), Image.open(io.BytesIO(jpeg))])

    as_json = _predict(server, json={"inputs": [base64.b64encode(png).decode(), base64.b64encode(jpeg).decode()]})
    as_form = _predict(server, files=[("file", ("a.png", png, "image/png")), ("file", ("b.jpg", jpeg, "image/jpeg"))])
    raw_png = _predict(server, content=png, headers={"content-type": "image/png"})
    assert raw_png.status_code == 200, raw_png.text
    served_raw = torch.tensor(raw_png.json()["predictions"][0]["cls"]["output"])
    torch.testing.assert_close(served_raw, expected["cls"][0].float(), atol=1e-5, rtol=1e-4)
    for response in (as_json, as_form):
        assert response.status_code == 200, response.text
        predictions = response.json()["predictions"]
        for head in ("cls", "score"):
            served = torch.tensor([p[head]["output"] for p in predictions])
            torch.testing.assert_close(served, expected[head].float(), atol=1e-5, rtol=1e-4)
    first = as_json.json()["predictions"][0]
    probs = torch.softmax(expected["cls"][0], 0)
    top = first["cls"]["top_k"]
    assert len(top) == 2 and top[0]["label"] == ["cat", "dog", "bird"][int(probs.argmax())]
    assert top[0]["probability"] == pytest.approx(float(probs.max()), abs=1e-5)
    p_pos = float(torch.sigmoid(expected["score"][0, 0]))
    assert {r["label"]: r["probability"] for r in first["score"]["top_k"]}["1"] == pytest.approx(p_pos, abs=1e-5)


def test_pixel_values_as_nested_lists(server, bundles):
    import torch

    from surgery.bundle import load_bundle

    model = load_bundle(bundles["tiny"]).model
    pixels = torch.randn(3, 32, 32)
    with torch.inference_mode():
        expected = model(pixels[None])["cls"][0]
    response = _predict(server, json={"inputs": [pixels.tolist()]})
    assert response.status_code == 200, response.text
    torch.testing.assert_close(
        torch.tensor(response.json()["predictions"][0]["cls"]["output"]), expected, atol=1e-5, rtol=1e-4
    )


async def _burst(url: str, n: int) -> list[int]:
    body = {"inputs": [base64.b64encode(_png()).decode()]}
    async with httpx.AsyncClient(timeout=60) as client:
        responses = await asyncio.gather(*(client.post(f"{url}/v1/models/tiny:predict", json=body) for _ in range(n)))
    assert all(r.status_code == 200 for r in responses)
    return [r.json()["batch_sizes"][0] for r in responses]


def test_concurrent_requests_form_batches(server):
    sizes = asyncio.run(_burst(server, 24))
    assert max(sizes) > 1 and max(sizes) <= 8
    stats = httpx.get(f"{server}/v1/models/tiny/stats").json()
    assert any(int(size) > 1 for size in stats["batch_sizes"]) and stats["max_batch_size"] == 8
    assert stats["threads"].get("1", 0) > 0, "batches under load must run on the replica's own share of cores"


def test_lone_request_runs_at_once_on_every_core_and_says_where_time_went(server):
    before = httpx.get(f"{server}/v1/models/tiny/stats").json()
    response = _predict(server, content=_png(), headers={"content-type": "image/png"})
    assert response.status_code == 200 and response.json()["batch_sizes"] == [1]
    after = httpx.get(f"{server}/v1/models/tiny/stats").json()
    # nothing else was running: no batch wait, and both cores (solo_threads) instead of one
    assert after["threads"].get("2", 0) == before["threads"].get("2", 0) + 1
    timing = dict(part.strip().split(";dur=") for part in response.headers["server-timing"].split(","))
    assert list(timing) == ["read", "decode", "queue", "forward", "respond", "total"]
    ms = {key: float(value) for key, value in timing.items()}
    assert all(value >= 0 for value in ms.values())
    assert ms["forward"] > 0 and ms["total"] >= ms["decode"] + ms["forward"]
    # the lone request skipped the 20 ms batch wait
    assert ms["queue"] < 20


def test_a_replica_times_a_lone_forward_on_each_thread_count(bundles):
    import torch

    from serve.runtime import ModelServer

    settings = {"threads": 1, "solo_threads": 2, "request_timeout_s": 30, "max_body_mb": 4, "top_k": 5}
    before = torch.get_num_threads()
    try:
        timed = ModelServer(str(bundles["tiny"]), {**settings, "time_solo_threads": True})
        ms = timed.solo_timing_ms
        assert set(ms) == {"1", "2"} and all(v > 0 for v in ms.values())
        assert timed.solo_threads == (1 if ms["2"] > 1.1 * ms["1"] else 2)
        assert timed.stats()["solo_threads"] == timed.solo_threads and torch.get_num_threads() == 1
        untimed = ModelServer(str(bundles["tiny"]), {**settings, "time_solo_threads": False})
        assert untimed.solo_threads == 2 and untimed.solo_timing_ms == {}
    finally:
        torch.set_num_threads(before)


def test_haproxy_ingress_listens_on_loopback_only(server):
    """Ray writes HAProxy's stats and Prometheus listeners as `bind *:PORT`; ours are moved to
    127.0.0.1, like the request listener, and the admin socket sits in a folder only we enter."""
    import psutil

    config = os.environ["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"]
    state = Path(config).parent
    assert state.stat().st_mode & 0o777 == 0o700
    ours = [
        p
        for p in psutil.process_iter(["name", "cmdline"])
        if p.info["name"] == "haproxy" and any(str(state) in arg for arg in p.info["cmdline"] or [])
    ]
    assert ours, "no HAProxy serves this session"
    listening = {(c.laddr.ip, c.laddr.port) for p in ours for c in p.net_connections("inet") if c.status == "LISTEN"}
    port = int(server.rsplit(":", 1)[1])
    assert ("127.0.0.1", port) in listening
    assert {int(os.environ[f"RAY_SERVE_HAPROXY_{kind}_PORT"]) for kind in ("STATS", "METRICS")} <= {
        p for _, p in listening
    }
    assert {ip for ip, _ in listening} == {"127.0.0.1"}, listening


def test_config_file_deploys_and_user_config_reconfigures_in_place(server, bundles, tmp_path):
    """What `serve deploy serve.yaml` does; a new user_config reaches the running replica
    through `reconfigure` (the batch counts survive: same replica, no restart)."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from serve.launch import serve_command

    out = tmp_path / "serve.yaml"
    serve_command([bundles["tiny"]], max_batch_size=8, replicas=1, config_out=out)
    config = yaml.safe_load(out.read_text())
    app = config["applications"][0]
    app.update(name="cfg", route_prefix="/cfg")
    app["args"].update(num_cpus=0.5, threads=1)
    app["deployments"][0]["ray_actor_options"]["num_cpus"] = 0.5
    client = _get_global_client()
    url = f"{server}/cfg"
    try:
        client.deploy_apps(ServeDeploySchema.model_validate(config), _blocking=True)
        assert max(asyncio.run(_burst(url, 16))) > 1
        before = httpx.get(f"{url}/v1/models/tiny/stats").json()["batches"]

        app["deployments"][0]["user_config"] = {"max_batch_size": 2, "batch_wait_timeout_s": 0.05}
        client.deploy_apps(ServeDeploySchema.model_validate(config), _blocking=True)
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/v1/models/tiny").json()["batching"]["max_batch_size"] != 2:
            assert time.monotonic() < deadline, "the new user_config never reached the replica"
            time.sleep(0.5)
        assert max(asyncio.run(_burst(url, 12))) == 2
        assert httpx.get(f"{url}/v1/models/tiny/stats").json()["batches"] > before
    finally:
        serve.delete("cfg")


# --------------------------------------------------------------------------- bad input


def _chunks(data: bytes, size: int = 256 * 1024):
    for start in range(0, len(data), size):
        yield data[start : start + size]


GOOD_PIXELS = [[[0.0] * 32] * 32] * 3
BAD_REQUESTS = {
    "malformed JSON": (
        400,
        "malformed JSON",
        {"content": b'{"inputs": [', "headers": {"content-type": "application/json"}},
    ),
    "not an object": (400, "JSON object", {"json": [1, 2, 3]}),
    "inputs not a list": (400, "must be a list", {"json": {"inputs": "abc"}}),
    "no inputs": (400, "no inputs", {"json": {"inputs": []}}),
    "wrong shape": (400, "expected shape [3, 32, 32]", {"json": {"inputs": [[[0.0] * 31] * 32] * 3}}),
    "wrong channels": (400, "expected 3 channels, got 4", {"json": {"inputs": [[[[0.0] * 32] * 32] * 4]}}),
    "wrong dtype": (400, "expected numbers", {"json": {"inputs": [[[["x"] * 32] * 32] * 3]}}),
    "ragged": (400, "ragged", {"json": {"inputs": [[[[0.0] * 32] * 32, [[0.0] * 31] * 32, [[0.0] * 32] * 32]]}}),
    "NaN": (
        400,
        "NaN or infinity",
        {"content": json.dumps({"inputs": [GOOD_PIXELS]}).replace("0.0", "NaN", 1).encode()},
    ),
    "infinity": (
        400,
        "NaN or infinity",
        {"content": json.dumps({"inputs": [GOOD_PIXELS]}).replace("0.0", "-Infinity", 1).encode()},
    ),
    "bad base64": (400, "invalid base64", {"json": {"inputs": ["not base64 !!"]}}),
    "undecodable image": (
        400,
        "not a decodable image",
        {"json": {"inputs": [base64.b64encode(b"GIF89a garbage").decode()]}},
    ),
    "undecodable upload": (
        400,
        "not a decodable image",
        {"files": [("file", ("x.png", b"\x89PNG broken", "image/png"))]},
    ),
    "wrong item type": (400, "expected an encoded image", {"json": {"inputs": [{"a": 1}]}}),
    "unsupported content type": (
        415,
        "unsupported content type",
        {"content": b"abc", "headers": {"content-type": "text/plain"}},
    ),
    "oversized body": (
        413,
        "exceeds the 4 MB limit",
        {"content": b"x" * (5 * 1024 * 1024), "headers": {"content-type": "application/json"}},
    ),
    "oversized stream": (
        413,
        "exceeds the 4 MB limit",
        {"content": _chunks(b"x" * (5 * 1024 * 1024)), "headers": {"content-type": "application/json"}},
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_4xx_and_the_replica_keeps_serving(server, case):
    status, message, kwargs = BAD_REQUESTS[case]
    response = _predict(server, **kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert "Traceback" not in response.text
    good = _predict(server, json={"inputs": [GOOD_PIXELS]})
    assert good.status_code == 200


def _infer(shape: list[int], binary: bool) -> dict:
    """An infer request for `pixel_values` whose shape claims far more than it sends."""
    tensor = {"name": "pixel_values", "datatype": "FP32", "shape": shape}
    if not binary:
        return {"json": {"inputs": [{**tensor, "data": [0.0] * 16}]}}
    head = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": 64}}]}).encode()
    return {"content": head + bytes(64), "headers": {"Inference-Header-Content-Length": str(len(head))}}


def _pixels_json() -> dict:
    return {"json": {"inputs": [GOOD_PIXELS]}}


# What a hostile pass sent: each answered with a 4xx and the JSON error body, never a 500 or a redirect.
HOSTILE_HTTP = {
    **{
        f"v2 shape {shape} {'binary' if binary else 'JSON'}": (
            "POST",
            "/v2/models/tiny/infer",
            _infer(shape, binary),
            400,
            "for shape",
        )
        for shape in ([10**30], [2**32, 2**32], [2**62, 4, 1, 16, 16])
        for binary in (False, True)
    },
    "header length in Unicode digits": (
        "POST",
        "/v2/models/tiny/infer",
        {"content": b"{}", "headers": {"Inference-Header-Content-Length": b"\xb2"}},  # '²' in Latin-1
        400,
        "invalid Inference-Header-Content-Length",
    ),
    "300 multipart files": (
        "POST",
        "/v1/models/tiny:predict",
        {"files": [("file", (f"{i}.png", b"x", "image/png")) for i in range(300)]},
        413,
        "at most 256",
    ),
    "trailing slash": ("GET", "/v1/models/tiny/", {}, 404, "Not Found"),
    "trailing slash on predict": ("POST", "/v1/models/tiny:predict/", _pixels_json(), 404, "Not Found"),
    "..%2f in a model name": ("POST", "/v1/models/..%2f..%2ftiny:predict", _pixels_json(), 404, "Not Found"),
    "..%2f in a v2 model name": ("GET", "/v2/models/..%2ftiny/", {}, 404, "Not Found"),
}


@pytest.mark.parametrize("case", list(HOSTILE_HTTP))
def test_hostile_requests_get_json_4xx_never_a_500_or_a_redirect(server, case):
    method, path, kwargs, status, message = HOSTILE_HTTP[case]
    kwargs = dict(kwargs)
    headers = {"Host": "evil.example", **kwargs.pop("headers", {})}
    response = httpx.request(method, server + path, headers=headers, timeout=60, follow_redirects=False, **kwargs)
    assert response.status_code == status and "location" not in response.headers, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/json" and message in response.json()["error"]
    assert _predict(server, json={"inputs": [GOOD_PIXELS]}).status_code == 200


def test_every_status_the_app_answers_is_in_its_openapi(server):
    document = httpx.get(f"{server}/openapi.json").json()
    predict = set(document["paths"]["/v1/models/{name}:predict"]["post"]["responses"])
    infer = set(document["paths"]["/v2/models/{name}/infer"]["post"]["responses"])
    assert {str(status) for status, _, _ in BAD_REQUESTS.values()} <= predict
    for method, path, _, status, _ in HOSTILE_HTTP.values():
        if path.endswith(":predict") and method == "POST" and "%2f" not in path:
            assert str(status) in predict, path
        if path == "/v2/models/tiny/infer":
            assert str(status) in infer


def test_a_16_bit_greyscale_png_predicts_as_its_8_bit_twin(server):
    import numpy as np

    ramp = (np.arange(40 * 50) % 256).reshape(40, 50).astype(np.uint16)
    pictures = []
    for values in (ramp.astype(np.uint8), ramp * 257):
        buffer = io.BytesIO()
        Image.fromarray(values).save(buffer, "PNG")
        pictures.append(buffer.getvalue())
    narrow, wide = (_v1_outputs(server, content=p, headers={"content-type": "image/png"}) for p in pictures)
    for head in narrow:
        np.testing.assert_allclose(wide[head], narrow[head], atol=1e-5)


def test_unknown_model_and_route_are_json_404(server):
    response = _predict(server, "nope", json={"inputs": [GOOD_PIXELS]})
    assert response.status_code == 404 and "unknown model 'nope'" in response.json()["error"]
    assert httpx.get(f"{server}/v1/models/nope").status_code == 404
    assert httpx.get(f"{server}/nothing/here").json() == {"error": "Not Found"}


# --------------------------------------------------------------------------- hostile traffic


def _png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims `width`x`height` pixels."""
    import struct
    import zlib

    data = bytearray(_png(size=(2, 2)))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def test_hostile_bodies_get_4xx(server):
    deep = b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    for url in (f"{server}/v1/models/tiny:predict", f"{server}/v2/models/tiny/infer"):
        response = httpx.post(url, content=deep, headers={"content-type": "application/json"}, timeout=60)
        assert response.status_code == 400 and "deeper than 32" in response.json()["error"]
    huge = _predict(server, content=_png_claiming(20000, 20000), headers={"content-type": "image/png"})
    assert huge.status_code == 413 and "pixel limit" in huge.json()["error"]
    as_json = _predict(server, json={"inputs": [base64.b64encode(_png_claiming(7000, 7000)).decode()]})
    assert as_json.status_code == 413
    assert _predict(server, json={"inputs": [GOOD_PIXELS]}).status_code == 200


def _held_connection(server: str, request: bytes) -> bytes:
    """Send the start of a request and nothing more; what the server answers before closing."""
    import socket

    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
        return received


@pytest.mark.parametrize(
    "start",
    [
        b"POST /v1/models/tiny:predict HTTP/1.1\r\nHost: x\r\nContent-Ty",  # headers never finished
        b"POST /v1/models/tiny:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 1000\r\n\r\n{"inputs": [',  # body never finished
    ],
)
def test_a_client_that_stops_sending_is_cut_off(server, start):
    """A slow-loris connection is closed with 408 by HAProxy's request timeout, not held open."""
    answer = _held_connection(server, start)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    if start.endswith(b"["):  # a request HAProxy has parsed: its 408 is the JSON error body
        head, _, body = answer.partition(b"\r\n\r\n")
        assert b"content-type: application/json" in head.lower() and "in time" in json.loads(body)["error"]


def _healthz_on(sock) -> bytes | None:
    """GET /healthz on an open connection: the whole response (status line to the end of the
    body), or None when the server closed or reset the connection instead of answering."""
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(4096)
            if not chunk:
                return None
            received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
        )
        while len(body) < length:
            body += sock.recv(4096)
        return head + b"\r\n\r\n" + body
    except (ConnectionResetError, BrokenPipeError):
        return None


def test_one_client_cannot_hold_every_connection(server):
    """Past the per-client limit a client's connections are refused as they connect; the ones it
    holds keep working, and once it lets go, it is served again."""
    import socket

    host, port = server.removeprefix("http://").split(":")
    held: list[socket.socket] = []
    refused_at = None
    try:
        for attempt in range(1, PER_CLIENT_LIMIT + 2):  # each one answered before the next: HAProxy counts it
            try:
                sock = socket.create_connection((host, int(port)), timeout=10)
            except ConnectionResetError:  # refused so fast that the reset beat the connect's own check
                refused_at = attempt
                break
            answer = _healthz_on(sock)
            if answer is None:
                refused_at = attempt
                sock.close()
                break
            assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
            held.append(sock)
        assert refused_at is not None, f"{PER_CLIENT_LIMIT + 1} connections from one address were all served"
        # connections other clients on this machine hold at the same time count too: a few at most
        assert PER_CLIENT_LIMIT - 8 < refused_at <= PER_CLIENT_LIMIT + 1
        assert (_healthz_on(held[0]) or b"").startswith(b"HTTP/1.1 200")
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 10
    while True:  # HAProxy counts the closed connections down as it notices them
        try:
            if httpx.get(f"{server}/healthz", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "still refused after the client let go of its connections"
        time.sleep(0.1)


def test_a_request_whose_client_leaves_is_given_up(server):
    import socket

    stats = f"{server}/v1/models/tiny/stats"
    before = httpx.get(stats).json()
    body = json.dumps({"inputs": [base64.b64encode(_png(size=(900, 900))).decode()] * 200}).encode()
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /v1/models/tiny:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 60  # wait until the replica is decoding it, then leave
        while httpx.get(stats).json()["rows_decoded"] == before["rows_decoded"]:
            assert time.monotonic() < deadline, "the request never reached the replica"
            time.sleep(0.05)
    deadline = time.monotonic() + 60
    while (after := httpx.get(stats).json())["cancelled"] == before["cancelled"] or after["queue_depth"]:
        assert time.monotonic() < deadline, f"the replica kept working for a client that left: {after}"
        time.sleep(0.2)
    assert after["rows_decoded"] - before["rows_decoded"] < 200, "decoding went on after the client left"
    assert _predict(server, json={"inputs": [GOOD_PIXELS]}).status_code == 200


# --------------------------------------------------------------------------- the Open Inference Protocol


def test_tritonclient_sees_a_ready_server_and_the_model_metadata(server):
    import tritonclient.http as triton

    client = triton.InferenceServerClient(server.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny")
    assert not client.is_model_ready("nope")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    metadata = client.get_model_metadata("tiny")
    assert metadata["name"] == "tiny"
    assert metadata["inputs"] == [
        {"name": "pixel_values", "datatype": "FP32", "shape": [-1, 3, 32, 32]},
        {"name": "image", "datatype": "BYTES", "shape": [-1]},
    ]
    assert metadata["outputs"] == [
        {"name": "cls", "datatype": "FP32", "shape": [-1, 3]},
        {"name": "score", "datatype": "FP32", "shape": [-1, 1]},
    ]


def _v1_outputs(server: str, **kwargs) -> dict:
    import numpy as np

    response = _predict(server, **kwargs)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    return {head: np.array([p[head]["output"] for p in predictions], np.float32) for head in ("cls", "score")}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_infer_equals_v1(server, binary):
    import numpy as np
    import tritonclient.http as triton

    client = triton.InferenceServerClient(server.removeprefix("http://"))
    pixels = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
    expected = _v1_outputs(server, json={"inputs": pixels.tolist()})

    tensor = triton.InferInput("pixel_values", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in ("cls", "score")]
    result = client.infer("tiny", [tensor], outputs=outputs, request_id="r1")
    assert result.get_response()["id"] == "r1" and result.get_response()["model_name"] == "tiny"
    for head in ("cls", "score"):
        np.testing.assert_allclose(result.as_numpy(head), expected[head], atol=1e-5, rtol=1e-4)

    half = triton.InferInput("pixel_values", list(pixels.shape), "FP16")  # other numeric types are cast
    half.set_data_from_numpy(pixels.astype(np.float16), binary_data=binary)
    np.testing.assert_allclose(client.infer("tiny", [half]).as_numpy("cls"), expected["cls"], atol=5e-3)

    images = [_png(), _png((10, 120, 240), (64, 48), "JPEG")]
    expected = _v1_outputs(server, files=[("file", (f"{i}", data, "image/png")) for i, data in enumerate(images)])
    encoded = triton.InferInput("image", [2], "BYTES")
    if binary:
        encoded.set_data_from_numpy(np.array(images, dtype=object), binary_data=True)
    else:  # BYTES in JSON are strings: images go base64
        encoded.set_data_from_numpy(np.array([base64.b64encode(d) for d in images], dtype=object), binary_data=False)
    result = client.infer("tiny", [encoded])  # no outputs named: all of them, binary (tritonclient's default)
    for head in ("cls", "score"):
        np.testing.assert_allclose(result.as_numpy(head), expected[head], atol=1e-5, rtol=1e-4)

    ranked = client.infer("tiny", [encoded], outputs=[triton.InferRequestedOutput("cls", class_count=2)])
    top = ranked.as_numpy("cls")
    assert top.shape == (2, 2)
    best = int(np.argmax(expected["cls"][0]))
    assert top[0][0].decode().split(":")[1:] == [str(best), ["cat", "dog", "bird"][best]]


@pytest.mark.parametrize(
    ("request_json", "status", "message"),
    [
        ({"inputs": [{"name": "nope", "datatype": "FP32", "shape": [1], "data": [0]}]}, 400, "unknown input 'nope'"),
        ({"inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": [1, 3], "data": [0, 0, 0]}]}, 400,
         "expected shape [-1, 3, 32, 32]"),
        ({"inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0]}]}, 400,
         "1 values for shape"),
        ({"inputs": [{"name": "image", "datatype": "BF17", "shape": [1], "data": ["x"]}]}, 400, "unsupported datatype"),
        ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["!!"]}]}, 400, "base64"),
        ({"inputs": []}, 400, "non-empty list"),
        ({"inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": [1, 3, 32, 32],
                      "parameters": {"binary_data_size": 12288}}]}, 400, "does not fit the binary data"),
        ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["eA=="]}],
          "outputs": [{"name": "nope"}]}, 400, "unknown output 'nope'"),
    ],
)  # fmt: skip
def test_v2_errors_use_the_protocol_error_body(server, request_json, status, message):
    response = httpx.post(f"{server}/v2/models/tiny/infer", json=request_json, timeout=60)
    assert response.status_code == status and message in response.json()["error"], response.text
    assert set(response.json()) == {"error"}


def test_v2_unknown_model_and_version(server):
    for url in ("/v2/models/nope", "/v2/models/nope/ready", "/v2/models/tiny/versions/7"):
        response = httpx.get(server + url)
        assert response.status_code == 404 and "error" in response.json()
    response = httpx.post(f"{server}/v2/models/nope/infer", json={"inputs": []})
    assert response.status_code == 404 and "unknown model 'nope'" in response.json()["error"]


# --------------------------------------------------------------------------- metrics


def test_metrics_count_requests_batches_and_queue(server):
    from prometheus_client.parser import text_string_to_metric_families

    _predict(server, json={"inputs": [GOOD_PIXELS]})
    _predict(server, json={"inputs": "x"})
    response = httpx.get(f"{server}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    requests = {(s.labels["route"], s.labels["status"]): s.value for s in families["surgery_requests"].samples}
    assert requests[("/v1/models/{name}:predict", "200")] >= 1 and requests[("/v1/models/{name}:predict", "400")] >= 1
    assert any(s.name.endswith("_bucket") for s in families["surgery_request_duration_seconds"].samples)
    batches = {
        s.labels.get("le"): s.value for s in families["surgery_batch_size"].samples if s.name.endswith("_bucket")
    }
    assert batches["+Inf"] >= 1 and batches["1"] >= 1
    (depth,) = families["surgery_queue_depth"].samples
    assert depth.labels["model"] == "tiny" and depth.value == 0


# --------------------------------------------------------------------------- token, multi-model


def test_token_guards_every_route_but_healthz(server):
    secure = f"{server}/secure"
    good = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.get(f"{secure}/healthz").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        assert httpx.get(f"{secure}/v1/models", headers=headers).status_code == 401
        assert httpx.get(f"{secure}/docs", headers=headers).status_code == 401
        response = _predict(secure, headers=headers, json={"inputs": [GOOD_PIXELS]})
        assert response.status_code == 401 and response.json() == {"error": "missing or wrong bearer token"}
        for path in ("/metrics", "/v2", "/v2/models/tiny", "/v2/models/tiny/ready"):
            assert httpx.get(secure + path, headers=headers).status_code == 401
        assert httpx.post(f"{secure}/v2/models/tiny/infer", headers=headers, json={}).status_code == 401
    for path in ("/v2/health/live", "/v2/health/ready"):  # what load balancers probe
        assert httpx.get(secure + path).status_code == 200
    metrics = httpx.get(f"{secure}/metrics", headers=good)
    assert metrics.status_code == 200 and 'surgery_queue_depth{model="tinytext"' in metrics.text
    assert [m["name"] for m in httpx.get(f"{secure}/v1/models", headers=good).json()["models"]] == ["tiny", "tinytext"]
    assert httpx.get(f"{secure}/docs", headers=good).status_code == 200
    assert _predict(secure, headers=good, json={"inputs": [GOOD_PIXELS]}).status_code == 200


def test_text_model_behind_the_router(server, bundles):
    import torch

    from surgery.bundle import load_bundle
    from surgery.preprocess import texts_to_batch

    secure, good = f"{server}/secure", {"Authorization": f"Bearer {TOKEN}"}
    texts = ["a fine day", "the worst film I have seen in years"]
    response = _predict(secure, "tinytext", headers=good, json={"inputs": texts})
    assert response.status_code == 200, response.text
    loaded = load_bundle(bundles["tinytext"])
    with torch.inference_mode():
        expected = loaded.model(*texts_to_batch(texts, loaded.tokenizer, loaded.input_spec))["sentiment"]
    served = torch.tensor([p["sentiment"]["output"] for p in response.json()["predictions"]])
    torch.testing.assert_close(served, expected, atol=1e-5, rtol=1e-4)
    for bad, message in (([""], "empty text"), (["   "], "empty text"), ([[1, 2]], "expected text")):
        response = _predict(secure, "tinytext", headers=good, json={"inputs": bad})
        assert response.status_code == 400 and message in response.json()["error"]
    assert _predict(secure, "tinytext", headers=good, json={"inputs": ["still serving"]}).status_code == 200


# --------------------------------------------------------------------------- the client


def test_predict_client(server, tmp_path, monkeypatch):
    from serve.client import predict_command
    from surgery.errors import SurgeryError

    image = tmp_path / "red.png"
    image.write_bytes(_png())
    out = predict_command(f"{server}/v1/models/tiny", [str(image)])
    assert str(image) in out and "cls:" in out and any(label in out for label in ("cat", "dog", "bird"))
    assert "input 1" in predict_command(server, [json.dumps(GOOD_PIXELS)])  # the only model, found by listing
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    out = predict_command(f"{server}/secure/v1/models/tinytext", ["good", "bad"], token_file=token_file)
    assert "sentiment:" in out and ("neg" in out or "pos" in out)
    with pytest.raises(SurgeryError, match="401"):
        predict_command(f"{server}/secure/v1/models/tinytext", ["good"])
    with pytest.raises(SurgeryError, match="404"):
        predict_command(f"{server}/v1/models/nope", ["x"])


def test_offline_predict_equals_the_served_prediction(server, bundles, tmp_path):
    """`surgery predict BUNDLE image` and `POST /v1/models/tiny:predict` of the same file agree."""
    from surgery.predict import PredictSettings, predict_command

    image = tmp_path / "one.png"
    image.write_bytes(_png(color=(30, 140, 90), size=(37, 29)))
    served = _predict(server, files=[("file", ("one.png", image.read_bytes(), "image/png"))]).json()
    (row,) = served["predictions"]
    out = tmp_path / "offline.jsonl"
    predict_command(bundles["tiny"], [str(image)], out=out, settings=PredictSettings(top_k=2, workers=0))
    (offline,) = [json.loads(line) for line in out.read_text().splitlines()]
    for rank, ranked in enumerate(row["cls"]["top_k"], 1):
        assert offline[f"cls_label_{rank}"] == ranked["label"]
        assert offline[f"cls_prob_{rank}"] == pytest.approx(ranked["probability"], abs=1e-5)
    assert offline["score_prob_1"] == pytest.approx(row["score"]["top_k"][0]["probability"], abs=1e-5)


# --------------------------------------------------------------------------- config file


def test_config_out_is_a_valid_serve_config(bundles, tmp_path):
    from ray.serve.schema import ServeDeploySchema

    from serve.launch import serve_command

    one = tmp_path / "one.yaml"
    serve_command([bundles["tiny"]], max_batch_size=4, config_out=one)
    config = ServeDeploySchema.model_validate(yaml.safe_load(one.read_text()))
    app = config.applications[0]
    assert app.import_path == "serve.app:build_app" and app.route_prefix == "/"
    assert app.args["bundles"] == [str(bundles["tiny"])]
    (deployment,) = app.deployments
    assert deployment.name == "SurgeryAPI" and deployment.num_replicas == min(4, os.cpu_count() or 1)  # auto
    assert deployment.user_config == {"max_batch_size": 4, "batch_wait_timeout_s": 0.02}
    assert config.http_options.host == "127.0.0.1"

    # A run folder works too (its bundle/), and each model gets its own deployment.
    run = tmp_path / "run"
    shutil.copytree(bundles["tinytext"], run / "bundle")
    two = tmp_path / "two.yaml"
    serve_command([bundles["tiny"], run], replicas=3, config_out=two)
    app = ServeDeploySchema.model_validate(yaml.safe_load(two.read_text())).applications[0]
    assert {d.name: d.num_replicas for d in app.deployments} == {"model-tiny": 3, "model-tinytext": 3}


def test_config_out_takes_autoscaling_from_the_recipe(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    from serve.launch import serve_command

    recipe = IMAGE_RECIPE.replace(
        "serve: {", "serve: {autoscaling: {min_replicas: 1, max_replicas: 4, target_ongoing_requests: 6}, "
    )
    bundle = _export(recipe, tmp_path / "auto")
    out = tmp_path / "serve.yaml"
    serve_command([bundle], config_out=out)
    (deployment,) = ServeDeploySchema.model_validate(yaml.safe_load(out.read_text())).applications[0].deployments
    assert deployment.autoscaling_config["max_replicas"] == 4
    assert deployment.autoscaling_config["target_ongoing_requests"] == 6


def test_bad_targets_are_one_line_errors(tmp_path):
    from serve.launch import serve_command
    from surgery.errors import SurgeryError

    with pytest.raises(SurgeryError, match="no such bundle"):
        serve_command([tmp_path / "missing"], config_out=tmp_path / "x.yaml")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SurgeryError, match="surgery export"):
        serve_command([tmp_path / "empty"], config_out=tmp_path / "x.yaml")
    with pytest.raises(SurgeryError, match="at least one"):
        serve_command([], config_out=tmp_path / "x.yaml")
    with pytest.raises(SurgeryError, match="unknown --ingress 'nginx'; choose one of auto, haproxy, proxy"):
        serve_command([tmp_path / "empty"], ingress="nginx")


# --------------------------------------------------------------------------- the command, end to end


def test_serve_never_imports_training_code(bundles):
    code = (
        "import sys; import serve.app, serve.launch, serve.client; from surgery.bundle import load_bundle; "
        f"load_bundle({str(bundles['tiny'])!r}); "
        "bad = [m for m in ('surgery.train', 'surgery.data', 'surgery.checkpoint', 'surgery.optim') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _listening(pids: set[int]) -> list[tuple[str, str, str]]:
    """(address, port, process name) of every TCP socket these processes listen on."""
    import psutil

    found = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            process = psutil.Process(pid)
            for conn in process.net_connections("inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.append((conn.laddr.ip, str(conn.laddr.port), process.name()))
    return found


def _answers_without_token(port: int) -> bool:
    """Whether a listener answers a plain HTTP request with a 200, or a gRPC call (to Serve's
    inter-deployment service) without Ray's token with anything but UNAUTHENTICATED."""
    import grpc

    with contextlib.suppress(httpx.HTTPError):
        if httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).status_code == 200:
            return True
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/ray.serve.ASGIService/HandleRequest")
        try:
            call(b"", timeout=10)
        except grpc.RpcError as err:
            return err.code() != grpc.StatusCode.UNAUTHENTICATED
    return True


def _loopback(address: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def test_surgery_serve_command_serves_then_shuts_down_cleanly(bundles, tmp_path, free_port):
    import psutil

    port = free_port()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [
        sys.executable,
        "-c",
        "from cli import main; main()",
        "serve",
        str(bundles["tiny"]),
        "--port",
        str(port),
        "--token-file",
        str(token_file),
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
        # Ctrl-C is what this test sends; a test run started in the background (`cmd &` in a
        # script) would hand it down ignored, the way shells protect background jobs from Ctrl-C
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    seen: set[int] = set()
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, "".join(lines)
            seen.update(_descendants(proc.pid))
            try:
                if (
                    httpx.get(
                        f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {TOKEN}"}
                    ).status_code
                    == 200
                ):
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail("surgery serve did not come up in 180 s")
        seen.update(_descendants(proc.pid))
        names = set()
        for pid in seen:
            with contextlib.suppress(psutil.NoSuchProcess):
                names.add(psutil.Process(pid).name())
        assert "haproxy" in names, "`surgery serve` should front its replicas with HAProxy (--ingress auto)"
        # every socket the command's process tree listens on (Ray's gRPC servers, agents, monitor,
        # dashboard, HAProxy, replicas) is on loopback, or (each replica's inter-deployment gRPC
        # server, which Ray binds to [::] in its code) answers nothing without Ray's token
        listening = _listening({proc.pid, *seen})
        assert len(listening) >= 5 and ("127.0.0.1", str(port)) in {(ip, number) for ip, number, _ in listening}
        exposed = [entry for entry in listening if not _loopback(entry[0])]
        assert all(name.startswith("ray::ServeReplica") for _, _, name in exposed), exposed
        assert not [entry for entry in exposed if _answers_without_token(int(entry[1]))], exposed
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
        response = httpx.post(
            f"http://127.0.0.1:{port}/v1/models/tiny:predict",
            json={"inputs": [GOOD_PIXELS]},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert response.status_code == 200
        # the command announces itself once `serve.run` returns, which can trail the first 200
        while not any("press Ctrl-C" in line for line in lines) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        reader.join(timeout=10)
    output = "".join(lines)
    assert proc.returncode == 0, output
    assert "serving tiny: POST http://127.0.0.1" in output and "shutting down" in output
    assert seen, "the command started no Ray processes?"
    deadline = time.monotonic() + 30
    while (
        left := [pid for pid in seen if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    ) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"Ray processes left behind: {[psutil.Process(p).cmdline()[:3] for p in left]}"
    import tempfile

    assert not (Path(tempfile.gettempdir()) / f"surgery-{os.getuid()}-{port}").exists(), "HAProxy state left behind"


def test_public_host_without_token_warns_and_config_keeps_only_the_token_path(bundles, tmp_path, capsys, monkeypatch):
    from serve.launch import serve_command

    monkeypatch.delenv("SURGERY_SERVE_TOKEN", raising=False)
    serve_command([bundles["tiny"]], host="0.0.0.0", config_out=tmp_path / "open.yaml")
    assert "warning: serving on 0.0.0.0 without a bearer token" in capsys.readouterr().err
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    serve_command([bundles["tiny"]], host="0.0.0.0", token_file=token_file, config_out=tmp_path / "tok.yaml")
    assert "warning" not in capsys.readouterr().err
    text = (tmp_path / "tok.yaml").read_text()
    assert TOKEN not in text and yaml.safe_load(text)["applications"][0]["args"]["token_file"] == str(token_file)
    serve_command([bundles["tiny"]], config_out=tmp_path / "local.yaml")
    assert "warning" not in capsys.readouterr().err
