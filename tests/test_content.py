"""Telling files by their bytes: pickles of every protocol and torch.save's zips are recognised
whatever they are called, the files a bundle really holds are not mistaken for them, and a
safetensors header is believed only where it describes exactly the bytes that follow."""

from __future__ import annotations

import io
import json
import pickle

import pytest

from surgery.content import check_safetensors, refusal


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickles_of_every_protocol_are_recognised(protocol: int) -> None:
    assert refusal(pickle.dumps({"a": [1, 2.5, "x"], "b": None}, protocol=protocol)) == "is a pickle"


def test_a_long_protocol_0_pickle_is_recognised_from_its_start() -> None:
    data = pickle.dumps(list(range(200_000)), protocol=0)
    assert len(data) > 1 << 20 and refusal(data[: 1 << 20]) == "is a pickle"


def test_torch_save_is_recognised_in_both_formats() -> None:
    import torch

    for zipped in (True, False):
        buffer = io.BytesIO()
        torch.save({"w": torch.zeros(3)}, buffer, _use_new_zipfile_serialization=zipped)
        assert refusal(buffer.getvalue()) is not None


@pytest.mark.parametrize(
    "head",
    [
        b"# shared-tiny\n\nA tiny digit classifier.",
        b"# surgery lock: the resolved recipe\nname: x\n",
        b'{"format_version": 1, "name": "x"}',
        b"[PAD]\n[UNK]\n[CLS]\n",
        b"#version: 0.2\nh e\n",
        b"\x08\x08\x12\x07pytorch",  # an ONNX protobuf
        b"bad movie\n",
        b"",
    ],
)
def test_what_bundles_hold_is_not_taken_for_a_pickle(head: bytes) -> None:
    assert refusal(head) is None


def _safetensors(header: dict, data: bytes) -> tuple[io.BytesIO, int]:
    raw = json.dumps(header).encode()
    blob = len(raw).to_bytes(8, "little") + raw + data
    return io.BytesIO(blob), len(blob)


def test_a_real_safetensors_header_is_accepted() -> None:
    import torch
    from safetensors.torch import save

    blob = save({"a": torch.zeros(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}, metadata={"format": "pt"})
    header = check_safetensors(io.BytesIO(blob), len(blob))
    assert header["a"]["shape"] == [2, 3] and header["__metadata__"] == {"format": "pt"}


@pytest.mark.parametrize(
    ("header", "data", "match"),
    [
        ({"w": {"dtype": "F32", "shape": [10**12], "data_offsets": [0, 4 * 10**12]}}, b"\0" * 8, "cover"),
        ({"w": {"dtype": "F32", "shape": [10**12], "data_offsets": [0, 8]}}, b"\0" * 8, "claims 1000000000000"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "does not start"),
        ({"w": {"dtype": "PICKLE", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unknown dtype"),
        ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "bad shape"),
        ({"w": [1, 2]}, b"", "not described"),
    ],
)
def test_a_lying_safetensors_header_is_refused(header: dict, data: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_safetensors(*_safetensors(header, data))


def test_a_header_length_past_the_file_is_refused_without_reading_it() -> None:
    blob = (10**15).to_bytes(8, "little") + b"{}"
    with pytest.raises(ValueError, match="more than the file or safetensors allow"):
        check_safetensors(io.BytesIO(blob), len(blob))
