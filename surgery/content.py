"""What a file's bytes are, told by content rather than by name: pickles (any protocol), zip
archives (what `torch.save` writes, pickles inside), and safetensors files whose header is checked
against the file's size, reading the header only (bounded) and allocating nothing. `pull` runs
these on every member of an archive as it is written, and `load_bundle` on the weights before it
builds a model. No torch.
"""

from __future__ import annotations

import io
import json
import math
import pickletools
from pathlib import Path
from typing import Any, BinaryIO

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on its JSON header
_SNIFF_BYTES = 64 << 10  # how much of a file the pickle check reads
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


def refusal(head: bytes) -> str | None:
    """Why a file that starts with `head` must never be opened by anything that unpickles (a
    pickle of any protocol, or a zip archive such as `torch.save` writes), else None. Not for
    safetensors files: their 8-byte header length can read as opcodes; `check_safetensors` checks
    their whole structure instead."""
    if head.startswith(_ZIP_MAGIC):
        return "is a zip archive (what torch.save writes: pickles inside)"
    if _is_pickle(head[:_SNIFF_BYTES]):
        return "is a pickle"
    return None


def _is_pickle(head: bytes) -> bool:
    """Protocol 2+ pickles open with PROTO; protocols 0 and 1 are a stream of opcodes ending in
    STOP. A file is taken for a pickle if it opens with PROTO, or if its start parses as opcodes up
    to a STOP or to the end of what was read (text and other formats fail within a few bytes)."""
    if len(head) >= 2 and head[0] == 0x80 and head[1] <= 5:
        return True
    stream = io.BytesIO(head)
    parsed = 0
    try:
        for opcode, _arg, _pos in pickletools.genops(stream):
            parsed = stream.tell()
            if opcode.name == "STOP":
                return True
    except Exception:  # genops raises ValueError and others on what is not a pickle
        # a pickle cut off by the read window parses far into it (the rest of its last opcode is missing)
        return len(head) >= 1024 and parsed >= len(head) // 2
    return False


def check_safetensors(stream: BinaryIO, size: int) -> dict[str, Any]:
    """The header of a safetensors file of `size` bytes read from `stream` (positioned at its
    start), refused (ValueError, saying why) unless it describes exactly the bytes that follow it:
    known dtypes, non-negative shapes whose sizes match their data offsets, tensors contiguous and
    covering the rest of the file. So a header claiming 10^12 elements is refused before anything
    is allocated for them. Reads at most 8 + MAX_HEADER_BYTES bytes."""
    first = stream.read(8)
    if len(first) < 8:
        raise ValueError("shorter than a safetensors header")
    length = int.from_bytes(first, "little")
    if length > MAX_HEADER_BYTES or 8 + length > size:
        raise ValueError(f"its header claims {length} bytes, more than the file or safetensors allow")
    raw = stream.read(length)
    if len(raw) < length:
        raise ValueError("its header is cut off")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ValueError("its header is not JSON") from None
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise ValueError("its __metadata__ is not a map of strings")
            continue
        spans.append(_span(name, info))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise ValueError(f"tensor {name[:64]!r} does not start where the one before it ends")
        end = stop
    if 8 + length + end != size:
        raise ValueError(f"its tensors cover {end} bytes, the file holds {size - 8 - length} after the header")
    return header


def _span(name: str, info: Any) -> tuple[int, int, str]:
    what = f"tensor {name[:64]!r}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise ValueError(f"{what} is not described by dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"{what} has an unknown dtype {str(dtype)[:16]!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"{what} has a bad shape")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
        raise ValueError(f"{what} has bad data_offsets")
    begin, stop = offsets
    if stop - begin != math.prod(shape) * DTYPE_BYTES[dtype]:  # Python integers: no overflow
        raise ValueError(f"{what}: its shape does not match its data_offsets (claims {math.prod(shape)} elements)")
    return begin, stop, name


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """`check_safetensors` on a file."""
    with Path(path).open("rb") as f:
        return check_safetensors(f, Path(path).stat().st_size)


__all__ = ["DTYPE_BYTES", "MAX_HEADER_BYTES", "check_safetensors", "read_safetensors_header", "refusal"]
