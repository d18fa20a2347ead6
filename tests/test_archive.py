"""`pull` against hostile archives, generated here (small, so the suite takes seconds): bombs past
a lowered limit, truncated and damaged archives, members that would collide with the staging
folder, pickles and torch zips under any name, lying safetensors headers, huge tar headers,
pack.json documents that used to be internal errors; and interrupted pulls, which leave nothing
behind and never block the next one."""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import http.server
import io
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from surgery.errors import SurgeryError
from surgery.share import pull, pull_command

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SURGERY_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.chdir(tmp_path)


def make_tar(path: Path, members: dict[str, bytes], extra: list[tarfile.TarInfo] = ()) -> Path:
    mode = "w:gz" if path.name.endswith(".gz") else "w"
    with tarfile.open(path, mode, format=tarfile.GNU_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size))
    return path


def refused(archive: Path, tmp_path: Path, match: str, **limits: int) -> str:
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SurgeryError, match=match) as err:
        pull(str(archive), tmp_path / "target", **limits)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written anywhere
    assert "\n" not in str(err.value)
    return str(err.value)


def safetensors_with(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


# --------------------------------------------------------------------------- bombs


def test_a_bomb_past_the_total_limit_is_refused(tmp_path: Path) -> None:
    zeros = b"\0" * (3 << 20)  # 6 MiB that gzip makes a few KiB
    bomb = make_tar(tmp_path / "bomb.tar.gz", {"bundle/a.onnx": zeros, "bundle/b.onnx": zeros})
    assert bomb.stat().st_size < 64 << 10
    refused(
        bomb, tmp_path, r"more than 4 MiB in all; refusing the archive \(`surgery pull --max-size`", max_bytes=4 << 20
    )


def test_the_limit_is_set_by_option_or_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = make_tar(tmp_path / "bomb.tar.gz", {"bundle/a.onnx": b"\0" * (3 << 20)})
    with pytest.raises(SurgeryError, match="more than 2 MiB in all"):
        pull_command(str(bomb), tmp_path / "a", max_size="2M")
    monkeypatch.setenv("SURGERY_PULL_MAX_SIZE", "1.5MiB")
    with pytest.raises(SurgeryError, match=r"more than 1\.5 MiB in all"):
        pull_command(str(bomb), tmp_path / "b")
    with pytest.raises(SurgeryError, match="not a size"):
        pull_command(str(bomb), tmp_path / "c", max_size="lots")


def test_a_huge_tar_long_name_header_is_refused_before_it_is_read(tmp_path: Path) -> None:
    archive = make_tar(tmp_path / "long.tar.gz", {"bundle/" + "a" * (2 << 20): b"x"})
    refused(archive, tmp_path, "extended header")


# --------------------------------------------------------------------------- damaged archives and odd members


def test_a_truncated_archive_is_one_line_not_aborted(tmp_path: Path) -> None:
    text = bytes(random.Random(0).choices(b"xyz \n", k=400_000))
    whole = make_tar(tmp_path / "whole.tar.gz", {"README.md": text}).read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    refused(cut, tmp_path, "damaged or truncated archive")
    done = subprocess.run(
        [sys.executable, "-m", "cli", "pull", str(cut)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "truncated" in done.stderr, done.stderr


@pytest.mark.parametrize("name", [".incoming/tree/x", "other/file.txt", "notes.txt"])
def test_members_outside_a_packs_layout_are_refused(tmp_path: Path, name: str) -> None:
    refused(make_tar(tmp_path / "x.tar", {name: b"hello"}), tmp_path, "is not part of a pack")


# --------------------------------------------------------------------------- pickles by content


def _torch_zip() -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("protocol", [0, 1, 2, 5])
@pytest.mark.parametrize("name", ["bundle/model.safetensors", "bundle/notes.txt", "README.md"])
def test_pickles_of_any_protocol_are_refused_under_any_name(tmp_path: Path, protocol: int, name: str) -> None:
    data = pickle.dumps({"weights": list(range(10))}, protocol=protocol)
    refused(make_tar(tmp_path / "x.tar", {name: data}), tmp_path, "is a pickle|is not a safetensors file")


@pytest.mark.parametrize("name", ["bundle/model.safetensors", "bundle/tokenizer/vocab.json"])
def test_a_torch_save_zip_is_refused_under_any_name(tmp_path: Path, name: str) -> None:
    refused(make_tar(tmp_path / "x.tar", {name: _torch_zip()}), tmp_path, "zip archive|not a safetensors file")


def test_a_safetensors_header_claiming_1e12_elements_is_refused(tmp_path: Path) -> None:
    header = {"w": {"dtype": "F32", "shape": [10**12], "data_offsets": [0, 4 * 10**12]}}
    archive = make_tar(tmp_path / "x.tar", {"bundle/model.safetensors": safetensors_with(header, b"\0" * 64)})
    refused(archive, tmp_path, r"is not a safetensors file \(its tensors cover 4000000000000 bytes")


# --------------------------------------------------------------------------- pack.json documents


@pytest.mark.parametrize(
    ("pack_json", "match"),
    [
        (b'{"format": "surgery-pack", "x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", "nested too deeply"),
        (b'{"format": "surgery-pack", "format_version": 1, "name": "\\udc80", "files": {}}', "lone surrogate"),
    ],
)
def test_hostile_pack_json_is_a_one_line_refusal(tmp_path: Path, pack_json: bytes, match: str) -> None:
    refused(make_tar(tmp_path / "x.tar", {"pack.json": pack_json}), tmp_path, match)


# --------------------------------------------------------------------------- interrupted pulls


def test_a_leftover_incoming_does_not_block_the_next_pull(tmp_path: Path, capsys) -> None:
    (tmp_path / "target" / ".incoming" / "tree").mkdir(parents=True)  # what a SIGKILLed pull leaves
    (tmp_path / "target" / ".incoming" / "tree" / "half.onnx").write_bytes(b"\0" * 100)
    with pytest.raises(SurgeryError, match=r"no pack\.json"):  # got as far as reading the archive
        pull(str(make_tar(tmp_path / "x.tar", {"README.md": b"hi"})), tmp_path / "target")
    assert "left by an interrupted pull" in capsys.readouterr().err
    assert not (tmp_path / "target" / ".incoming").exists()


def test_a_second_pull_into_the_same_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "target").mkdir()
    fd = os.open(tmp_path / "target", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a pull in progress holds it
        with pytest.raises(SurgeryError, match="another pull is unpacking into it"):
            pull(str(make_tar(tmp_path / "x.tar", {"README.md": b"hi"})), tmp_path / "target")
    finally:
        os.close(fd)


@pytest.fixture
def trickling_url(tmp_path: Path):
    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with contextlib.suppress(OSError):
                self.send_response(200)
                self.send_header("Content-Length", str(1 << 30))
                self.end_headers()
                for _ in range(600):
                    self.wfile.write(gzip.compress(b"\0" * 65536)[:4096])
                    time.sleep(0.05)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/m.tar.gz"
    httpd.shutdown()
    httpd.server_close()


def test_sigterm_during_a_pull_leaves_nothing_behind(tmp_path: Path, trickling_url: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "pull", trickling_url, "--out", "m", "--allow-unsigned"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        deadline = time.monotonic() + 60
        archive = tmp_path / "m" / ".incoming" / "archive"
        while not (archive.is_file() and archive.stat().st_size > 0):
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "pull interrupted; nothing was kept" in err
    assert not (tmp_path / "m").exists()
