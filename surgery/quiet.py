"""Library noise kept out of the terminal: what Ray's and torch elastic's machinery prints (gRPC
retries, elastic agent warnings, worker tracebacks the launcher reports anyway) goes to a log
file, so what a user sees of a failure is surgery's one line, and of a run its progress.

Ray's core and gRPC log from C++ straight to file descriptor 2, below Python's `sys.stderr`, so
the descriptors themselves are redirected, not just Python's streams."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
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
    own actors (the Train controller, the placement-group cleaner) stay in the log, and so does
    whatever they print after the run, until Ray disconnects.

    Needs the driver connected with `log_to_driver=True`. The handler takes the place (and name)
    of Ray's own printing hook in its private stream dispatcher, so `ray.shutdown()` removes it as
    it would Ray's; without that dispatcher this changes nothing."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        yield
        return
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    hook = "ray_print_logs"  # Ray's name for it: removed by `ray.shutdown()`

    def handler(terminal: bool) -> Callable[[dict], None]:
        def handle(data: dict) -> None:
            name = data.get("actor_name") or data.get("task_name") or ""
            lines = [str(line) for line in data.get("lines", [])]
            with open(log, "a", encoding="utf-8", errors="replace") as file:
                file.write("".join(f"({name} pid={data.get('pid')}) {line}\n" for line in lines))
            if terminal and name == show and lines:
                sink = sys.stderr if data.get("is_err") else sys.stdout
                sink.write("".join(f"{line}\n" for line in lines))
                sink.flush()

        return handle

    def install(handle: Callable[[dict], None]) -> None:
        with dispatcher._lock:
            if any(name == hook for name, _ in dispatcher.handlers):  # only where Ray prints workers' output
                dispatcher.handlers = [pair for pair in dispatcher.handlers if pair[0] != hook] + [(hook, handle)]

    install(handler(terminal=True))
    try:
        yield
    finally:
        install(handler(terminal=False))


@contextlib.contextmanager
def loggers_to(log: Path, names: Sequence[str]) -> Iterator[Path]:
    """For the duration, the Python loggers `names` (and their children) write to `log` instead
    of the terminal: torch elastic's agent and torch.multiprocessing report a failed worker in
    warnings and a traceback, before the launcher's own one-line error says the same."""
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log, encoding="utf-8", delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = []
    for name in names:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate, logger.level))
        logger.handlers = [handler]
        logger.propagate = False
        logger.setLevel(logging.WARNING)
    try:
        yield log
    finally:
        for logger, handlers, propagate, level in saved:
            logger.handlers, logger.propagate = handlers, propagate
            logger.setLevel(level)
        handler.close()
