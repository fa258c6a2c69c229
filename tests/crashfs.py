"""A crash-state explorer: record what a piece of code does to the files under one directory,
then build the directory trees a power loss could have left at any point of it.

Used by ``test_crash_states.py``. It is the idea of ALICE (Pillai et al., OSDI 2014) cut down to
the calls this library makes: while a :class:`Recorder` is active, the ``os`` calls that change
files (``open`` with ``O_CREAT``, ``write``, ``ftruncate``, ``rename``/``replace``, ``unlink``,
``mkdir``...) and the calls that make them durable (``fsync``, ``fdatasync``, ``syncfs``) are
seen for every path under the root. After each changing call the recorder keeps a *crash point*:
what is on disk for sure (the durable view) and what the running program sees (the volatile
view, read from the real files).

The persistence rules are POSIX's, not one filesystem's more generous ones:

* a file's bytes (and its size) are durable once the file is fsynced or fdatasynced;
* a name (a creation, a rename, an unlink) is durable once its directory is fsynced; an fsync
  of the file does not make its name durable;
* ``syncfs`` makes everything durable;
* names not yet durable reach the disk in the order they were made (as a journal commits
  them), so a crash keeps some prefix of them; a rename is atomic;
* bytes not yet durable may be lost, cut anywhere, or (size written, data not) read as zeros;
  bytes below the lowest point a file was truncated or overwritten to since its last sync are
  the durable ones (the code under test only appends, truncates and writes new files).

:meth:`CrashPoint.states` yields trees between the two views: the durable view alone (power
loss), the volatile view (a kill -9: the page cache survives), and random mixtures of the rules
above. Each is written to a fresh directory, which the caller opens and checks.
"""

from __future__ import annotations

import fcntl
import importlib
import os
import pickle
import random
import shutil
import stat
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

#: (kind, inode id): kind "d" for a directory, "f" for a file
Entry = Tuple[str, int]
#: a whole tree: relative path -> entry ("" is the root)
Tree = Dict[str, Entry]
#: a name operation not yet durable: ("link", dir, name, entry) or ("unlink", dir, name)
MetaOp = tuple


def _dirname(rel: str) -> str:
    return rel.rpartition("/")[0]


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def apply_meta(tree: Tree, op: MetaOp) -> None:
    """Apply one name operation to ``tree`` (in place). An unlinked directory takes its
    subtree with it (only empty directories are ever removed by the code under test)."""
    if op[0] == "link":
        _, parent, name, entry = op
        tree[_join(parent, name)] = entry
    elif op[0] == "unlink":
        _, parent, name = op
        tree.pop(_join(parent, name), None)
    elif op[0] == "rename":
        _, parent, src, dst = op
        entry = tree.pop(_join(parent, src), None)
        if entry is None:  # (its creation is an earlier op of the same directory: applied first)
            raise AssertionError(f"rename of {src!r} in {parent!r}, which the tree does not hold")
        tree[_join(parent, dst)] = entry
    else:
        raise ValueError(op)


@dataclass
class CrashPoint:
    """What the disk holds for sure, and what the program saw, just after one call."""

    index: int
    call: str  # e.g. "fdatasync 'events/00000000000000000000.wal'"
    durable_tree: Tree
    durable_data: Dict[int, bytes]
    pending: List[MetaOp]  # names not yet durable, oldest first
    volatile_tree: Tree
    volatile_data: Dict[int, bytes]
    low: Dict[int, int]  # inode id -> the lowest offset changed since its last sync, if below its end
    note: object = None  # the caller's model state at this point (see Recorder.note)

    def power_loss(self) -> Tuple[Tree, Dict[int, bytes]]:
        return dict(self.durable_tree), dict(self.durable_data)

    def process_crash(self) -> Tuple[Tree, Dict[int, bytes]]:
        return dict(self.volatile_tree), dict(self.volatile_data)

    def mixture(self, rng: random.Random) -> Tuple[Tree, Dict[int, bytes]]:
        """Some prefix of the pending names, and for each file some state of its bytes."""
        tree = dict(self.durable_tree)
        for op in self.pending[: rng.randint(0, len(self.pending))]:
            apply_meta(tree, op)
        data: Dict[int, bytes] = {}
        for kind, ino in tree.values():
            if kind != "f":
                continue
            old = self.durable_data.get(ino, b"")
            new = self.volatile_data.get(ino, old)
            low = self.low.get(ino, len(old))  # bytes below this were not touched since the sync
            if new == old or rng.randrange(4) == 0:
                data[ino] = old  # (none of the changes reached the disk)
                continue
            # all of it a third of the time: a random cut almost never keeps a whole new record
            # (a checkpoint's, say) that was written last, and such states are the telling ones
            cut = len(new) if rng.randrange(3) == 0 else rng.randint(min(low, len(new)), len(new))
            if rng.randrange(3):
                data[ino] = new[:cut]  # the changes up to some byte reached the disk
            else:  # the size reached the disk, the data past ``cut`` did not
                data[ino] = new[:cut] + bytes(len(new) - cut)
        return tree, data

    def states(self, rng: random.Random, mixtures: int) -> Iterator[Tuple[str, Tree, Dict[int, bytes]]]:
        yield "power loss", *self.power_loss()
        yield "process crash", *self.process_crash()
        for i in range(mixtures):
            yield f"mixture {i}", *self.mixture(rng)


