"""Library noise kept out of the terminal: what Ray's and torch elastic's machinery prints (gRPC
retries, elastic agent warnings, worker tracebacks the launcher reports anyway) goes to a log
file, so what a user sees of a failure is surgery's one line, and of a run its progress.

Ray's core and gRPC log from C++ straight to file descriptor 2, below Python's `sys.stderr`, so
the descriptors themselves are redirected, not just Python's streams."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

RAY_LOG = "ray.log"  # <run>/ray.log: Ray's output for a Ray Train run
ELASTIC_LOG = "elastic.log"  # <run>/elastic.log: torch elastic's output for local ddp processes


@contextlib.contextmanager
def noise_to(log: Path, *, stdout: bool = True) -> Iterator[Path]:
    """For the duration, this process's stderr (and stdout unless `stdout=False`), C++ output
    included, is appended to `log` instead of the terminal."""
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    fds = (1, 2) if stdout else (2,)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = {fd: os.dup(fd) for fd in fds}
    target = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for fd in fds:
            os.dup2(target, fd)
        yield log
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        os.close(target)


@contextlib.contextmanager
def ray_worker_output(log: Path, *, show: str) -> Iterator[None]:
    """While a Ray job runs from this driver: every line its workers print is appended to `log`
    (with the actor and pid Ray prefixes), and the lines of the actors named `show` (the training
    workers, whose rank 0 prints the progress) also reach the terminal, once and as printed. Ray's
    own actors (the Train controller, the placement-group cleaner) stay in the log.

    Needs the driver connected with `log_to_driver=True`; Ray's private stream dispatcher is
    where its own printing hooks in, so without it this changes nothing."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        yield
        return
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    ours = "surgery_worker_output"
    with open(log, "a", encoding="utf-8", errors="replace") as file:

        def handle(data: dict) -> None:
            name = data.get("actor_name") or data.get("task_name") or ""
            lines = [str(line) for line in data.get("lines", [])]
            file.write("".join(f"({name} pid={data.get('pid')}) {line}\n" for line in lines))
            file.flush()
            if name == show and lines:
                sink = sys.stderr if data.get("is_err") else sys.stdout
                sink.write("".join(f"{line}\n" for line in lines))
                sink.flush()

        with dispatcher._lock:
            saved = list(dispatcher.handlers)
            dispatcher.handlers = [pair for pair in saved if pair[0] != "ray_print_logs"] + [(ours, handle)]
        try:
            yield
        finally:
            with dispatcher._lock:
                dispatcher.handlers = [pair for pair in dispatcher.handlers if pair[0] != ours]
                dispatcher.handlers += [pair for pair in saved if pair[0] == "ray_print_logs"]
