"""Request decoding and `/v1` response shaping, without Ray: what a hostile or careless client
gets back, and that what the model sees is what in-process preprocessing gives."""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import zlib

import numpy as np
import pytest
from PIL import Image

from serve.decode import (
    MAX_JSON_DEPTH,
    InputError,
    RowPreparer,
    Stopped,
    decode_image,
    json_depth,
    json_items,
    v1_items,
)
from serve.responses import head_rows, v1_predictions
from surgery.inputs import InputSpec

SPEC = InputSpec(kind="image", channels=3, size=(8, 8))


def _png(size=(12, 10), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 128 if mode == "L" else (200, 10, 10)).save(buffer, "PNG")
    return buffer.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims `width`×`height` pixels (a decompression bomb's header)."""
    data = bytearray(_png((2, 2)))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def _error(call, *args) -> InputError:
    with pytest.raises(InputError) as caught:
        call(*args)
    return caught.value


# --------------------------------------------------------------------------- JSON


def test_deep_json_is_refused_before_it_is_parsed():
    deep = b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    err = _error(json_items, deep)
    assert err.status == 400 and f"deeper than {MAX_JSON_DEPTH}" in str(err)
    unclosed = b'{"inputs": ' + b"[" * 100_000  # never closed: still counted, still refused
    assert "deeper than" in str(_error(json_items, unclosed))


def test_json_depth_ignores_brackets_inside_strings_and_accepts_real_inputs():
    assert json_depth(json.dumps({"inputs": ["[[[[" * 100 + '\\"[[[']}).encode()) == 2
    pixels = np.zeros((4, 3, 8, 8)).tolist()
    body = json.dumps({"inputs": pixels}).encode()
    assert json_depth(body) == 5
    assert len(json_items(body)) == 4


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"inputs": [', "malformed JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"inputs": "abc"}', "must be a list"),
        (b"\xff\xfe", "malformed JSON"),
    ],
)
def test_malformed_json_is_400(body, message):
    err = _error(json_items, body)
    assert err.status == 400 and message in str(err)


def test_content_types():
    import asyncio

    png = _png()
    assert asyncio.run(v1_items("image/png", png)) == [png]
    with pytest.raises(InputError) as caught:
        asyncio.run(v1_items("text/plain", b"abc"))
    assert caught.value.status == 415
    with pytest.raises(InputError) as caught:
        asyncio.run(v1_items("application/json", json.dumps({"inputs": [0] * 257}).encode()))
    assert caught.value.status == 413


# --------------------------------------------------------------------------- images


def test_an_image_pillow_opens_but_cannot_convert_is_400_naming_its_mode():
    buffer = io.BytesIO()
    Image.new("LAB", (8, 8)).save(buffer, "TIFF")
    err = _error(decode_image, buffer.getvalue(), 0, "L")  # a greyscale model
    assert err.status == 400 and "image mode LAB cannot be converted to L" in str(err)


@pytest.mark.parametrize(("width", "height"), [(20000, 20000), (7000, 7000)])
def test_every_image_over_the_pixel_limit_is_413(width, height):
    err = _error(decode_image, _png_claiming(width, height), 2)
    assert err.status == 413 and "inputs[2]" in str(err) and "pixel limit" in str(err)


def _multipart(parts: list[tuple[str, str | None, bytes]]) -> tuple[str, bytes]:
    """A multipart/form-data body of (field name, file name or None for a plain field, data)."""
    boundary = "surgery-test-boundary"
    body = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return f"multipart/form-data; boundary={boundary}", body + f"--{boundary}--\r\n".encode()


@pytest.mark.parametrize("filename", ["x.png", None], ids=["files", "fields"])
def test_too_many_multipart_inputs_are_413_as_too_many_json_inputs_are(filename):
    import asyncio

    content_type, body = _multipart([("file", filename, b"x")] * 300)
    err = _error(lambda: asyncio.run(v1_items(content_type, body)))
    assert err.status == 413 and "at most 256" in str(err)
    content_type, body = _multipart([("file", filename, b"x")] * 256)
    assert len(asyncio.run(v1_items(content_type, body))) == 256


