"""The Open Inference Protocol (KServe V2, the REST protocol of Triton, KServe, MLServer and Seldon)
as plain functions: model metadata, infer requests with typed tensors and the binary tensor data
extension, responses with one named output per head, and the protocol's error body.

A served model takes exactly one input tensor per request, named as its metadata says:
- image models: `pixel_values` (numbers, [-1, C, H, W], the preprocessed tensor, as `/v1` nested
  lists) or `image` (BYTES, [-1]: encoded PNG/JPEG…, base64 when sent as JSON strings);
- text models: `text` (BYTES, [-1], UTF-8);
- vector models: `features` (numbers, [-1, F]).
Each head is an output of the same name (FP32, batch first). An output requested with
`parameters: {"classification": K}` answers Triton's classification extension instead: BYTES
`"value:index:label"` for the K highest scores of each row.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serve.decode import InputError, check_count, example_shape, parse_json
from surgery.inputs import InputSpec

HEADER_LENGTH = "Inference-Header-Content-Length"
PROTOCOL_VERSION = "2"
EXTENSIONS = ["binary_tensor_data", "classification"]
SERVER_NAME = "surgery"

DTYPES: dict[str, np.dtype | None] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": None,
}
MAX_DIMS = 32  # numpy's own limit is 64; no model here takes more than 4
NUMERIC = tuple(name for name, dtype in DTYPES.items() if dtype is not None and name != "BOOL")


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    data: Any  # np.ndarray for numbers, list[bytes | str] for BYTES


@dataclass
class Requested:
    name: str
    binary: bool
    classification: int = 0


@dataclass
class InferRequest:
    id: str | None
    inputs: list[Tensor]
    outputs: list[Requested] | None  # None: every output
    binary_output: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)


def error_body(message: str) -> dict[str, str]:
    """The protocol's error response body."""
    return {"error": message}


def error_answer_body(message: str) -> bytes:
    return json.dumps(error_body(message)).encode()


def server_metadata() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        own = version("surgery")
    except PackageNotFoundError:
        own = "unknown"
    return {"name": SERVER_NAME, "version": own, "extensions": EXTENSIONS}


# --------------------------------------------------------------------------- metadata


