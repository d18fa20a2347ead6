"""Replicas on one machine sharing its cores: which forward may use them all."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class CoreClaim:
    """Replicas on one machine share its cores. A forward may use more torch threads than its
    replica's share only while no other replica on the machine is running one, or the two would
    fight over the same cores. Every forward takes a shared `flock` on one per-user file; a forward
    that wants the whole machine takes it exclusively, without waiting, or makes do with its share."""

    def __init__(self, path: Path | None = None) -> None:
        path = path or Path(tempfile.gettempdir()) / f"surgery-cores-{os.getuid()}.lock"
        try:
            import fcntl

            self._flock = fcntl.flock
            self._modes = (fcntl.LOCK_EX | fcntl.LOCK_NB, fcntl.LOCK_SH | fcntl.LOCK_NB, fcntl.LOCK_UN)
            self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        except (ImportError, OSError):  # no flock here: never take more than the replica's share
            self._fd = None

    @contextmanager
    def claim(self, whole: bool) -> Iterator[bool]:
        """Hold the claim for one forward; yields True when this forward has the machine alone."""
        if self._fd is None:
            yield False
            return
        exclusive, shared, unlock = self._modes
        held = alone = False
        for mode, gives_whole in ((exclusive, True), (shared, False)) if whole else ((shared, False),):
            try:
                self._flock(self._fd, mode)
            except OSError:  # held the other way by another replica: carry on without it
                continue
            held, alone = True, gives_whole
            break
        try:
            yield alone
        finally:
            if held:
                self._flock(self._fd, unlock)

    @contextmanager
    def whole_machine(self, wait_s: float) -> Iterator[bool]:
        """Hold the machine exclusively (another replica's `whole_machine` waits, its forwards keep
        to their share), waiting up to `wait_s` for it; yields whether it is held."""
        if self._fd is None:
            yield False
            return
        exclusive, _, unlock = self._modes
        deadline = time.monotonic() + wait_s
        held = False
        while not held:
            try:
                self._flock(self._fd, exclusive)
                held = True
            except OSError:
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.01)
        try:
            yield held
        finally:
            if held:
                self._flock(self._fd, unlock)
