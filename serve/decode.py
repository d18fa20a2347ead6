"""Request bodies to model rows: JSON (depth-limited before it is parsed), multipart uploads,
base64 and raw images, nested lists of numbers, text. Plain functions: no Ray, no HTTP server.

Every problem a client can cause is an `InputError` carrying the HTTP status it gets; nothing
here lets a hostile body cost more than its size allows (a JSON depth limit, a pixel limit
checked from the image header, a cap on inputs per request, and a stop flag checked between
inputs so a request whose client has gone stops being decoded).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import re
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from surgery.inputs import MAX_IMAGE_PIXELS, InputSpec

MAX_INPUTS_PER_REQUEST = 256
MAX_JSON_DEPTH = 32  # {"inputs": [[[[pixels]]]]} is 5 deep; Python's decoder recurses per level
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


class InputError(Exception):
    """A request the client must fix; `status` is the HTTP status it gets."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Stopped(Exception):
    """Decoding was stopped: the request's client is gone or its time is up."""


def json_depth(body: bytes) -> int:
    """How deeply arrays and objects nest in a JSON text, counted without parsing it (brackets
    inside strings do not count)."""
    if body.count(b"[") + body.count(b"{") <= MAX_JSON_DEPTH:
        return body.count(b"[") + body.count(b"{")
    stripped = _JSON_STRING.sub(b'""', body)
    codes = np.frombuffer(stripped, dtype=np.uint8)
    steps = (
        (codes == ord("[")).astype(np.int32)
        + (codes == ord("{"))
        - (codes == ord("]")).astype(np.int32)
        - (codes == ord("}"))
    )
    return int(np.cumsum(steps).max(initial=0))


def parse_json(body: bytes) -> Any:
    """A JSON body, refused with 400 when malformed or nested deeper than MAX_JSON_DEPTH."""
    if json_depth(body) > MAX_JSON_DEPTH:
        raise InputError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InputError('malformed JSON body; expected {"inputs": [...]}') from None


def json_items(body: bytes) -> list[Any]:
    """The entries of a `/v1` JSON body `{"inputs": [...]}`."""
    payload = parse_json(body)
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise InputError('expected a JSON object {"inputs": [...]}')
    items = payload["inputs"]
    if not isinstance(items, list):
        raise InputError('"inputs" must be a list (one entry per example)')
    return items


async def multipart_items(content_type: str, body: bytes) -> list[Any]:
    """The parts of a multipart/form-data body: bytes for files, str for fields."""
    from starlette.datastructures import Headers, UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream():
        yield body

    parser = MultiPartParser(
        Headers({"content-type": content_type}),
        stream(),
        max_files=MAX_INPUTS_PER_REQUEST,
        max_fields=MAX_INPUTS_PER_REQUEST,
        max_part_size=len(body) + 1,
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if exc.message.startswith("Too many"):  # files or fields: each part is an input
            raise _too_many(f"more than {MAX_INPUTS_PER_REQUEST}") from None
        raise InputError(f"malformed multipart body: {exc.message}") from None
    items: list[Any] = []
    for _, value in form.multi_items():
        if isinstance(value, UploadFile):
            items.append(await value.read())
        else:
            items.append(value)
    return items


def _too_many(count: str) -> InputError:
    return InputError(f"{count} inputs in one request; at most {MAX_INPUTS_PER_REQUEST}", 413)


def check_count(items: list[Any]) -> None:
    if not items:
        raise InputError("no inputs given")
    if len(items) > MAX_INPUTS_PER_REQUEST:
        raise _too_many(str(len(items)))


def b64_bytes(text: str, index: int) -> bytes:
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"inputs[{index}]: expected a base64-encoded image, got invalid base64") from None


def _too_large(index: int, pixels: str) -> InputError:
    return InputError(f"inputs[{index}]: image of {pixels} pixels is over the {MAX_IMAGE_PIXELS:,} pixel limit", 413)


