"""``<root>/LOCK``: at most one live process writes a WAL directory.

An exclusive ``flock`` on the file; the holder's pid is written into it for error messages.
The kernel drops the lock when the holder dies, so a crash never leaves the directory locked.
"""

from __future__ import annotations

import fcntl
import os
from typing import Optional

from ..errors import WalLockedError

LOCK_FILE = "LOCK"


class RootLock:
    def __init__(self, root: str) -> None:
        self.path = os.path.join(root, LOCK_FILE)
        self._fd: Optional[int] = None

    def acquire(self) -> "RootLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"process {holder}" if holder else "another process"
            raise WalLockedError(
                f"{os.path.dirname(self.path)} is already open by {who} (it holds {self.path})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
            os.close(fd)  # closing drops the flock

    @property
    def held(self) -> bool:
        return self._fd is not None


def lock_holder(root: str) -> Optional[int]:
    """The pid holding ``root``'s lock, or None when nobody does."""
    path = os.path.join(root, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd) or -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_pid(fd: int) -> Optional[int]:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None
