"""Make several streams durable at once.

fdatasync makes one file durable and, on ext4 and most journalling filesystems, costs a journal
commit each; even when issued from parallel threads the commits barely batch (16 files take
about 8 single fdatasyncs on the reference disk). ``syncfs(2)`` writes back every dirty file of
one filesystem and commits the journal once, so a shard worker, a checkpoint prepare or
``Wal.sync()`` with many streams due pays about one commit instead of one per file, and a
checkpoint's commit (record, ``HEAD``, rename: :func:`sync_files`) one instead of three.

The price: syncfs also writes back *other* programs' dirty data on that filesystem. On a
filesystem shared with heavy writers choose ``GroupSync.FDATASYNC``. One stream is always
fdatasynced (that is cheaper than a syncfs). Errors stay exact: if a syncfs fails, each of its
streams is fdatasynced on its own, and only a stream whose own file fails is reported failed
(every open file keeps its own record of writeback errors, which a syncfs does not consume).
Linux reports writeback errors from syncfs only since 5.8, so older kernels never use it; nor
does any filesystem outside ``SYNCFS_FILESYSTEMS`` (a network or FUSE one may only write back
to its server). A descriptor opened on a filesystem misses errors other processes have already
seen, so the group sync that opens it is per file.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import sys
import threading
from concurrent.futures import Executor
from contextlib import ExitStack
from typing import Callable, Dict, List, Optional, Sequence

from ..errors import WalError
from ..options import GroupSync
from .stream import Stream


def _load_syncfs() -> Optional[Callable[[int], int]]:
    """libc's syncfs, or None where there is none (not Linux, or an old C library)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _reports_errors(release: str) -> bool:
    """Whether a Linux kernel of this release reports writeback errors from syncfs (5.8+)."""
    try:
        major, minor = (int(part) for part in release.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (5, 8)


#: None where syncfs cannot be trusted to report errors: then every sync is per file
_syncfs = _load_syncfs() if _reports_errors(os.uname().release) else None


def syncfs(fd: int) -> None:
    """syncfs(2) of the filesystem holding ``fd``; OSError on failure (ENOSYS where absent).

    Writeback errors are reported by Linux 5.8 and later; older kernels return success.
    """
    if _syncfs is None:
        raise OSError(errno.ENOSYS, "syncfs is not available here")
    if _syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


#: errors that mean syncfs cannot be used at all here (then every sync is per file)
_UNSUPPORTED = {errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF, errno.EPERM}

#: local filesystems whose syncfs ends with the same cache flush as an fdatasync. Network and
#: FUSE filesystems (sshfs, SMB, 9p...) may only write back to their server and return 0, so
#: they, and anything not listed, get per-file fdatasyncs.
SYNCFS_FILESYSTEMS = frozenset({"ext4", "ext3", "xfs", "btrfs"})


def filesystem_type(dev: int, mountinfo: str = "/proc/self/mountinfo") -> Optional[str]:
    """The type of the filesystem mounted from device ``dev`` (an ``st_dev``), or None."""
    want = f"{os.major(dev)}:{os.minor(dev)}"
    try:
        with open(mountinfo) as fh:
            for line in fh:
                left, sep, right = line.partition(" - ")
                fields = left.split()
                if sep and len(fields) > 2 and fields[2] == want:
                    return right.split()[0] if right.split() else None
    except OSError:
        pass
    return None


def syncfs_device(path: str) -> Optional[int]:
    """The device (``st_dev``) of ``path`` if one syncfs may stand for fsyncs of files there:
    the kernel reports syncfs errors and the filesystem is in ``SYNCFS_FILESYSTEMS``. Else None
    (also when ``path`` does not exist)."""
    if _syncfs is None:
        return None
    try:
        dev = os.stat(path).st_dev
    except OSError:
        return None
    return dev if filesystem_type(dev) in SYNCFS_FILESYSTEMS else None


def sync_files(fds: Sequence[int], dir_fd: int, use_syncfs: bool) -> None:
    """Make the files ``fds`` and the entries of the directory ``dir_fd`` durable together.

    With ``use_syncfs``, one syncfs of their filesystem; if it fails (a writeback error of any
    file there), or without it, an fdatasync per file and an fsync of the directory, so that an
    error raised is one of these files'. Every descriptor must have been opened before the data
    it stands for was written (a descriptor is told only of writeback errors after its opening).
    """
    if use_syncfs:
        try:
            syncfs(dir_fd)
            return
        except OSError:
            pass
    for fd in fds:
        os.fdatasync(fd)
    os.fsync(dir_fd)


class GroupSyncer:
    """Syncs lists of streams with the fewest journal commits the chosen method allows.

    ``pool`` (optional) runs per-file fdatasyncs in parallel threads. Safe to share between
    threads: each stream's ``sync_lock`` serialises the syncs of that stream.
    """

    def __init__(self, method: GroupSync, pool: Optional[Executor] = None) -> None:
        self.use_syncfs = method is GroupSync.SYNCFS and _syncfs is not None
        self.pool = pool
        self._dirfds: Dict[int, int] = {}  # st_dev -> an open directory on that filesystem
        self._devs: Dict[str, Optional[int]] = {}  # stream directory -> st_dev (None: not eligible)
        self._lock = threading.Lock()  # guards _dirfds and _closed, and is held over each syncfs
        self._closed = False
        self.syncfs_calls = 0

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for fd in self._dirfds.values():
                os.close(fd)
            self._dirfds.clear()

    def sync(self, streams: Sequence[Stream]) -> List[Optional[BaseException]]:
        """Make everything written to each stream durable; one error (or None) per stream."""
        results: List[Optional[BaseException]] = [None] * len(streams)
        due = [i for i, s in enumerate(streams) if s.durable_id < s.next_id]
        singles: List[int] = []
        if self.use_syncfs and len(due) > 1:
            groups: Dict[int, List[int]] = {}
            for i in due:
                s = streams[i]
                dev = self._dev(s.dir)
                if dev is None:
                    singles.append(i)
                else:
                    groups.setdefault(dev, []).append(i)
            for dev, members in groups.items():
                if len(members) == 1 or not self._sync_together(dev, [streams[i] for i in members], results, members):
                    singles.extend(members)
        else:
            singles = due
        self._sync_each(streams, singles, results)
        return results

    def _sync_each(self, streams: Sequence[Stream], which: List[int], results: list) -> None:
        def one(i: int) -> Optional[BaseException]:
            s = streams[i]
            try:
                s.make_durable(s.next_id)
                return None
            except (WalError, OSError) as exc:
                return exc

        if self.pool is not None and len(which) > 1:
            for i, err in zip(which, self.pool.map(one, which)):
                results[i] = err
        else:
            for i in which:
                results[i] = one(i)

    def _sync_together(self, dev: int, streams: List[Stream], results: list, slots: List[int]) -> bool:
        """One syncfs for streams on one filesystem; False if they must be synced one by one."""
        with self._lock:  # (close() may not take the descriptor away mid-call)
            if self._closed:
                return False
            fd = self._dirfds.get(dev)
            if fd is None:
                # Linux reports to a descriptor only the writeback errors that nobody had seen
                # when it was opened. One found earlier by another process's syncfs would be
                # missed, so the first sync after opening is per file: each file's own
                # descriptor still reports its errors.
                try:
                    self._dirfds[dev] = os.open(streams[0].dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
                except OSError:
                    pass
                return False
            with ExitStack() as held:
                # a fixed order, so two callers syncing overlapping sets cannot deadlock
                for s in sorted(streams, key=lambda s: s.dir):
                    held.enter_context(s.sync_lock)
                targets = []
                for s, slot in zip(streams, slots):
                    try:
                        targets.append(s.sync_target()[0])
                    except WalError as exc:  # the stream failed earlier
                        results[slot] = exc
                        targets.append(None)
                try:
                    syncfs(fd)
                    self.syncfs_calls += 1
                except OSError as exc:
                    if exc.errno in _UNSUPPORTED:
                        self.use_syncfs = False
                    for slot in slots:
                        results[slot] = None
                    return False  # per file, which finds the file (if any of ours) that failed
                for s, target in zip(streams, targets):
                    if target is not None:
                        s.mark_durable(target)
            return True

    def _dev(self, path: str) -> Optional[int]:
        """The device of ``path`` if a syncfs may stand for fdatasyncs there, else None."""
        if path in self._devs:
            return self._devs[path]
        if not os.path.exists(path):
            return None  # not created yet: nothing to sync, make_durable knows (ask again later)
        dev = self._devs[path] = syncfs_device(path)
        return dev
