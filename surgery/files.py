"""File integrity and durability, shared by weights pinning, checkpoints and bundles: sha256 of a
file, fsync of files, folders and whole trees (the half of an atomic write that makes the rename
that follows it safe), and what a full disk does to a write (temporary files removed, one line
naming the path and the space needed). No torch."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from surgery.errors import SurgeryError

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_path(path: str | Path) -> None:
    """Flush a file, or a folder's entries, to disk. Folders on filesystems that refuse it are
    skipped: the rename is then as durable as that filesystem makes it."""
    is_dir = os.path.isdir(path)
    with contextlib.suppress(OSError) if is_dir else contextlib.nullcontext():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and folder under `root` (and `root` itself)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fsync_path(os.path.join(dirpath, name))
        fsync_path(dirpath)


# --------------------------------------------------------------------------- full disks

# What C++ writers say when the disk fills up under them: torch.save (PytorchStreamWriter) reports
# only "file write failed", safetensors passes the OS message on.
_WRITE_FAILED = ("No space left on device", "Disk quota exceeded", "file write failed", "failed writing file")


def free_bytes(path: str | Path) -> int:
    """Free bytes on the filesystem holding `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def is_disk_full(exc: BaseException, path: str | Path, needed: int = 0) -> bool:
    """Whether `exc`, raised while writing under `path`, means the disk (or quota) is full."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not any(text in str(exc) for text in _WRITE_FAILED):
        return False
    return "No space" in str(exc) or "quota" in str(exc) or free_bytes(path) < max(needed, 1 << 20)


def human_bytes(n: float) -> str:
    """1536 → '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def disk_full_error(path: str | Path, needed: int | None) -> SurgeryError:
    """The one line a full disk gets: where, how much was needed, how much is free."""
    need = f"it needs about {human_bytes(needed)}, " if needed else ""
    return SurgeryError(
        f"no space left on the device holding {path}: {need}{human_bytes(free_bytes(path))} is free; "
        "free some space (or point --runs elsewhere), then resume with --resume"
    )


def check_free_space(path: str | Path, needed: int) -> None:
    """Refuse to start writing `needed` bytes under `path` where they cannot fit."""
    if free_bytes(path) < needed:
        raise disk_full_error(path, needed)


def remove_path(path: str | Path) -> None:
    """Remove a file or folder if it exists (temporary leftovers of a failed write)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def temporary_until_renamed(tmp: str | Path, final: str | Path, needed: int = 0) -> Iterator[Path]:
    """The write half of an atomic write: whatever goes wrong inside the block, `tmp` is removed,
    and a full disk becomes one line naming `final` and the space needed."""
    try:
        yield Path(tmp)
    except BaseException as exc:
        remove_path(tmp)
        if isinstance(exc, Exception) and is_disk_full(exc, Path(final).parent, needed):
            raise disk_full_error(final, needed or None) from None
        raise


def write_json_atomic(path: str | Path, data: Any, *, sort_keys: bool = False, indent: int | None = 2) -> None:
    """Write `data` as JSON to `path` so that a reader sees the old file or the new one, never a
    torn one: a temporary sibling (named for this process), fsynced, renamed, the folder fsynced.
    Values JSON cannot hold are written as their `str`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with temporary_until_renamed(tmp, path):
        tmp.write_text(json.dumps(data, indent=indent, sort_keys=sort_keys, default=str) + "\n", encoding="utf-8")
        fsync_path(tmp)
        os.replace(tmp, path)
    fsync_path(path.parent)