def _grey16_png(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(values.astype(np.uint16)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_a_16_bit_greyscale_png_is_scaled_not_clipped(mode):
    ramp = np.arange(0, 256, dtype=np.uint16).reshape(16, 16)
    wide = decode_image(_grey16_png(ramp * 257), 0, mode)  # the same picture, 16 bits per pixel
    narrow = Image.fromarray(ramp.astype(np.uint8)).convert(mode)
    assert np.array_equal(np.asarray(wide), np.asarray(narrow))


def test_16_bit_images_train_as_they_are_served():
    from surgery.preprocess import image_to_uint8

    grey = InputSpec(kind="image", channels=1, size=(16, 16))
    ramp = np.arange(0, 256, dtype=np.uint16).reshape(16, 16)
    wide = image_to_uint8(Image.open(io.BytesIO(_grey16_png(ramp * 257))), grey)
    assert np.array_equal(wide.numpy()[0], ramp)


def test_undecodable_bytes_are_400():
    err = _error(decode_image, b"\x89PNG broken", 0)
    assert err.status == 400 and "not a decodable image" in str(err)


def test_rows_match_in_process_preprocessing():
    import torch

    from surgery.preprocess import image_eval_transform, images_to_batch

    prepare = RowPreparer(SPEC, image_eval_transform(SPEC))
    png, grey = _png(), _png(mode="L")
    rows = prepare([png, base64.b64encode(grey).decode(), np.zeros((3, 8, 8), np.float16)])
    expected = images_to_batch([Image.open(io.BytesIO(png)), Image.open(io.BytesIO(grey))], SPEC)
    torch.testing.assert_close(torch.stack(rows[:2]), expected)
    assert rows[2].dtype == torch.float32 and rows[2].shape == (3, 8, 8)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (np.zeros((4, 8, 8)).tolist(), "expected 3 channels, got 4"),
        (np.zeros((3, 8, 7)).tolist(), "expected shape [3, 8, 8]"),
        ([[[float("nan")] * 8] * 8] * 3, "NaN or infinity"),
        ("not base64 !!", "invalid base64"),
        ({"a": 1}, "expected an encoded image"),
    ],
)
def test_bad_items_name_the_input(item, message):
    prepare = RowPreparer(SPEC, lambda image: image)
    err = _error(prepare, [np.zeros((3, 8, 8)).tolist(), item])
    assert err.status == 400 and message in str(err) and "inputs[1]" in str(err)


def test_a_stopped_request_stops_decoding_at_the_next_input():
    seen: list[int] = []
    stop = threading.Event()

    def transform(image):
        seen.append(1)
        stop.set()  # the client went away while the first image was being decoded
        return image

    with pytest.raises(Stopped):
        RowPreparer(SPEC, transform)([_png()] * 50, stop)
    assert len(seen) == 1


# --------------------------------------------------------------------------- /v1 responses


def test_v1_rows_rank_labels_by_probability():
    head = {"name": "cls", "task": "multiclass", "labels": ["cat", "dog", "bird"]}
    logits = np.array([[0.1, 2.0, -1.0]], np.float32)
    (row,) = head_rows(head, logits, top_k=2)
    probs = np.exp(logits[0]) / np.exp(logits[0]).sum()
    assert [r["label"] for r in row["top_k"]] == ["dog", "cat"]
    assert row["top_k"][0]["probability"] == pytest.approx(float(probs[1]))
    (binary,) = head_rows({"name": "s", "task": "binary"}, np.array([[0.0]], np.float32), top_k=5)
    assert {r["label"]: r["probability"] for r in binary["top_k"]} == {"0": 0.5, "1": 0.5}
    (regression,) = head_rows({"name": "r", "task": "regression"}, np.array([[1.5, 2.5]]), top_k=5)
    assert regression == {"output": [1.5, 2.5]}
    (multilabel,) = head_rows(
        {"name": "tags", "task": "multilabel", "labels": ["dot", "red", "striped"]},
        np.array([[2.0, -1.0, 0.5]], np.float32),
        top_k=2,
    )  # each label its own sigmoid, as offline predict ranks them; `labels`: those over 0.5
    assert [r["label"] for r in multilabel["top_k"]] == ["dot", "striped"]
    assert multilabel["top_k"][0]["probability"] == pytest.approx(1 / (1 + np.exp(-2.0)))
    assert multilabel["labels"] == ["dot", "striped"] and multilabel["output"] == [2.0, -1.0, 0.5]
    body = v1_predictions("m", [head], {"cls": np.repeat(logits, 2, 0)}, [2, 2], 1)
    assert body["model"] == "m" and len(body["predictions"]) == 2 and body["batch_sizes"] == [2, 2]


def test_the_cli_client_prints_a_multilabel_heads_labels_then_its_ranking():
    from serve.client import _format

    payload = {
        "predictions": [
            {
                "tags": {
                    "top_k": [{"label": "red", "probability": 0.9}, {"label": "dot", "probability": 0.6}],
                    "labels": ["red", "dot"],
                },
                "digit": {"top_k": [{"label": "3", "probability": 0.8}]},
            }
        ]
    }
    assert _format(payload, ["a.png"]) == "a.png:\n  tags: [red, dot] red 0.900, dot 0.600\n  digit: 3 0.800"
