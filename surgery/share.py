"""Sharing trained models: `surgery pack` writes one archive, `surgery pull` fetches and checks it.

An archive (tar, optionally gzip) holds:

  pack.json        format, model name, sha256 and size of every other member, optional signature
  README.md        a generated model card
  recipe.yaml      the resolved recipe (the run's recipe.lock.yaml when packed from a run)
  bundle/...       the bundle: model.safetensors, manifest.json, tokenizer files, model.onnx

Formats whose files hold pickles (TorchScript `model.ts`, `torch.export` `model.pt2`) are left out
of the packed bundle, and its manifest copy drops them, since a shared model must never be
unpickled. `pull` downloads within limits (`surgery.library_fetch`), extracts into a new folder
only, checking every member before and while it is written (`surgery.archive`), then checks
pack.json (format version, signature, every hash) and the bundle's own manifest against its own
members. On any failure or interruption the folder is removed and nothing else was touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import shutil
import signal
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from surgery.archive import ShareError, extract, size_text
from surgery.files import remove_path
from surgery.keys import read_signed_document, sign_document
from surgery.library_fetch import fetch_to_file, is_url, sha256_bytes

PACK_FORMAT = "surgery-pack"
PACK_FORMAT_VERSION = 1
PACK_FILE = "pack.json"
CARD = "README.md"
RECIPE = "recipe.yaml"
BUNDLE = "bundle"
TOP_LEVEL = frozenset({PACK_FILE, CARD, RECIPE, BUNDLE})  # all an archive may hold
INCOMING = ".incoming"  # where a pull stages what it unpacks, inside the target folder
PICKLE_FORMATS = {"torchscript": "model.ts", "pt2": "model.pt2"}
MAX_TOTAL_BYTES = 64 << 30  # what one pull may download, and write, unless told otherwise
MAX_SIZE_ENV = "SURGERY_PULL_MAX_SIZE"
MAX_PACK_FILE_BYTES = 16 << 20
PULL_DEADLINE_S = 4 * 3600.0  # a whole download; a stalled one is cut off much sooner (library_fetch)


# --------------------------------------------------------------------------- pack


def _find_bundle(target: Path) -> tuple[Path, Path | None]:
    """(bundle folder, run folder or None) for a run folder or a bundle."""
    target = Path(target).resolve()
    if (target / "manifest.json").is_file():
        run = target.parent if (target.parent / "recipe.lock.yaml").is_file() else None
        return target, run
    if (target / BUNDLE / "manifest.json").is_file():
        return target / BUNDLE, target
    raise ShareError(f"{target}: neither a bundle nor a run folder with bundle/ (build or export it first)")


def pack_command(target: Path, out: Path, *, sign: str | None = None) -> str:
    """`surgery pack`: write the archive; returns what to tell the user."""
    path, left_out = pack(target, out, sign=sign)
    note = f" (left out {', '.join(left_out)}: they hold pickles)" if left_out else ""
    return f"packed {path}{note}"


def pack(target: Path, out: Path, *, sign: str | None = None) -> tuple[Path, list[str]]:
    """Pack a run or bundle into `out`; returns the archive and the bundle files left out."""
    from surgery.bundle import read_manifest, verify_files
    from surgery.recipe import load_recipe_text

    bundle, run = _find_bundle(target)
    manifest = read_manifest(bundle)
    verify_files(bundle, manifest)  # never pass on a damaged bundle
    left_out = [f for f in PICKLE_FORMATS.values() if f in manifest["files"]]
    shared = dict(manifest)
    shared["files"] = {k: v for k, v in manifest["files"].items() if k not in left_out}
    shared["formats"] = {k: v for k, v in (manifest.get("formats") or {}).items() if k not in PICKLE_FORMATS}
    members: dict[str, bytes | Path] = {f"{BUNDLE}/{rel}": bundle / rel for rel in shared["files"]}
    members[f"{BUNDLE}/manifest.json"] = json.dumps(shared, indent=2).encode()
    lock = run / "recipe.lock.yaml" if run else None
    recipe_text = (lock if lock and lock.is_file() else bundle / "recipe.yaml").read_text(encoding="utf-8")
    members[RECIPE] = recipe_text.encode()
    recipe = load_recipe_text((bundle / "recipe.yaml").read_text(encoding="utf-8"), filename="recipe.yaml")
    members[CARD] = model_card(recipe, shared, recipe_text, run).encode()
    doc: dict[str, Any] = {
        "format": PACK_FORMAT,
        "format_version": PACK_FORMAT_VERSION,
        "name": shared.get("name") or recipe.name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "files": {name: _digest(name, data, shared["files"]) for name, data in sorted(members.items())},
    }
    if sign:
        doc = sign_document(doc, sign)
    _write_tar(Path(out), {PACK_FILE: json.dumps(doc, indent=2).encode(), **members})
    return Path(out).resolve(), left_out


def _digest(name: str, data: bytes | Path, verified: dict[str, str]) -> dict[str, Any]:
    """sha256 and size of a member; bundle files were just verified against their manifest, so
    its hashes are reused instead of reading each file again."""
    if isinstance(data, Path):
        return {"sha256": verified[name.removeprefix(f"{BUNDLE}/")], "size": data.stat().st_size}
    return {"sha256": sha256_bytes(data), "size": len(data)}


def _write_tar(out: Path, members: dict[str, bytes | Path]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    mode = "w:gz" if out.name.endswith((".tar.gz", ".tgz")) else "w"
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        with tarfile.open(tmp, mode) as tar:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.mode, info.mtime, info.uname, info.gname = 0o644, int(time.time()), "", ""
                if isinstance(data, Path):
                    info.size = data.stat().st_size
                    with data.open("rb") as f:
                        tar.addfile(info, f)
                else:
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def model_card(recipe: Any, manifest: dict[str, Any], recipe_text: str, run: Path | None) -> str:
    """README.md for a packed model: what it does, how it was trained, where it came from."""
    heads = manifest.get("heads") or []
    spec = manifest.get("input") or {}
    data = recipe.data
    train = recipe.train
    lines = [f"# {recipe.name}", "", recipe.description or "(no description in the recipe)", ""]
    lines += ["## Task", ""]
    for head in heads:
        labels = head.get("labels")
        shown = ", ".join(map(str, labels[:50])) + (" ..." if labels and len(labels) > 50 else "") if labels else "-"
        lines.append(
            f"- head `{head['name']}`: {head.get('task')}, {head.get('out_features')} outputs; labels: {shown}"
        )
    kind = spec.get("kind")
    shape = (
        f"{spec.get('channels')}×{'×'.join(map(str, spec.get('size') or []))} image"
        if kind == "image"
        else f"text, up to {spec.get('max_length')} tokens"
        if kind == "text"
        else str(kind)
    )
    lines += [f"- input: {shape}", "", "## Metrics (validation, checkpoint exported)", ""]
    metrics = manifest.get("metrics") or {}
    lines += [f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in sorted(metrics.items())] or [
        "- none recorded"
    ]
    lines += ["", "## Data", ""]
    if data is None:
        lines.append("- not described in the recipe")
    else:
        lines.append(f"- source: {data.source}")
        lines += [f"- {k}: {Path(v).name}" for k, v in (("train", data.train), ("val", data.val)) if v]
        if data.val is None:
            lines.append(f"- validation: {data.val_split:.0%} held out of the training data (seed {data.split_seed})")
    lines += ["", "## Training", ""]
    backbone = recipe.backbone
    start = "pretrained weights" if backbone.pretrained else "random initialisation"
    lines += [
        f"- backbone: {backbone.source} `{backbone.name}`, from {start}",
        f"- frozen: {', '.join(recipe.freeze) or 'nothing'}; kept trainable: {', '.join(recipe.unfreeze) or '-'}",
        f"- optimizer: {train.optimizer.name}, lr {train.optimizer.lr:g}, weight decay {train.optimizer.weight_decay:g}; "
        f"schedule {train.scheduler.name}; epochs {train.epochs}"
        + (f", max {train.max_steps} steps" if train.max_steps else "")
        + f"; batch {data.batch_size if data else '-'}; precision {train.precision}; seed {train.seed}",
        "",
        "## Provenance",
        "",
    ]
    provenance = [line[2:] for line in recipe_text.splitlines() if line.startswith("# ") and ": " in line]
    lines += [f"- {p}" for p in provenance[1:]] or ["- packed from a bundle without its run's lock file"]
    lines += [f"- bundle formats: {', '.join(sorted(manifest.get('formats') or {})) or 'safetensors'}"]
    lines += [
        "",
        "## Intended use",
        "",
        f"{(recipe.description or 'As described above').rstrip('.')}. It was trained and validated only on the data "
        "listed here: check it on your own data before relying on it, and do not use it for decisions "
        "about people without an assessment of its errors on them.",
        "",
        "## Use",
        "",
        "```bash",
        f"surgery pull <this archive or its URL> --out {recipe.name}",
        f"surgery serve {recipe.name}",
        "```",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- pull


def pull_command(
    source: str,
    out: Path | None,
    *,
    allow_unsigned: bool = False,
    max_size: str | None = None,
    timeout_s: float | None = None,
) -> str:
    """`surgery pull`: returns what to tell the user."""
    max_bytes = parse_size(max_size or os.environ.get(MAX_SIZE_ENV) or "", MAX_TOTAL_BYTES)
    folder, signer = pull(source, out, allow_unsigned=allow_unsigned, max_bytes=max_bytes, timeout_s=timeout_s)
    signed = f"signed by {signer}" if signer else "unsigned"
    return f"pulled {folder} ({signed}); serve it with `surgery serve {folder}`"


def parse_size(text: str, default: int) -> int:
    """`64G`, `500M`, `1.5T` or a number of bytes (binary units); `default` for an empty string."""
    text = text.strip()
    if not text:
        return default
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    number, unit = text.rstrip("KMGTkmgtiBb"), text[len(text.rstrip("KMGTkmgtiBb")) :].upper().rstrip("IB")
    try:
        value = int(float(number) * units[unit])
    except (KeyError, ValueError, OverflowError):
        value = 0
    if value <= 0:
        raise ShareError(f"{text!r}: not a size (say 64G, 500M, or a number of bytes)")
    return value


def pull(
    source: str,
    out: Path | None = None,
    *,
    allow_unsigned: bool = False,
    max_bytes: int = MAX_TOTAL_BYTES,
    timeout_s: float | None = None,
) -> tuple[Path, str | None]:
    """Fetch (path or URL), check and unpack an archive into `out` (default: the archive's name
    without .tar/.tar.gz, in the current folder). Returns the folder and the signer, if signed.
    Everything is written inside that folder, at most `max_bytes` (the download, and what is
    unpacked); a refused or interrupted pull (SIGINT, SIGTERM) leaves nothing behind, and what
    a killed one left in `.incoming` is cleared by the next pull into that folder."""
    remote = is_url(source)
    if not remote and not Path(source).is_file():
        raise ShareError(f"{source}: no such archive")
    folder = Path(out or _default_folder(source)).resolve()
    if folder.exists() and not folder.is_dir():
        raise ShareError(f"{folder} exists already; pull into a new folder with --out")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    with _sigterm_as_interrupt(), _only_puller(folder) as staging:
        try:
            staging.mkdir()
            archive = Path(source)
            if remote:
                archive = staging / "archive"
                fetch_to_file(source, archive, max_bytes, deadline_s=timeout_s or PULL_DEADLINE_S)
            tree = staging / "tree"
            tree.mkdir()
            hashes = extract(archive, tree, max_bytes=max_bytes, top_level=TOP_LEVEL)
            _, signer = check_pack(tree, hashes, source, remote=remote, allow_unsigned=allow_unsigned)
            for item in tree.iterdir():
                os.replace(item, folder / item.name)
            shutil.rmtree(staging)
            return folder, signer
        except BaseException as err:
            shutil.rmtree(folder if created else staging, ignore_errors=True)
            if isinstance(err, KeyboardInterrupt):  # Ctrl-C or SIGTERM; the CLI exits 130 without a word
                print(f"pull interrupted; nothing was kept in {folder}", file=sys.stderr)
            raise


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt while pulling (in the main thread), so that the clean-up
    that follows a refusal or Ctrl-C also follows a `kill`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


@contextlib.contextmanager
def _only_puller(folder: Path) -> Iterator[Path]:
    """Hold `folder` (an flock on it, dropped by the kernel however this process ends) while
    pulling into it; yields its `.incoming` staging folder. A second pull into it is refused; a
    `.incoming` left by a killed pull is removed; anything else in the folder refuses the pull."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ShareError(f"{folder}: another pull is unpacking into it; wait for it, or pull elsewhere") from None
        staging = folder / INCOMING
        if any(p.name != INCOMING for p in folder.iterdir()):
            raise ShareError(f"{folder} exists already; pull into a new folder with --out")
        if staging.exists() or staging.is_symlink():
            print(f"note: removing {staging}, left by an interrupted pull", file=sys.stderr)
            remove_path(staging)
        yield staging
    finally:
        os.close(fd)


