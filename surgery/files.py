"""File integrity and durability, shared by weights pinning, checkpoints and bundles: sha256 of a
file, and fsync of files, folders and whole trees (the half of an atomic write that makes the
rename that follows it safe). No torch."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

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