def materialize(tree: Tree, data: Dict[int, bytes], dest: str) -> None:
    """Write ``tree`` under ``dest`` (created). Entries whose directory is missing are skipped:
    an unreachable name is no name."""
    os.makedirs(dest, exist_ok=True)
    for rel in sorted(tree, key=lambda r: r.count("/")):
        if not rel:
            continue
        parent = _dirname(rel)
        if parent and tree.get(parent, ("f", -1))[0] != "d":
            continue
        if parent and not os.path.isdir(os.path.join(dest, parent)):
            continue
        kind, ino = tree[rel]
        path = os.path.join(dest, rel)
        if kind == "d":
            os.mkdir(path)
        else:
            with open(path, "wb") as fh:
                fh.write(data.get(ino, b""))


class UnmodelledCall(AssertionError):
    """The code under test changed the tree in a way the recorder does not model."""


@dataclass
class _Fd:
    rel: str
    ino: int  # inode id
    is_dir: bool
    append: bool  # opened with O_APPEND


class Recorder:
    """Watches ``os`` calls on paths under ``root`` while active (see :meth:`recording`)."""

    def __init__(self, root: str, after: Optional[CrashPoint] = None) -> None:
        """Record under ``root``. Its files are taken as durable, unless ``after`` is given:
        then ``root`` must hold that point's volatile view (:meth:`CrashPoint.process_crash`,
        materialized), and what of it is durable is what was durable at that point (a process
        that was killed there and whose files a new process now opens)."""
        self.root = os.path.realpath(root)
        self.points: List[CrashPoint] = []
        self._next_ino = 0
        self._ino_of: Dict[int, int] = {}  # st_ino of a live file -> inode id
        self._fds: Dict[int, _Fd] = {}
        self._durable_tree: Tree = {}
        self._durable_data: Dict[int, bytes] = {}
        self._pending: List[MetaOp] = []
        self._gone_data: Dict[int, bytes] = {}  # bytes of inodes with no name left
        self._low: Dict[int, int] = {}  # see CrashPoint.low
        self._note: object = None
        self._count = 0  # crash points kept so far
        self._mutex = threading.RLock()  # (the engine's FDATASYNC group sync calls from threads)
        self._local = threading.local()  # .depth: inside a wrapper on this thread
        if after is None:
            self._adopt_existing()
        else:
            self._adopt_point(after)

    # --- the model ---------------------------------------------------------------------------

    def _new_ino(self, st_ino: int) -> int:
        self._next_ino += 1
        self._ino_of[st_ino] = self._next_ino
        return self._next_ino

    def _adopt_existing(self) -> None:
        """Everything already under the root is durable (the starting state)."""
        self._durable_tree[""] = ("d", self._new_ino(os.stat(self.root).st_ino))
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, self.root)
                st = os.lstat(path)
                ino = self._new_ino(st.st_ino)
                if stat.S_ISDIR(st.st_mode):
                    self._durable_tree[rel] = ("d", ino)
                else:
                    self._durable_tree[rel] = ("f", ino)
                    with open(path, "rb") as fh:
                        self._durable_data[ino] = fh.read()

    def _adopt_point(self, point: CrashPoint) -> None:
        self._durable_tree = dict(point.durable_tree)
        self._durable_data = dict(point.durable_data)
        self._pending = list(point.pending)
        self._low = dict(point.low)
        self._next_ino = max([ino for _, ino in point.volatile_tree.values()] +
                             [ino for _, ino in point.durable_tree.values()] + [0])
        reachable = set()
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in dirnames + filenames:
                reachable.add(os.path.relpath(os.path.join(dirpath, name), self.root))
        for rel, (kind, ino) in point.volatile_tree.items():
            if rel == "" or rel in reachable:
                self._ino_of[os.lstat(os.path.join(self.root, rel)).st_ino] = ino
        live = set(self._ino_of.values())
        self._gone_data = {ino: data for ino, data in point.volatile_data.items() if ino not in live}

    def _rel(self, path) -> Optional[str]:
        if isinstance(path, int) or path is None:
            return None
        path = os.fsdecode(os.fspath(path))
        full = os.path.realpath(os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(path))),
                                             os.path.basename(path)))
        if full == self.root:
            return ""
        if full.startswith(self.root + os.sep):
            return os.path.relpath(full, self.root)
        return None

    def _ino_at(self, rel: str) -> Tuple[str, int]:
        st = os.lstat(os.path.join(self.root, rel))
        ino = self._ino_of.get(st.st_ino)
        if ino is None:
            raise UnmodelledCall(f"{rel!r} appeared without a call the recorder saw")
        return ("d" if stat.S_ISDIR(st.st_mode) else "f"), ino

    def _content(self, rel: str) -> bytes:
        with open(os.path.join(self.root, rel), "rb") as fh:
            return fh.read()

    def _volatile(self) -> Tuple[Tree, Dict[int, bytes]]:
        tree: Tree = {"": self._ino_at("")}
        data: Dict[int, bytes] = dict(self._gone_data)
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in dirnames + filenames:
                rel = os.path.relpath(os.path.join(dirpath, name), self.root)
                kind, ino = self._ino_at(rel)
                tree[rel] = (kind, ino)
                if kind == "f":
                    data[ino] = self._content(rel)
        return tree, data

    def _point(self, call: str) -> None:
        tree, data = self._volatile()
        self._keep(CrashPoint(self._count, call, dict(self._durable_tree), dict(self._durable_data),
                              list(self._pending), tree, data, dict(self._low), self._note))
        self._count += 1

    def _keep(self, point: CrashPoint) -> None:
        self.points.append(point)

    @contextmanager
    def _turn(self) -> Iterator[None]:
        """The model to itself for one call; the recorder's own ``os`` calls are not recorded."""
        outer = getattr(self._local, "depth", 0)
        self._local.depth = 1
        self._mutex.acquire()
        try:
            self._enter()
            try:
                yield
            finally:
                self._leave()
        finally:
            self._mutex.release()
            self._local.depth = outer

    def _enter(self) -> None:
        """(Hook: :class:`SharedRecorder` loads the model another process may have changed.)"""

    def _leave(self) -> None:
        """(Hook: :class:`SharedRecorder` saves the model for the other processes.)"""

    def _sync_dir(self, rel: str) -> None:
        """Every pending name operation in directory ``rel`` becomes durable."""
        keep = []
        for op in self._pending:
            if op[1] == rel:
                apply_meta(self._durable_tree, op)
            else:
                keep.append(op)
        self._pending = keep

    def _sync_file(self, fd: _Fd, real_fd: int) -> None:
        with open(f"/proc/self/fd/{real_fd}", "rb") as fh:  # (works for write-only and unlinked files)
            self._durable_data[fd.ino] = fh.read()
        self._low.pop(fd.ino, None)

    def _sync_all(self) -> None:
        for op in self._pending:
            apply_meta(self._durable_tree, op)
        self._pending = []
        tree, data = self._volatile()
        for kind, ino in tree.values():
            if kind == "f":
                self._durable_data[ino] = data[ino]
        for ino, content in self._gone_data.items():
            self._durable_data[ino] = content
        self._low.clear()

    def _lower(self, ino: int, offset: int) -> None:
        """Bytes of inode ``ino`` from ``offset`` on were cut or overwritten (not yet durable)."""
        self._low[ino] = min(self._low.get(ino, offset), offset)

    def _forget_name(self, rel: str) -> None:
        """``rel`` is about to lose its name (unlink, or renamed over): keep its bytes if it
        was the inode's last name, and let the kernel reuse its st_ino."""
        try:
            st = os.lstat(os.path.join(self.root, rel))
        except FileNotFoundError:
            return
        ino = self._ino_of.get(st.st_ino)
        if ino is None:
            raise UnmodelledCall(f"{rel!r} appeared without a call the recorder saw")
        if st.st_nlink <= 1 or stat.S_ISDIR(st.st_mode):
            if not stat.S_ISDIR(st.st_mode):
                self._gone_data[ino] = self._content(rel)
            del self._ino_of[st.st_ino]

    def crash_here(self, label: str) -> None:
        """Add a crash point now (also where no file call happens, e.g. after a claim is noted)."""
        with self._turn():
            self._point(label)

    def note(self, state: object) -> None:
        """Attach ``state`` (the caller's model: what was acknowledged) to the points that follow."""
        with self._turn():
            self._note = state
            self._noted()

    def _noted(self) -> None:
        """(Hook: the model changed without a crash point.)"""

    # --- the wrapped calls -------------------------------------------------------------------

    @contextmanager
    def recording(self) -> Iterator["Recorder"]:
        restore = self.install()
        try:
            if not self._count:
                self.crash_here("start")
            yield self
        finally:
            restore()

    def install(self) -> Callable[[], None]:
        """Put the wrappers in place; the function that takes them out again."""
        # (the engine's own names for two calls: stream.py's alias of fdatasync, and syncfs,
        # which the standard library lacks)
        stream_mod = importlib.import_module("ironwal_mp.engine.stream")
        gs_mod = importlib.import_module("ironwal_mp.engine.group_sync")
        real = {name: getattr(os, name) for name in _WRAPPED}
        real["syncfs"] = gs_mod.syncfs
        saved = (stream_mod._fdatasync, gs_mod.syncfs)
        wrappers = _make_wrappers(self, real)
        for name in _WRAPPED:
            setattr(os, name, wrappers[name])
        stream_mod._fdatasync = wrappers["fdatasync"]
        gs_mod.syncfs = wrappers["syncfs"]

        def restore() -> None:
            for name in real:
                if name != "syncfs":
                    setattr(os, name, real[name])
            stream_mod._fdatasync, gs_mod.syncfs = saved
            self._fds.clear()
        return restore


