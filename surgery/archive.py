"""Unpacking an archive nobody vouches for yet (`surgery pull`): member by member, each checked
before and while it is written. Only regular files and folders at plain relative paths under an
allowed top-level name; no links, devices, absolute paths or `..`; no pickles, by suffix and by
content (any protocol, and zip archives such as `torch.save` writes); safetensors files only with
a header that describes exactly their bytes; members, the total written and tar's own long-name
headers bounded; damaged or truncated archives refused. Every failure is one `ShareError` line.
No torch.
"""

from __future__ import annotations

import errno
import hashlib
import io
import lzma
import os
import tarfile
import zlib
from collections.abc import Collection
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from surgery.content import MAX_HEADER_BYTES, check_safetensors, refusal
from surgery.errors import SurgeryError
from surgery.files import free_bytes, human_bytes

PICKLE_SUFFIXES = {".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".bin", ".joblib", ".ts", ".pt2", ".npz"}
MAX_MEMBERS = 10_000
MAX_MEMBER_BYTES = 16 << 30
MAX_TAR_HEADER_BYTES = 1 << 20  # a GNU long name or a pax header, which tarfile reads into memory
_CHUNK = 1 << 20
_BROKEN = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError)  # what damaged or truncated archives raise


class ShareError(SurgeryError):
    """An archive that cannot be packed, or that is refused when pulled."""


def size_text(n: int) -> str:
    return f"{n / 2**30:g} GiB" if n >= 1 << 30 else f"{n / 2**20:g} MiB" if n >= 1 << 20 else f"{n} bytes"


def _refuse(where: str, member: str, why: str) -> ShareError:
    return ShareError(f"{where}: member {member[:200]!r} {why}; refusing the archive")


class _BoundedTarInfo(tarfile.TarInfo):
    """Refuses long-name and pax headers over MAX_TAR_HEADER_BYTES before tarfile reads them whole."""

    def _proc_member(self, tar: tarfile.TarFile) -> Any:
        extended = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE)
        if self.type in extended and self.size > MAX_TAR_HEADER_BYTES:
            raise tarfile.ReadError(f"a {self.size}-byte extended header (over {size_text(MAX_TAR_HEADER_BYTES)})")
        return super()._proc_member(tar)  # type: ignore[misc]


def extract(archive: Path, into: Path, *, max_bytes: int, top_level: Collection[str]) -> dict[str, str]:
    """Extract a tar archive (plain or compressed) into `into`, member by member, refusing
    anything but plain files and folders at plain relative paths under one of `top_level`,
    pickles and zips, bad safetensors, and members or a total over the limits (`max_bytes` in
    all). Returns the sha256 of every file, computed while it was written."""
    where = str(archive)
    try:
        tar = tarfile.open(archive, _read_mode(archive), tarinfo=_BoundedTarInfo)  # noqa: SIM115 (closed by `with tar:`)
    except (*_BROKEN, OSError) as err:
        raise ShareError(f"{where}: not a tar archive ({' '.join(str(err).split())})") from None
    seen: set[str] = set()
    hashes: dict[str, str] = {}
    total = 0
    with tar:
        try:
            for count, member in enumerate(tar, 1):
                if count > MAX_MEMBERS:
                    raise ShareError(f"{where}: more than {MAX_MEMBERS} members; refusing the archive")
                rel = member_path(member, where, top_level)
                if rel.as_posix() in seen:
                    raise _refuse(where, member.name, "appears twice")
                seen.add(rel.as_posix())
                target = into.joinpath(*rel.parts)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                total += member.size
                if total > max_bytes:
                    raise ShareError(
                        f"{where}: more than {size_text(max_bytes)} in all; refusing the archive "
                        "(`surgery pull --max-size` raises the limit)"
                    )
                target.parent.mkdir(parents=True, exist_ok=True)
                stream = tar.extractfile(member)
                if stream is None:
                    raise _refuse(where, member.name, "has no content")
                hashes[rel.as_posix()] = _copy_member(stream, target, member, where)
        except _BROKEN as err:
            raise ShareError(f"{where}: damaged or truncated archive ({err or type(err).__name__})") from None
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ShareError(
                    f"{where}: no space left on the device holding {into} "
                    f"({human_bytes(free_bytes(into))} free); nothing was kept"
                ) from None
            # e.g. a member that is a file and also a folder of other members, or a bad gzip stream
            raise ShareError(f"{where}: cannot unpack it ({err.strerror or err}); refusing the archive") from None
    return hashes


