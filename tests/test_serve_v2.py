"""The Open Inference Protocol adapter without a server: requests as tritonclient writes them
(JSON and the binary tensor data extension) in, responses tritonclient reads back out."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.http._utils import _get_inference_request

from serve import v2
from serve.decode import InputError
from surgery.inputs import InputSpec

IMAGE = InputSpec(kind="image", channels=3, size=(4, 4))
HEADS = [
    {"name": "cls", "task": "multiclass", "labels": ["a", "b", "c"], "out_features": 3, "output_shape": ["batch", 3]},
    {"name": "score", "task": "binary", "labels": None, "out_features": 1, "output_shape": ["batch", 1]},
]


def _request(inputs, outputs=None) -> tuple[bytes, int | None]:
    """The body and header length tritonclient would send."""
    return _get_inference_request(inputs, "", outputs, 0, False, False, 0, None, None)


def _result(body: bytes, headers: dict[str, str]) -> triton.InferResult:
    length = headers.get(v2.HEADER_LENGTH)
    return triton.InferResult.from_response_body(body, header_length=int(length) if length else None)


@pytest.mark.parametrize("binary", [True, False])
def test_numeric_tensors_round_trip(binary):
    pixels = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    tensor = triton.InferInput("pixel_values", [2, 3, 4, 4], "FP32")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    request = v2.parse_request(*_request([tensor]))
    items = v2.model_items(request, IMAGE)
    assert len(items) == 2 and np.array_equal(items[1], pixels[1])
    outputs = {"cls": np.ones((2, 3), np.float32), "score": np.zeros((2, 1), np.float32)}
    body, headers = v2.encode_response("m", request, HEADS, outputs)
    assert v2.HEADER_LENGTH in headers  # no outputs named: tritonclient asks for every one, binary
    result = _result(body, headers)
    assert np.array_equal(result.as_numpy("cls"), outputs["cls"])
    assert result.get_response()["outputs"][1]["shape"] == [2, 1]


def test_bytes_tensors_and_classification():
    images = np.array([b"\x89PNG one", b"\x89PNG two\x00\xff"], dtype=object)
    tensor = triton.InferInput("image", [2], "BYTES")
    tensor.set_data_from_numpy(images, binary_data=True)
    wanted = [
        triton.InferRequestedOutput("cls", class_count=2),
        triton.InferRequestedOutput("score", binary_data=False),
    ]
    request = v2.parse_request(*_request([tensor], wanted))
    assert v2.model_items(request, IMAGE) == list(images)
    outputs = {"cls": np.array([[0.1, 0.9, 0.5], [3.0, 1.0, 2.0]], np.float32), "score": np.zeros((2, 1), np.float32)}
    result = _result(*v2.encode_response("m", request, HEADS, outputs))
    assert [[c.decode() for c in row] for row in result.as_numpy("cls")] == [
        ["0.900000:1:b", "0.500000:2:c"],
        ["3.000000:0:a", "2.000000:2:c"],
    ]
    assert result.as_numpy("score").tolist() == [[0.0], [0.0]]


def test_text_models_take_utf8_bytes():
    spec = InputSpec(kind="text", channels=0, mean=(), std=())
    tensor = triton.InferInput("text", [2, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([["a fine day"], ["schön"]], dtype=object), binary_data=False)
    assert v2.model_items(v2.parse_request(*_request([tensor])), spec) == ["a fine day", "schön"]
    assert v2.input_tensors(spec) == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]


def test_metadata_shapes_put_the_batch_first_as_minus_one():
    meta = v2.model_metadata("m", IMAGE, HEADS)
    assert meta["inputs"][0] == {"name": "pixel_values", "datatype": "FP32", "shape": [-1, 3, 4, 4]}
    assert [o["shape"] for o in meta["outputs"]] == [[-1, 3], [-1, 1]]
    tokens = [{"name": "t", "output_shape": ["batch", "sequence", 5]}]
    assert v2.output_tensors(tokens)[0]["shape"] == [-1, -1, 5]


@pytest.mark.parametrize(
    ("body", "header_length", "message"),
    [
        (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 8}}]}'
         b"\x09\x00\x00\x00abc", "auto", "binary_data_size 8"),
        (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 7}}]}'
         b"\x09\x00\x00\x00abc", "auto", "runs past"),
        (b'{"inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 3}}]}'
         b"abc", "auto", "3 bytes of binary data for 1 FP32 values"),
        (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}xyz', "auto",
         "3 bytes of binary data no input claims"),
        (b'{"inputs": []}', 999, "does not fit a body"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1], "data": []}]}', None, "must not be negative"),
        (b'{"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": [300]}]}', None, "out of range"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": ["1"]}]}', None, "must be numbers"),
        (b"[" * 100 + b"]" * 100, None, "deeper than"),
    ],
)  # fmt: skip
def test_malformed_requests_are_400_naming_the_problem(body, header_length, message):
    if header_length == "auto":
        header_length = body.index(b"}]}") + 3
    with pytest.raises(InputError) as caught:
        v2.parse_request(body, header_length)
    assert caught.value.status == 400 and message in str(caught.value)


def test_requests_the_model_cannot_take():
    def items(*tensors):
        return v2.model_items(v2.InferRequest(None, list(tensors), None), IMAGE)

    pixels = v2.Tensor("pixel_values", "FP32", [1, 3, 4, 4], np.zeros((1, 3, 4, 4), np.float32))
    for call, message in [
        (lambda: items(pixels, pixels), "2 input tensors; this model takes one"),
        (lambda: items(v2.Tensor("pixel_values", "BOOL", [1, 3, 4, 4], None)), "expected a numeric datatype"),
        (lambda: items(v2.Tensor("image", "FP32", [1], None)), "expected BYTES"),
        (lambda: items(v2.Tensor("image", "BYTES", [2], [b"a"])), "one element per example"),
    ]:
        with pytest.raises(InputError, match=message):
            call()
    request = v2.InferRequest(None, [pixels], [v2.Requested("nope", False)])
    with pytest.raises(InputError, match="unknown output 'nope'"):
        v2.check_outputs(request, HEADS)
    assert json.loads(v2.error_answer_body("x")) == {"error": "x"}


HOSTILE_SHAPES = [[10**30], [2**32, 2**32], [2**62, 4, 1, 16, 16], [0, 10**30], [1] * 40, [2**31, 3, 4, 4]]


def _hostile_bodies() -> list:
    """Infer requests whose shapes lie, as JSON and with binary data (generated, not hand-written)."""
    bodies = []
    for shape in HOSTILE_SHAPES:
        for name, datatype in (("pixel_values", "FP32"), ("pixel_values", "UINT8"), ("image", "BYTES")):
            plain = {
                "name": name,
                "datatype": datatype,
                "shape": shape,
                "data": [0] if datatype != "BYTES" else ["eA=="],
            }
            bodies.append(pytest.param(json.dumps({"inputs": [plain]}).encode(), None, id=f"json-{datatype}-{shape}"))
            for size in (0, 4, 16):
                tensor = {"name": name, "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": size}}
                head = json.dumps({"inputs": [tensor]}).encode()
                data = head + b"\x01\x00\x00\x00x" * 4
                bodies.append(pytest.param(data, len(head), id=f"binary-{datatype}-{shape}-{size}"))
    return bodies


@pytest.mark.parametrize(("body", "header_length"), _hostile_bodies())
def test_shapes_that_lie_are_400_before_anything_is_allocated(body, header_length):
    with pytest.raises(InputError) as caught:
        request = v2.parse_request(body, header_length)
        v2.model_items(request, IMAGE)
    assert caught.value.status == 400


@pytest.mark.parametrize("value", ["²", "١٢", "１２", "1" * 30, "-1", "0x10", "", " "])
def test_a_header_length_that_is_not_ascii_digits_is_400(value):
    with pytest.raises(InputError) as caught:
        v2.header_length(value)
    assert caught.value.status == 400 and v2.HEADER_LENGTH in str(caught.value)
    assert v2.header_length(" 12 ") == 12 and v2.header_length(None) is None
