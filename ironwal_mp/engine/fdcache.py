"""A bounded LRU of open segment files, shared by every stream of a Wal.

At most ``capacity`` descriptors are open at once, whatever the number of streams. A caller
*pins* a file while it uses it (a write, a read, an fsync), so eviction never closes a
descriptor under someone; when every slot is pinned a new request waits for a release.
"""

from __future__ import annotations

import mmap
import os
import sys
import threading
from collections import OrderedDict
from typing import Dict, Optional, Tuple

from ..errors import WalClosedError

Key = Tuple[str, bool]  # (path, writable)


#: before Python 3.13 a map keeps a duplicate of its descriptor open (README: MMAP holds up to
#: two descriptors per cached segment); from 3.13 it need not
_NO_FD_COPY = {"trackfd": False} if sys.version_info >= (3, 13) else {}


class OpenFile:
    """One open descriptor; optionally a read-only memory map of it."""

    __slots__ = ("key", "fd", "pins", "_map")

    def __init__(self, key: Key, fd: int) -> None:
        self.key = key
        self.fd = fd
        self.pins = 0
        self._map: Optional[mmap.mmap] = None

    def mapping(self, needed: int) -> mmap.mmap:
        """A map covering at least ``needed`` bytes, remapped if the file grew."""
        current = self._map
        if current is not None and len(current) >= needed:
            return current
        size = os.fstat(self.fd).st_size
        if size < needed or size == 0:
            raise EOFError(f"{self.key[0]} holds {size} bytes, {needed} needed")
        # an older, shorter map stays valid for whoever still holds it; GC unmaps it
        self._map = mmap.mmap(self.fd, size, access=mmap.ACCESS_READ, **_NO_FD_COPY)
        return self._map

    def close(self) -> None:
        self._map = None
        os.close(self.fd)


class FdCache:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._files: "OrderedDict[Key, OpenFile]" = OrderedDict()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._waiting = 0  # threads blocked for a free slot
        self._closed = False
        self.opens = 0  # descriptors opened over the cache's life (for tests and stats)

    def __len__(self) -> int:
        return len(self._files)

    def acquire(self, path: str, writable: bool = False) -> OpenFile:
        """Pin and return the open file for ``path``, opening it (append mode if writable)."""
        key = (path, writable)
        with self._lock:
            while True:
                if self._closed:
                    # (an iteration that outlived its handle's close() reaches this)
                    raise WalClosedError("the log's segment files are closed: its handle was closed")
                entry = self._files.get(key)
                if entry is not None:
                    entry.pins += 1
                    self._files.move_to_end(key)
                    return entry
                if len(self._files) < self.capacity or self._evict_one():
                    break
                self._waiting += 1
                try:
                    self._cond.wait()
                finally:
                    self._waiting -= 1
            # (never O_CREAT: segments are created on purpose; a late sync must not bring back
            # one that truncation has just deleted)
            # (O_NONBLOCK: no effect on a regular file; a FIFO placed under a segment's name
            # reads as empty instead of waiting for a writer)
            flags = os.O_RDWR | os.O_APPEND if writable else os.O_RDONLY | os.O_NONBLOCK
            fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o644)
            self.opens += 1
            entry = OpenFile(key, fd)
            entry.pins = 1
            self._files[key] = entry
            return entry

    def release(self, entry: OpenFile) -> None:
        with self._lock:
            entry.pins -= 1
            if entry.pins == 0:
                if self._files.get(entry.key) is not entry:  # forgotten while pinned
                    entry.close()
                if self._waiting:
                    self._cond.notify()

    def forget(self, path: str) -> None:
        """Close (or, if pinned, close on release) every descriptor of ``path``."""
        with self._cond:
            for key in ((path, False), (path, True)):
                entry = self._files.pop(key, None)
                if entry is not None and entry.pins == 0:
                    entry.close()
            self._cond.notify_all()

    def close_all(self) -> None:
        with self._cond:
            self._closed = True
            for entry in self._files.values():
                if entry.pins == 0:
                    entry.close()
            self._files.clear()
            self._cond.notify_all()

    def abandon(self) -> None:
        """Close every descriptor without taking the lock (in a forked child, where a thread
        that held it in the parent does not exist); the cache is unusable afterwards."""
        self._closed = True
        for entry in list(self._files.values()):
            try:
                entry.close()
            except OSError:
                pass
        self._files = OrderedDict()

    def _evict_one(self) -> bool:
        for key, entry in self._files.items():  # oldest first
            if entry.pins == 0:
                del self._files[key]
                entry.close()
                return True
        return False

    def open_paths(self) -> Dict[Key, int]:
        with self._cond:
            return {key: entry.pins for key, entry in self._files.items()}