def _read_mode(archive: Path) -> str:
    """tarfile's mode for the archive's compression, told by its first bytes (so that a damaged
    archive is reported by the one reader it is meant for)."""
    with Path(archive).open("rb") as f:
        magic = f.read(6)
    for prefix, mode in ((b"\x1f\x8b", "r:gz"), (b"BZh", "r:bz2"), (b"\xfd7zXZ\x00", "r:xz")):
        if magic.startswith(prefix):
            return mode
    return "r:"


def member_path(member: tarfile.TarInfo, where: str, top_level: Collection[str]) -> PurePosixPath:
    """The member's path, refused unless it is a plain file or folder at a plain relative path
    under an allowed top-level name, and not a pickle by its suffix or too large."""
    name = member.name
    if member.issym() or member.islnk():
        raise _refuse(where, name, "is a link")
    if member.ischr() or member.isblk() or member.isfifo() or member.isdev():
        raise _refuse(where, name, "is a device or fifo")
    if not (member.isfile() or member.isdir()):
        raise _refuse(where, name, "is not a regular file or folder")
    path = PurePosixPath(name)
    if not name or "\\" in name or path.is_absolute() or ".." in path.parts or name.startswith("~"):
        raise _refuse(where, name, "has an absolute path or `..`")
    parts = [p for p in path.parts if p != "."]
    if not parts:
        raise _refuse(where, name, "has an empty path")
    if parts[0] not in top_level:
        raise _refuse(where, name, f"is not part of a pack (only {', '.join(sorted(top_level))} are)")
    if member.isfile() and path.suffix.lower() in PICKLE_SUFFIXES:
        raise _refuse(where, name, "is a pickle-based file (only safetensors, ONNX, JSON and text are accepted)")
    if member.size > MAX_MEMBER_BYTES:
        raise _refuse(where, name, f"is over the {size_text(MAX_MEMBER_BYTES)} limit")
    return PurePosixPath(*parts)


def _head(stream: BinaryIO, member: tarfile.TarInfo, where: str) -> bytes:
    """The member's first bytes, enough to judge its content: a safetensors header whole (checked
    here, bounded), else the first chunk."""
    first = stream.read(_CHUNK)
    if not member.name.lower().endswith(".safetensors"):
        why = refusal(first)
        if why:
            raise _refuse(where, member.name, why)
        return first
    need = 8 + int.from_bytes(first[:8].ljust(8, b"\0"), "little")
    head = first
    if len(first) < need <= 8 + MAX_HEADER_BYTES:
        head += stream.read(need - len(first))
    try:
        check_safetensors(io.BytesIO(head), member.size)
    except ValueError as err:
        raise _refuse(where, member.name, f"is not a safetensors file ({err})") from None
    return head


def _copy_member(stream: BinaryIO, target: Path, member: tarfile.TarInfo, where: str) -> str:
    digest = hashlib.sha256()
    chunk = _head(stream, member, where)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        written = 0
        while chunk:
            written += len(chunk)
            if written > member.size:
                raise _refuse(where, member.name, "is longer than its header says")
            f.write(chunk)
            digest.update(chunk)
            chunk = stream.read(_CHUNK)
    if written < member.size:
        raise _refuse(where, member.name, "is shorter than its header says (a truncated archive?)")
    return digest.hexdigest()


__all__ = ["MAX_MEMBERS", "MAX_MEMBER_BYTES", "PICKLE_SUFFIXES", "ShareError", "extract", "member_path", "size_text"]
