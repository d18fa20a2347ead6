"""The exported formats a bundle's manifest lists, each checked before the bundle is served.

A manifest that lists a format its file cannot back is refused, never passed on: `/v1/models`
tells clients which formats a model has, and a bundle may come from someone else (a garbage
`model.onnx`, re-hashed into the manifest, must not be announced as an ONNX model). Refusing is
what every other lie in a manifest gets; dropping the format quietly would serve a bundle whose
manifest is known to be false.

- `safetensors`: loaded into the model, strictly, by `surgery.bundle.load_bundle`.
- `onnx`: parsed (protobuf: no code runs) and passed through `onnx.checker`; its inputs and
  outputs must be the manifest's input names and heads, and tensor data kept outside the file
  must be in files the manifest lists (so inside the bundle, and hashed).
- `torchscript`, `pt2`: these archives hold pickles, and nothing in surgery unpickles a file of a
  bundle. They are checked as intact archives of their kind: a zip whose members are all stored
  uncompressed, as torch writes them (so checking costs no more than the file's size), each with
  a matching CRC, holding the members their exporter writes. What the pickles say is vouched for
  by the sha256 in the manifest alone.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from surgery.bundle import inside
from surgery.errors import BundleError

# Torch stores tensors plain and deflates small code files: what checking a member's CRC may
# unpack beyond the archive's own size (zipfile reads no more than a member's declared size).
_TORCH_COMPRESSION = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
MAX_UNPACKED_EXTRA = 256 * 2**20


class _Unusable(Exception):
    """Why a format's file does not back it (a phrase: "is not an ONNX model")."""


def verify_formats(path: Path, manifest: dict[str, Any]) -> None:
    """Check every format the manifest lists against its file; the first that fails is a
    `BundleError` naming the file and why. Run after `verify_files` (the hashes) or `load_bundle`."""
    path = Path(path)
    for name, entry in manifest["formats"].items():
        file = inside(path, entry["file"])
        try:
            _CHECKS[name](file, manifest)
        except _Unusable as err:
            raise BundleError(
                f"{path / entry['file']}: listed as the bundle's {name} format, but it {err}; export the bundle again"
            ) from None


def _safetensors(file: Path, manifest: dict[str, Any]) -> None:
    """Loaded by `load_bundle`, which every replica runs before it answers."""


def _onnx(file: Path, manifest: dict[str, Any]) -> None:
    import onnx

    try:
        model = onnx.load(str(file), load_external_data=False)
    except Exception:  # protobuf's DecodeError, and whatever a truncated file raises
        raise _Unusable("is not an ONNX model") from None
    listed = manifest["files"]
    for tensor in _tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            if location not in listed:
                raise _Unusable("keeps tensor data in a file the manifest does not list")
    try:
        onnx.checker.check_model(str(file))
    except Exception as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise _Unusable(f"fails the ONNX checker ({first})") from None
    weights = {t.name for t in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in weights]
    outputs = sorted(o.name for o in model.graph.output)
    heads = sorted(h["name"] for h in manifest["heads"])
    if inputs != list(manifest["input_names"]) or outputs != heads:
        raise _Unusable(
            f"takes {len(inputs)} inputs and gives {len(outputs)} outputs that are not the manifest's "
            f"input names ({', '.join(manifest['input_names'])}) and heads ({', '.join(heads)})"
        )


def _tensors(graph: Any) -> Iterator[Any]:
    """Every tensor of a graph and of its subgraphs (initializers and constant attributes)."""
    yield from graph.initializer
    yield from (sparse.values for sparse in graph.sparse_initializer)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _tensors(attribute.g)
            for sub in attribute.graphs:
                yield from _tensors(sub)


def _torch_archive(kind: str, layouts: tuple[tuple[str, ...], ...]) -> Callable[[Path, dict[str, Any]], None]:
    """A check that `file` is an intact torch zip archive holding one of `layouts` (member names
    under the archive's one top folder; a name ending in / is a folder with something in it)."""

    def check(file: Path, manifest: dict[str, Any]) -> None:
        try:
            with zipfile.ZipFile(file) as archive:
                members = archive.infolist()
                unpacked = sum(m.file_size for m in members)
                if any(m.compress_type not in _TORCH_COMPRESSION for m in members):
                    raise _Unusable(f"is not a {kind} archive (torch stores members plain or deflated)")
                if unpacked > file.stat().st_size + MAX_UNPACKED_EXTRA:
                    raise _Unusable(f"is not a {kind} archive (its members unpack to far more than its size)")
                names = _under_one_root([m.filename for m in members])
                if not any(all(_holds(names, wanted) for wanted in layout) for layout in layouts):
                    raise _Unusable(f"is not a {kind} archive (it lacks the members torch writes)")
                if archive.testzip() is not None:
                    raise _Unusable("is damaged (a member fails its CRC check)")
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError):
            raise _Unusable(f"is not a {kind} archive (not a readable zip file)") from None

    return check


def _under_one_root(names: list[str]) -> set[str]:
    """Member names relative to the archive's top folder, when every member is under one."""
    roots = {name.split("/", 1)[0] for name in names}
    if len(roots) == 1 and all("/" in name for name in names):
        return {name.split("/", 1)[1] for name in names}
    return set(names)


def _holds(names: set[str], wanted: str) -> bool:
    return any(name.startswith(wanted) for name in names) if wanted.endswith("/") else wanted in names


_CHECKS: dict[str, Callable[[Path, dict[str, Any]], None]] = {
    "safetensors": _safetensors,
    "onnx": _onnx,
    "torchscript": _torch_archive("TorchScript", (("data.pkl", "constants.pkl", "version", "code/"),)),
    # torch >= 2.6 writes the PT2 archive format; earlier versions one JSON program and its tensors
    "pt2": _torch_archive("torch.export", (("archive_format", "models/"), ("serialized_exported_program.json",))),
}