_WRAPPED = ("open", "close", "write", "pwrite", "writev", "ftruncate", "truncate", "fsync", "fdatasync",
            "rename", "replace", "unlink", "remove", "mkdir", "rmdir", "link", "symlink")


def _make_wrappers(rec: Recorder, real: Dict[str, Callable]) -> Dict[str, Callable]:
    def quiet(name):
        """The wrapper of ``os.<name>``; calls made by the recorder itself are not recorded."""
        def decorate(fn):
            def wrapper(*args, **kwargs):
                if getattr(rec._local, "depth", 0):
                    return real[name](*args, **kwargs)
                with rec._turn():
                    return fn(*args, **kwargs)
            wrapper.__name__ = name
            return wrapper
        return decorate

    @quiet("open")
    def open(path, flags, mode=0o777, *, dir_fd=None):  # noqa: A001 (os.open's name)
        rel = rec._rel(path) if dir_fd is None else None
        if rel is None:
            return real["open"](path, flags, mode, dir_fd=dir_fd)
        existed = os.path.lexists(os.path.join(rec.root, rel))
        fd = real["open"](path, flags, mode)
        st = os.fstat(fd)
        if not existed:
            ino = rec._new_ino(st.st_ino)
            rec._pending.append(("link", _dirname(rel), os.path.basename(rel), ("f", ino)))
        ino = rec._ino_of.get(st.st_ino)
        if ino is None:
            real["close"](fd)
            raise UnmodelledCall(f"{rel!r} appeared without a call the recorder saw")
        rec._fds[fd] = _Fd(rel, ino, stat.S_ISDIR(st.st_mode), bool(flags & os.O_APPEND))
        if existed and flags & os.O_TRUNC and flags & (os.O_WRONLY | os.O_RDWR):
            rec._lower(ino, 0)
        if not existed:
            rec._point(f"create {rel!r}")
        elif flags & os.O_TRUNC and flags & (os.O_WRONLY | os.O_RDWR):
            rec._point(f"open {rel!r} O_TRUNC")
        return fd

    @quiet("close")
    def close(fd):
        rec._fds.pop(fd, None)
        return real["close"](fd)

    def _data_call(name):
        @quiet(name)
        def wrapper(fd, *args, **kwargs):
            entry = rec._fds.get(fd)
            if entry is not None:
                size = os.fstat(fd).st_size
                if name == "ftruncate":
                    offset = args[0]
                elif name == "pwrite":
                    offset = args[1]
                else:
                    offset = size if entry.append else os.lseek(fd, 0, os.SEEK_CUR)
                if offset < size:
                    rec._lower(entry.ino, offset)
            result = real[name](fd, *args, **kwargs)
            if entry is not None:
                rec._point(f"{name} {entry.rel!r}")
            return result
        return wrapper

    @quiet("truncate")
    def truncate(path, length):
        if isinstance(path, int):
            return ftruncate(path, length)
        rel = rec._rel(path)
        if rel is not None:
            _, ino = rec._ino_at(rel)
            if length < os.stat(path).st_size:
                rec._lower(ino, length)
        result = real["truncate"](path, length)
        if rel is not None:
            rec._point(f"truncate {rel!r}")
        return result

    def _sync_call(name):
        @quiet(name)
        def wrapper(fd):
            result = real[name](fd)
            entry = rec._fds.get(fd)
            if entry is not None:
                if entry.is_dir:
                    rec._sync_dir(entry.rel)
                else:
                    rec._sync_file(entry, fd)
                rec._point(f"{name} {entry.rel!r}")
            return result
        return wrapper

    def _rename_call(name):
        @quiet(name)
        def wrapper(src, dst, *, src_dir_fd=None, dst_dir_fd=None):
            rsrc, rdst = rec._rel(src), rec._rel(dst)
            if rsrc is None and rdst is None:
                return real[name](src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
            if rsrc is None or rdst is None or _dirname(rsrc) != _dirname(rdst):
                raise UnmodelledCall(f"{name} across directories: {src!r} -> {dst!r}")
            if os.path.isdir(os.path.join(rec.root, rsrc)):
                raise UnmodelledCall(f"{name} of a directory: {rsrc!r}")
            if os.path.lexists(os.path.join(rec.root, rdst)) and not os.path.samefile(
                    os.path.join(rec.root, rsrc), os.path.join(rec.root, rdst)):
                rec._forget_name(rdst)
            result = real[name](src, dst)
            rec._pending.append(("rename", _dirname(rsrc), os.path.basename(rsrc), os.path.basename(rdst)))
            rec._point(f"{name} {rsrc!r} -> {rdst!r}")
            return result
        return wrapper

    def _unlink_call(name):
        @quiet(name)
        def wrapper(path, *, dir_fd=None):
            rel = rec._rel(path) if dir_fd is None else None
            if rel is None:
                return real[name](path, dir_fd=dir_fd)
            rec._forget_name(rel)
            result = real[name](path)
            rec._pending.append(("unlink", _dirname(rel), os.path.basename(rel)))
            rec._point(f"{name} {rel!r}")
            return result
        return wrapper

    @quiet("mkdir")
    def mkdir(path, mode=0o777, *, dir_fd=None):
        rel = rec._rel(path) if dir_fd is None else None
        if rel is None:
            return real["mkdir"](path, mode, dir_fd=dir_fd)
        result = real["mkdir"](path, mode)
        ino = rec._new_ino(os.lstat(path).st_ino)
        rec._pending.append(("link", _dirname(rel), os.path.basename(rel), ("d", ino)))
        rec._point(f"mkdir {rel!r}")
        return result

    def _refused(name):
        @quiet(name)
        def wrapper(*args, **kwargs):
            if any(rec._rel(a) is not None for a in args if isinstance(a, (str, bytes, os.PathLike))):
                raise UnmodelledCall(f"os.{name}{args!r} is not modelled")
            return real[name](*args, **kwargs)
        return wrapper

    ftruncate = _data_call("ftruncate")

    @quiet("syncfs")
    def syncfs(fd):
        real["syncfs"](fd)
        rec._sync_all()
        rec._point("syncfs")

    unlink = _unlink_call("unlink")
    return {
        "open": open, "close": close, "write": _data_call("write"), "pwrite": _data_call("pwrite"),
        "writev": _data_call("writev"), "ftruncate": ftruncate, "truncate": truncate,
        "fsync": _sync_call("fsync"), "fdatasync": _sync_call("fdatasync"),
        "rename": _rename_call("rename"), "replace": _rename_call("replace"),
        "unlink": unlink, "remove": _unlink_call("remove"), "mkdir": mkdir,
        "rmdir": _unlink_call("rmdir"), "link": _refused("link"), "symlink": _refused("symlink"),
        "syncfs": syncfs,
    }


class SharedRecorder(Recorder):
    """A :class:`Recorder` whose model is shared by every process that opens one ``shared``
    directory (outside the recorded root), so that a coordinator, its workers and the client
    are recorded as one machine: a power loss takes all of them at once, and one process's
    ``syncfs`` makes the others' files durable. Each recorded call takes a file lock, reloads the
    model if another process changed it, and saves it back; crash points are appended to a file
    that :meth:`load_points` reads. Descriptors stay each process's own."""

    _SHARED = ("root", "_next_ino", "_ino_of", "_durable_tree", "_durable_data", "_pending", "_gone_data",
               "_low", "_note", "_count")

    def __init__(self, shared: str, root: Optional[str] = None, after: Optional[CrashPoint] = None) -> None:
        """Join the recording in ``shared``; the first process names the ``root`` to record
        (and ``after``, as for :class:`Recorder`) and creates the directory."""
        self.shared = shared
        self._state_path = os.path.join(shared, "model.pickle")
        self._points_path = os.path.join(shared, "points.pickle")
        self._loaded = -1  # the generation of the model this process holds (see _save)
        self._dirty = False
        if root is not None:
            os.makedirs(shared)
        # the lock file also holds the model's generation, bumped by every save
        self._lock_fd = os.open(os.path.join(shared, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        if root is not None:
            super().__init__(root, after)
            self._save()
            open(self._points_path, "wb").close()
        else:
            self._fds = {}
            self.points = []
            self._mutex = threading.RLock()
            self._local = threading.local()
        with self._turn():
            pass  # (loads the model)

    def _enter(self) -> None:
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        generation = self._generation()
        if generation != self._loaded:
            with open(self._state_path, "rb") as fh:
                self.__dict__.update(pickle.load(fh))
            self._loaded = generation
        self._dirty = False

    def _generation(self) -> int:
        raw = os.pread(self._lock_fd, 8, 0)
        return int.from_bytes(raw, "little") if len(raw) == 8 else 0

    def _leave(self) -> None:
        try:
            if self._dirty:
                self._save()
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _save(self) -> None:
        tmp = self._state_path + f".{os.getpid()}.tmp"
        with open(tmp, "wb") as fh:
            pickle.dump({name: getattr(self, name) for name in self._SHARED}, fh)
        os.replace(tmp, self._state_path)
        self._loaded = self._generation() + 1
        os.pwrite(self._lock_fd, self._loaded.to_bytes(8, "little"), 0)

    def _keep(self, point: CrashPoint) -> None:
        with open(self._points_path, "ab") as fh:
            pickle.dump(point, fh)
        self._dirty = True

    def _noted(self) -> None:
        self._dirty = True

    @contextmanager
    def held(self) -> Iterator[None]:
        """No recorded call runs, in any process, while this is held: a process killed now is
        not inside one (the model never misses a call it made)."""
        with self._turn():
            yield

    def load_points(self) -> List[CrashPoint]:
        """Every crash point kept so far, by any process, in order."""
        points = []
        with self._turn(), open(self._points_path, "rb") as fh:
            while True:
                try:
                    points.append(pickle.load(fh))
                except EOFError:
                    return points


def skip_flushes(setattr_: Callable[[object, str, object], None] = setattr) -> None:
    """Make the flushes no-ops (a bad descriptor still fails): what is durable is the
    recorder's model, not the disk's, and a real syncfs flushes the whole filesystem."""
    def flush(fd: int) -> None:
        os.fstat(fd)

    stream_mod = importlib.import_module("ironwal_mp.engine.stream")
    gs_mod = importlib.import_module("ironwal_mp.engine.group_sync")
    for name in ("fsync", "fdatasync"):
        setattr_(os, name, flush)
    setattr_(stream_mod, "_fdatasync", flush)
    setattr_(gs_mod, "syncfs", flush)


#: set in the environment of processes that join a shared recording (see ``crashfs_site``)
SHARED_ENV = "CRASHFS_SHARED"


def join_shared_recording() -> None:
    """In a new process started with ``SHARED_ENV`` set: record it for the rest of its life."""
    skip_flushes()
    SharedRecorder(os.environ[SHARED_ENV]).install()  # (never taken out: the process ends recorded)


def scratch(base: str, name: str) -> str:
    """A fresh empty directory ``base/name`` (removed first if present)."""
    path = os.path.join(base, name)
    shutil.rmtree(path, ignore_errors=True)
    return path


__all__ = ["CrashPoint", "Recorder", "SHARED_ENV", "SharedRecorder", "UnmodelledCall", "apply_meta",
           "join_shared_recording", "materialize", "scratch", "skip_flushes"]