def input_tensors(spec: InputSpec) -> list[dict[str, Any]]:
    """The inputs a model's metadata names (a request gives exactly one of them)."""
    if spec.kind == "text":
        return [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    if spec.kind == "vector":
        return [{"name": "features", "datatype": "FP32", "shape": [-1, spec.features]}]
    return [
        {"name": "pixel_values", "datatype": "FP32", "shape": [-1, *example_shape(spec)]},
        {"name": "image", "datatype": "BYTES", "shape": [-1]},
    ]


def output_tensors(heads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    outputs = []
    for head in heads:
        shape = head.get("output_shape") or ["batch", head.get("out_features") or -1]
        dims = [d if isinstance(d, int) and d >= 0 else -1 for d in shape]
        outputs.append({"name": head["name"], "datatype": "FP32", "shape": [-1, *dims[1:]]})
    return outputs


def model_metadata(name: str, spec: InputSpec, heads: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": name,
        "versions": ["1"],
        "platform": "pytorch_safetensors",
        "inputs": input_tensors(spec),
        "outputs": output_tensors(heads),
    }


# --------------------------------------------------------------------------- requests


def _bad(message: str) -> InputError:
    return InputError(message, 400)


def _shape(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise _bad(f"{where}.shape: expected a list of integers")
    if len(value) > MAX_DIMS:
        raise _bad(f"{where}.shape: {len(value)} dimensions; at most {MAX_DIMS}")
    if any(d < 0 for d in value):
        raise _bad(f"{where}.shape: dimensions must not be negative, got {value}")
    return value


def element_count(shape: list[int], limit: int) -> int | None:
    """The elements a shape holds, or None once that passes `limit` (the values or bytes the
    request sends for it). Python integers, checked after each dimension, so a shape like [10**30]
    or [2**62, 4, 1, 16, 16] is refused before anything is allocated for it, never wrapped around
    by a fixed-width product."""
    count = 1
    for dim in shape:
        if dim > limit:
            return None
        count *= dim
        if count > limit:
            return None
    return count


def _bytes_elements(raw: bytes, count: int, where: str) -> list[bytes]:
    """BYTES tensor data in the binary extension: each element a 4-byte little-endian length, then
    that many bytes."""
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise _bad(f"{where}: truncated BYTES element length")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise _bad(f"{where}: BYTES element of {length} bytes runs past the tensor's binary data")
        elements.append(raw[offset : offset + length])
        offset += length
    if len(elements) != count:
        raise _bad(f"{where}: {len(elements)} BYTES elements for shape of {count}")
    return elements


def _flat(value: Any) -> list[Any]:
    """Triton accepts `data` flat or nested as the shape: flatten nested lists."""
    if isinstance(value, list) and value and isinstance(value[0], list):
        return [x for part in value for x in _flat(part)]
    return value


def _tensor(raw: Any, index: int, binary: memoryview, offset: int) -> tuple[Tensor, int]:
    where = f"inputs[{index}]"
    if not isinstance(raw, dict):
        raise _bad(f"{where}: expected an object with name, datatype, shape and data")
    name, datatype = raw.get("name"), raw.get("datatype")
    if not isinstance(name, str) or not name:
        raise _bad(f"{where}.name: expected a string")
    where = f"input {name!r}"
    if datatype not in DTYPES:
        raise _bad(f"{where}: unsupported datatype {datatype!r}; one of {', '.join(DTYPES)}")
    shape = _shape(raw.get("shape"), where)
    parameters = raw.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise _bad(f"{where}.parameters: expected an object")
    size = parameters.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
            raise _bad(f"{where}: binary_data_size {size!r} does not fit the binary data after the JSON header")
        count = element_count(shape, size)  # every element takes at least one byte
        if count is None:
            raise _bad(f"{where}: {size} bytes of binary data for shape {shape}")
        chunk = bytes(binary[offset : offset + size])
        offset += size
        if datatype == "BYTES":
            return Tensor(name, datatype, shape, _bytes_elements(chunk, count, where)), offset
        dtype = DTYPES[datatype]
        if size != count * dtype.itemsize:
            raise _bad(f"{where}: {size} bytes of binary data for {count} {datatype} values")
        return Tensor(name, datatype, shape, np.frombuffer(chunk, dtype=dtype).reshape(shape)), offset
    if "data" not in raw:
        raise _bad(f"{where}: no data (give `data`, or `parameters.binary_data_size` with binary data)")
    data = _flat(raw["data"])
    if not isinstance(data, list) or element_count(shape, len(data)) != len(data):
        got = len(data) if isinstance(data, list) else type(data).__name__
        raise _bad(f"{where}: {got} values for shape {shape}")
    if datatype == "BYTES":
        if not all(isinstance(x, str) for x in data):
            raise _bad(f"{where}: BYTES data in JSON must be strings")
        return Tensor(name, datatype, shape, data), offset
    if not all(isinstance(x, int | float) for x in data):
        raise _bad(f"{where}: {datatype} data must be numbers")
    try:
        array = np.asarray(data, dtype=DTYPES[datatype])
    except (OverflowError, ValueError):
        raise _bad(f"{where}: values out of range for {datatype}") from None
    return Tensor(name, datatype, shape, array.reshape(shape)), offset


def _requested(raw: Any) -> list[Requested] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise _bad("outputs: expected a list")
    wanted = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise _bad(f"outputs[{i}]: expected an object with a name")
        parameters = item.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise _bad(f"outputs[{i}].parameters: expected an object")
        k = parameters.get("classification", 0)
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise _bad(f"outputs[{i}].parameters.classification: expected a count, got {k!r}")
        wanted.append(Requested(item["name"], bool(parameters.get("binary_data", False)), k))
    return wanted


def header_length(value: str | None) -> int | None:
    """The `Inference-Header-Content-Length` header as a byte count: ASCII digits only ('²' and
    '٣' are digits to `str.isdigit` but not to `int`), and short enough to convert."""
    if value is None:
        return None
    value = value.strip()
    if not (value.isascii() and value.isdigit() and len(value) <= 20):
        raise _bad(f"invalid {HEADER_LENGTH} header; expected a byte count")
    return int(value)


def parse_request(body: bytes, header_length: int | None) -> InferRequest:
    """An infer request: JSON, or a JSON header of `header_length` bytes followed by binary
    tensor data (the binary tensor data extension)."""
    if header_length is not None and not 0 < header_length <= len(body):
        raise _bad(f"{HEADER_LENGTH} {header_length} does not fit a body of {len(body)} bytes")
    head = body if header_length is None else body[:header_length]
    binary = memoryview(body)[len(head) :]
    payload = parse_json(head)
    if not isinstance(payload, dict):
        raise _bad("expected a JSON object with inputs")
    raw_inputs = payload.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise _bad("inputs: expected a non-empty list of tensors")
    inputs, offset = [], 0
    for i, raw in enumerate(raw_inputs):
        tensor, offset = _tensor(raw, i, binary, offset)
        inputs.append(tensor)
    if offset != len(binary):
        raise _bad(f"{len(binary) - offset} bytes of binary data no input claims")
    parameters = payload.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise _bad("parameters: expected an object")
    request_id = payload.get("id")
    return InferRequest(
        id=request_id if isinstance(request_id, str) else None,
        inputs=inputs,
        outputs=_requested(payload.get("outputs")),
        binary_output=bool(parameters.get("binary_data_output", False)),
        parameters=parameters,
    )


def _describe(spec: InputSpec) -> str:
    return " or ".join(f"{t['name']} ({t['datatype']} {t['shape']})" for t in input_tensors(spec))


def model_items(request: InferRequest, spec: InputSpec) -> list[Any]:
    """The request's one input tensor as per-example items for the model's row decoder."""
    if len(request.inputs) != 1:
        raise _bad(f"{len(request.inputs)} input tensors; this model takes one: {_describe(spec)}")
    (tensor,) = request.inputs
    known = {t["name"]: t for t in input_tensors(spec)}
    if tensor.name not in known:
        raise _bad(f"unknown input {tensor.name!r}; this model takes {_describe(spec)}")
    wanted = known[tensor.name]["datatype"]
    if wanted == "BYTES":
        if tensor.datatype != "BYTES":
            raise _bad(f"input {tensor.name!r}: expected BYTES, got {tensor.datatype}")
        items = list(tensor.data)
        if not tensor.shape or tensor.shape[0] != len(items):
            raise _bad(
                f"input {tensor.name!r}: shape {tensor.shape} must be [N] or [N, 1] with one element per example"
            )
        if spec.kind == "image":
            items = [_image_bytes(item, i) for i, item in enumerate(items)]
    else:
        if tensor.datatype not in NUMERIC:
            raise _bad(
                f"input {tensor.name!r}: expected a numeric datatype ({', '.join(NUMERIC)}), got {tensor.datatype}"
            )
        shape = example_shape(spec)
        if list(tensor.shape[1:]) != list(shape):
            raise _bad(f"input {tensor.name!r}: expected shape [-1, {', '.join(map(str, shape))}], got {tensor.shape}")
        items = list(tensor.data)
    check_count(items)
    return items


def _image_bytes(item: bytes | str, index: int) -> bytes:
    if isinstance(item, bytes):
        return item
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(f"inputs[{index}]: BYTES image data in JSON must be base64; got invalid base64") from None


# --------------------------------------------------------------------------- responses


def _classification(head: dict[str, Any], values: np.ndarray, k: int) -> np.ndarray:
    """Triton's classification extension: per row the k highest scores as "value:index[:label]"."""
    flat = values.reshape(values.shape[0], -1)
    labels = list(head.get("labels") or [])
    k = min(k, flat.shape[1])
    order = np.argsort(-flat, axis=1, kind="stable")[:, :k]
    rows = []
    for row, indices in zip(flat, order, strict=True):
        cells = []
        for i in indices:
            label = f":{labels[i]}" if len(labels) == flat.shape[1] else ""
            cells.append(f"{float(row[i]):f}:{int(i)}{label}".encode())
        rows.append(cells)
    return np.array(rows, dtype=object)


def _serialize_bytes(values: np.ndarray) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values.reshape(-1))


def check_outputs(request: InferRequest, heads: list[dict[str, Any]]) -> list[Requested]:
    """The outputs to answer with (every head when the request names none), all known."""
    names = [h["name"] for h in heads]
    if request.outputs is None:
        return [Requested(name, request.binary_output) for name in names]
    for item in request.outputs:
        if item.name not in names:
            raise _bad(f"unknown output {item.name!r}; this model has {', '.join(names)}")
    return request.outputs


def encode_response(
    model: str, request: InferRequest, heads: list[dict[str, Any]], outputs: dict[str, np.ndarray]
) -> tuple[bytes, dict[str, str]]:
    """The infer response body (JSON, or JSON header + binary data) and its extra headers."""
    by_name = {h["name"]: h for h in heads}
    wanted = check_outputs(request, heads)
    tensors, chunks = [], []
    for item in wanted:
        values = outputs[item.name]
        if item.classification:
            array, datatype = _classification(by_name[item.name], values, item.classification), "BYTES"
        else:
            array, datatype = np.ascontiguousarray(values, dtype="<f4"), "FP32"
        tensor: dict[str, Any] = {"name": item.name, "datatype": datatype, "shape": list(array.shape)}
        if item.binary or request.binary_output:
            raw = _serialize_bytes(array) if datatype == "BYTES" else array.tobytes()
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif datatype == "BYTES":
            tensor["data"] = [v.decode() for v in array.reshape(-1)]
        else:
            tensor["data"] = array.reshape(-1).tolist()
        tensors.append(tensor)
    response: dict[str, Any] = {"model_name": model, "model_version": "1", "outputs": tensors}
    if request.id is not None:
        response["id"] = request.id
    head = json.dumps(response, separators=(",", ":")).encode()
    if not chunks:
        return head, {}
    return head + b"".join(chunks), {HEADER_LENGTH: str(len(head))}