def decode_image(data: bytes, index: int, mode: str | None = None) -> Any:
    """Encoded image bytes -> a loaded PIL image (in `mode` when given). Refuses images over the
    pixel limit with 413 before decoding them, and modes Pillow cannot convert with 400."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:  # Pillow's own, larger limit: refused from the header
        raise _too_large(index, "more than 2x89M") from None
    except Exception:
        raise InputError(f"inputs[{index}]: not a decodable image (send PNG/JPEG bytes, base64 in JSON)") from None
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise _too_large(index, f"{width}x{height}")
    try:
        image.load()
    except Image.DecompressionBombError:
        raise _too_large(index, f"{width}x{height}") from None
    except Exception:
        raise InputError(f"inputs[{index}]: not a decodable image (send PNG/JPEG bytes, base64 in JSON)") from None
    if mode is not None and image.mode != mode:
        from surgery.preprocess import in_mode  # 16-bit greyscale scaled, as in training

        try:
            image = in_mode(image, mode)
        except (ValueError, OSError):
            raise InputError(
                f"inputs[{index}]: image mode {image.mode} cannot be converted to {mode}; send an RGB or greyscale image"
            ) from None
    return image


def number_array(item: Any, shape: tuple[int, ...], what: str, index: int) -> np.ndarray:
    """Nested lists of numbers -> a float32 array of exactly `shape`, finite."""
    if not isinstance(item, list):
        raise InputError(f"inputs[{index}]: expected {what} as a nested list of numbers, got {type(item).__name__}")
    try:
        array = np.asarray(item)
    except ValueError:
        raise InputError(f"inputs[{index}]: nested list is ragged; expected shape {list(shape)}") from None
    if array.dtype.kind not in "fiu":
        raise InputError(f"inputs[{index}]: expected numbers, got values of type {array.dtype.name}")
    return checked_array(array, shape, index)


def checked_array(array: np.ndarray, shape: tuple[int, ...], index: int) -> np.ndarray:
    """A numeric array of one example checked against the model's input shape; float32, finite."""
    if array.shape != shape:
        if len(shape) == 3 and array.ndim == 3 and array.shape[1:] == shape[1:]:
            raise InputError(f"inputs[{index}]: expected {shape[0]} channels, got {array.shape[0]}")
        raise InputError(f"inputs[{index}]: expected shape {list(shape)}, got {list(array.shape)}")
    array = array.astype(np.float32, copy=not array.flags.writeable)
    if not np.isfinite(array).all():
        raise InputError(f"inputs[{index}]: contains NaN or infinity")
    return array


def example_shape(spec: InputSpec) -> tuple[int, ...]:
    """The shape of one example's numeric input (pixels C×H×W or a feature vector)."""
    return (spec.features,) if spec.kind == "vector" else (spec.channels, *spec.size)


class RowPreparer:
    """Validates and preprocesses inputs into model rows for one model's input spec."""

    def __init__(
        self,
        spec: InputSpec,
        transform: Callable[[Any], Any] | None = None,
        on_row: Callable[[], None] | None = None,
    ) -> None:
        self.spec = spec
        self.transform = transform
        self.on_row = on_row
        self.mode = _MODES.get(spec.channels) if spec.kind == "image" else None

    def __call__(self, items: list[Any], stop: threading.Event | None = None) -> list[Any]:
        """One row per input; raises `Stopped` between inputs once `stop` is set."""
        import torch

        spec = self.spec
        rows: list[Any] = []
        for i, item in enumerate(items):
            if stop is not None and stop.is_set():
                raise Stopped
            if spec.kind == "text":
                rows.append(text_item(item, i))
            elif isinstance(item, np.ndarray):
                rows.append(torch.from_numpy(checked_array(item, example_shape(spec), i)))
            elif spec.kind == "vector":
                rows.append(torch.from_numpy(number_array(item, (spec.features,), "a feature vector", i)))
            elif isinstance(item, list):
                rows.append(torch.from_numpy(number_array(item, example_shape(spec), "pixel values [C,H,W]", i)))
            elif isinstance(item, str | bytes):
                data = item if isinstance(item, bytes) else b64_bytes(item, i)
                rows.append(self.transform(decode_image(data, i, self.mode)))
            else:
                raise InputError(f"inputs[{i}]: expected an encoded image or pixel values, got {type(item).__name__}")
            if self.on_row is not None:
                self.on_row()
        return rows


def text_item(item: Any, index: int) -> str:
    if isinstance(item, bytes):
        item = item.decode("utf-8", errors="replace")
    if not isinstance(item, str):
        raise InputError(f"inputs[{index}]: expected text, got {type(item).__name__}")
    if not item.strip():
        raise InputError(f"inputs[{index}]: empty text")
    return item


async def v1_items(content_type: str, body: bytes, inline: bool = True) -> list[Any]:
    """The inputs of a `/v1` predict body, by content type (JSON, multipart, one raw image);
    JSON is parsed on a worker thread unless `inline`."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "multipart/form-data":
        items = await multipart_items(content_type, body)
    elif media.startswith("image/") or media == "application/octet-stream":
        items = [body]  # one encoded image as the whole body
    elif media in ("application/json", "") or media.endswith("+json"):
        items = json_items(body) if inline else await asyncio.to_thread(json_items, body)
    else:
        raise InputError(
            f"unsupported content type {media!r}; send application/json, multipart/form-data or image/*", 415
        )
    check_count(items)
    return items