def _default_folder(source: str) -> str:
    name = PurePosixPath(source.split("?")[0].rstrip("/")).name
    for suffix in (".tar.gz", ".tgz", ".tar"):
        name = name.removesuffix(suffix)
    return name or "pulled-model"


def check_pack(
    tree: Path, hashes: dict[str, str], source: str, *, remote: bool, allow_unsigned: bool
) -> tuple[dict[str, Any], str | None]:
    """pack.json read and checked against the extracted files: format version, signature (an
    unsigned archive from a URL needs `allow_unsigned`), every file's sha256, nothing extra, and
    the bundle's own manifest."""
    pack_file = tree / PACK_FILE
    if not pack_file.is_file():
        raise ShareError(f"{source}: no {PACK_FILE}; not a surgery pack")
    if pack_file.stat().st_size > MAX_PACK_FILE_BYTES:
        raise ShareError(f"{source}: {PACK_FILE} is over {size_text(MAX_PACK_FILE_BYTES)}; not a pack surgery wrote")
    doc, signer = read_signed_document(
        pack_file.read_bytes(),
        f"{source}: {PACK_FILE}",
        doc_format=PACK_FORMAT,
        doc_version=PACK_FORMAT_VERSION,
        kind="pack",
        remote=remote,
        allow_unsigned=allow_unsigned,
        unsigned="the archive is not signed; refusing it from a URL (--allow-unsigned accepts it)",
        error=ShareError,
    )
    name = doc.get("name")
    files = doc.get("files")
    if not isinstance(name, str) or not name or "/" in name or name.startswith(".") or not isinstance(files, dict):
        raise ShareError(f"{source}: {PACK_FILE} needs a plain `name` and a `files` map")
    present = set(hashes) - {PACK_FILE}
    if present != set(files):
        extra, missing = sorted(present - set(files)), sorted(set(files) - present)
        raise ShareError(f"{source}: files not in {PACK_FILE}: {extra or '-'}; missing: {missing or '-'}; refusing it")
    for rel, info in files.items():
        expected = info.get("sha256") if isinstance(info, dict) else None
        if hashes[rel] != expected:
            raise ShareError(f"{source}: {rel} does not match its sha256 in {PACK_FILE}; refusing the archive")
    # only bundle/ members speak for the bundle: the root's recipe.yaml (a run's lock) is another file
    inside = {k.removeprefix(f"{BUNDLE}/"): v for k, v in hashes.items() if k.startswith(f"{BUNDLE}/")}
    _check_bundle(tree / BUNDLE, inside, source)
    return doc, signer


def _check_bundle(bundle: Path, hashes: dict[str, str], source: str) -> None:
    """The bundle's manifest: a known format version, and every file it lists present with that
    sha256 (hashes from the extraction, so nothing is read twice)."""
    from surgery.bundle import MANIFEST, RECIPE, WEIGHTS, read_manifest

    files = read_manifest(bundle).get("files")
    if not isinstance(files, dict) or WEIGHTS not in files or RECIPE not in files:
        raise ShareError(f"{source}: the bundle's {MANIFEST} does not list {WEIGHTS} and {RECIPE}; refusing it")
    for rel, expected in files.items():
        if hashes.get(rel) != expected:
            raise ShareError(
                f"{source}: bundle/{rel} is missing or does not match the bundle's {MANIFEST}; refusing it"
            )


__all__ = [
    "ShareError",
    "check_pack",
    "extract",
    "model_card",
    "pack",
    "pack_command",
    "parse_size",
    "pull",
    "pull_command",
]
