"""``<root>/LOCK``: at most one live process writes a WAL directory.

An exclusive ``flock`` on the file; the holder's pid is written into it for error messages.
The kernel drops the lock when the holder dies, so a crash never leaves the directory locked.
"""

from __future__ import annotations

import fcntl
import os
from typing import Optional, Tuple

from ..errors import WalLockedError, io_error

LOCK_FILE = "LOCK"


#: what a holder writes after its pid: "wal" for an engine Wal (and the CLI's repairs),
#: "coordinator" for a sharded WAL's coordinator
ROLES = ("wal", "coordinator")


_ROLE_NAMES = {"wal": " (a plain Wal, or a repair)", "coordinator": " (a sharded WAL's coordinator)"}


class RootLock:
    def __init__(self, root: str, role: str = "wal") -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        self.path = os.path.join(root, LOCK_FILE)
        self.role = role
        self._fd: Optional[int] = None

    def acquire(self) -> "RootLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder, role = _read_owner(fd)
            os.close(fd)
            who = (f"process {holder}" if holder else "another process") + _ROLE_NAMES.get(role, "")
            raise WalLockedError(
                f"{os.path.dirname(self.path)} is already open by {who} (it holds {self.path})"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {self.role}\n".encode(), 0)
        except OSError as exc:  # (a full disk: not held, and the flock goes with the descriptor)
            os.close(fd)
            raise io_error(exc, self.path, "writing the holder's pid to") from exc
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

    def close_in_child(self) -> None:
        """In a forked child: close this process's copy of the descriptor, leaving the file and
        the flock (which the parent's descriptor keeps) to the parent."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError:
                pass

    @property
    def held(self) -> bool:
        return self._fd is not None


def lock_holder(root: str) -> Optional[int]:
    """The pid holding ``root``'s lock (-1 if it did not say), or None when nobody does."""
    owner = lock_owner(root)
    return None if owner is None else owner[0]


def lock_owner(root: str) -> Optional[Tuple[int, str]]:
    """(pid, role) of the holder of ``root``'s lock (-1 and "" where it did not say), or None."""
    path = os.path.join(root, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, role = _read_owner(fd)
            return pid or -1, role
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_owner(fd: int) -> Tuple[Optional[int], str]:
    """(pid, role) as the holder wrote them; (None, "") for what cannot be read."""
    try:
        fields = os.pread(fd, 64, 0).decode().split()
        pid = int(fields[0]) if fields else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None, ""
    role = fields[1] if len(fields) > 1 and fields[1] in ROLES else ""
    return pid, role
