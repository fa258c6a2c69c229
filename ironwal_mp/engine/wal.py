"""The public single-process engine: :class:`Wal` and :class:`TxnWriter`."""

from __future__ import annotations

import os
import threading
import weakref
from typing import Dict, Iterable, Iterator, List, NoReturn, Optional, Tuple, Union

import errno

from ..errors import (ReadOnlyError, RecordTooLargeError, StreamFailedError, TransactionClosedError, WalClosedError,
                      WalError, WalIOError, io_error)
from ..options import SyncMode, WalOptions
from . import layout
from .fdcache import FdCache
from .group_sync import GroupSyncer
from .frame import MAX_ENTRY, encode_entries, LENGTH
from .reader import SegmentReader, StreamView
from .recovery import RecoveryReport, StreamTail, recover_stream
from .rootkind import check_engine_root
from .rootlock import RootLock
from .sparse_index import SparseIndex
from .stream import Stream

_BYTES_LIKE = (bytes, bytearray, memoryview)
_EMPTY_VIEW = StreamView((), 0, 0, SparseIndex())

#: every open Wal of this process, for the fork hook below
_open_wals: "weakref.WeakSet[Wal]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A forked child shares the parent's descriptors, its LOCK and its idea of every stream's
    # next id: two writers handing out the same ids, whose frames recovery then cuts. So in the
    # child every inherited handle is closed, without a sync or an unlock that would act on the
    # parent's files, and the child's copy of the LOCK descriptor is dropped (the parent's
    # keeps the flock).
    for wal in list(_open_wals):
        wal._forked_from = wal._pid
        wal._closed = True
        if wal._lock is not None:
            wal._lock.close_in_child()
        wal._fdcache.abandon()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _raise_as_wal_error(exc: OSError, action: str, path: str) -> NoReturn:
    """Raise ``exc`` itself if the library raised it, else its WalIOError: ``action`` on the
    error's file (else ``path``) failed; a DiskFullError on a full disk, as for any write."""
    if isinstance(exc, WalError):
        raise exc
    raise io_error(exc, getattr(exc, "filename", None) or path, action) from exc


def _check_data(data: object) -> bytes:
    if type(data) is not bytes:
        if not isinstance(data, _BYTES_LIKE):
            raise TypeError(f"entry data must be bytes, not {type(data).__name__}")
        data = bytes(data)  # type: ignore[arg-type]
    if len(data) > MAX_ENTRY:  # (its u32 length prefix could not say how long it is)
        raise RecordTooLargeError(len(data), MAX_ENTRY, "entry")
    return data  # type: ignore[return-value]


class Wal:
    """A durable multi-stream write-ahead log in one directory.

    Thread-safe. Each stream is a subdirectory of ``opts.root_path`` named exactly as the
    stream. A stream is recovered (torn tail cut, index files rebuilt) the first time this
    process uses it; :meth:`recover_all` does all of them at once.

    ``lock=False`` skips ``<root>/LOCK``: only for a process that owns its streams by other
    means (a shard worker under a coordinator that holds the lock). ``read_only=True`` takes
    no lock, repairs nothing (a torn tail is left as it is and not read) and refuses writes
    (ReadOnlyError): for looking at a directory another process may own. It shows each stream
    as it was at first use until :meth:`refresh` takes in what the writer added since.

    A handle belongs to the process that opened it: in a forked child it is closed
    (WalClosedError), and it cannot be pickled. Open a Wal in each process instead
    (``read_only=True`` beside a writer), or use ShardedWal for many writing processes.
    """

    def __init__(self, opts: WalOptions, *, lock: bool = True, read_only: bool = False) -> None:
        if not isinstance(opts, WalOptions):
            raise TypeError(f"expected WalOptions, not {type(opts).__name__}")
        layout.check_flag(read_only, "read_only")  # ("no", 1: a truthy object would open read-only)
        layout.check_flag(lock, "lock")
        self.options = opts
        self.root = os.path.abspath(os.fspath(opts.root_path))
        self.read_only = read_only
        if lock and not read_only:
            check_engine_root(self.root)  # (before anything is created)
        if read_only:
            if not os.path.isdir(self.root):
                raise WalIOError(f"{self.root} is not a directory", errno.ENOENT, self.root)
        else:
            try:
                layout.make_dirs(self.root)
            except OSError as exc:  # (a file in the way, no permission, a full disk...)
                what = "is not a directory" if os.path.exists(self.root) else "cannot be created"
                raise WalIOError(f"root_path {self.root} {what}: {exc.strerror or exc}", exc.errno, self.root) from exc
        self._lock = RootLock(self.root).acquire() if lock and not read_only else None
        if not read_only:
            # the names of streams a killed writer was creating become durable before anything
            # is written to them (recovery syncs each stream's own directory)
            try:
                layout.fsync_dir(self.root)
            except OSError as exc:
                if self._lock is not None:
                    self._lock.release()
                raise WalIOError(f"cannot fsync root_path {self.root}: {exc.strerror or exc}", exc.errno,
                                 self.root) from exc
        self._fdcache = FdCache(opts.max_open_segments)
        self._reader = SegmentReader.for_options(self._fdcache, opts)
        self._streams: Dict[str, Stream] = {}
        self._syncer = GroupSyncer(opts.group_sync)
        self._open_lock = threading.Lock()  # guards _streams membership and _recovering
        self._close_lock = threading.RLock()  # a second close() returns once the first is done
        self._stream_locks: Dict[str, threading.Lock] = {}
        self._recovering: List[int] = []  # threads recovering a stream now (see _recover)
        self._recovery_done = threading.Condition(self._open_lock)
        self._closed = False
        self._pid = os.getpid()
        self._forked_from: Optional[int] = None  # the parent's pid, in a forked child
        self._sync_single = opts.sync_mode is SyncMode.STRICT
        self._sync_batch = opts.sync_mode in (SyncMode.STRICT, SyncMode.BATCH_ONLY)
        #: what recovery found and changed, per stream opened by this handle
        self.recovery_reports: List[RecoveryReport] = []
        _open_wals.add(self)

    def __reduce__(self):
        raise TypeError("a Wal cannot be pickled: it belongs to the process that opened it; open a "
                        "Wal in each process (read_only=True beside a writer), or use ShardedWal")

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("read-only" if self.read_only else "open")
        return f"<Wal {self.root!r} {state}>"

    # --- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> "Wal":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Make everything durable, close files and release the directory. Idempotent: a
        call that finds another thread closing returns once that one is done. A stream being
        recovered by another thread is finished first (and not handed out), so the directory is
        never released while its files are being repaired."""
        with self._close_lock:
            with self._open_lock:
                if self._closed:
                    return
                self._closed = True
                me = threading.get_ident()  # (a close called inside this thread's recovery: a signal handler)
                while any(t != me for t in self._recovering):
                    self._recovery_done.wait()
                streams = list(self._streams.values())
            _open_wals.discard(self)
            try:
                for stream in streams:  # (an append already past its closed check finishes first)
                    stream.close_writes()
                # a stream that failed earlier has told its writers; a sync failing now tells
                # nobody else, so close raises it (what was written since the last sync may be lost)
                errors = [] if self.read_only else [
                    e for e in self._syncer.sync(streams) if e is not None and not isinstance(e, StreamFailedError)]
            finally:
                self._syncer.close()
                self._fdcache.close_all()
                if self._lock is not None:
                    self._lock.release()
            if errors:
                raise errors[0]

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise self._closed_error()

    def _closed_error(self) -> WalClosedError:
        if self._forked_from is not None:
            return WalClosedError(
                f"this Wal was opened by process {self._forked_from}, and this process is a fork of it: "
                "a Wal has one writing process; open one here after the parent closes its own, "
                "or use Wal(read_only=True) to read"
            )
        return WalClosedError("the Wal is closed")

    # --- streams --------------------------------------------------------------------------

    def _stream(self, name: str, create: bool) -> Optional[Stream]:
        # (a name that is not a str, maybe not even hashable, gets check_stream_name's TypeError)
        stream = self._streams.get(name) if type(name) is str else None
        if stream is not None:
            if self._closed:
                raise self._closed_error()
            return stream
        self._check_open()
        layout.check_stream_name(name)
        with self._open_lock:
            per_name = self._stream_locks.setdefault(name, threading.Lock())
        with per_name:  # recover one stream without holding up the others
            stream = self._streams.get(name)
            if stream is not None:
                return stream
            stream_dir = os.path.join(self.root, name)
            if create and self.read_only:
                raise ReadOnlyError(f"this Wal was opened read-only: cannot write stream {name!r}")
            if not os.path.isdir(stream_dir):
                if not create:
                    return None
                tail = StreamTail([], 0, 0, SparseIndex())
            else:
                tail = self._recover(name, stream_dir)
            stream = Stream(name, stream_dir, self.options, self._reader, tail, read_only=self.read_only)
            with self._open_lock:
                self._check_open()
                self._streams[name] = stream
            return stream

    def _recover(self, name: str, stream_dir: str) -> StreamTail:
        """Recover one stream (see recovery.py). A close() in another thread waits for this
        before it lets go of LOCK: a process taking LOCK then would repair the same files."""
        me = threading.get_ident()
        with self._open_lock:
            self._check_open()
            self._recovering.append(me)
        try:
            tail, report = recover_stream(
                stream_dir,
                self.options.on_corruption,
                repair=not self.read_only,
                chunk=self.options.read_buffer_size,
            )
        except OSError as exc:
            _raise_as_wal_error(exc, f"recovering stream {name!r} at", stream_dir)
        finally:
            with self._open_lock:
                self._recovering.remove(me)
                self._recovery_done.notify_all()
        if report.changed:
            self.recovery_reports.append(report)
        return tail

    def open_stream(self, name: str) -> Stream:
        """The writer of stream ``name`` (recovered now if this handle has not used it yet).

        For a shard worker, which writes ready-made batch payloads with
        :meth:`Stream.append_payload` so that frames are encoded only here, by the engine.
        """
        stream = self._stream(name, True)
        assert stream is not None
        return stream

    def streams(self) -> List[str]:
        """Names of the streams in the directory (written by this or an earlier process)."""
        self._check_open()
        names = set(self._streams)
        for entry in os.scandir(self.root):
            if entry.is_dir() and layout.is_stream_name(entry.name):
                names.add(entry.name)
        return sorted(names)

    def recover_all(self) -> List[RecoveryReport]:
        """Open (and so recover) every stream now; return the reports of those that changed."""
        before = len(self.recovery_reports)
        for name in self.streams():
            self._stream(name, create=False)
        return self.recovery_reports[before:]

    # --- writes ---------------------------------------------------------------------------

    def append(self, stream: str, data: bytes) -> int:
        """Append one entry; return its id (ids start at 0 per stream and are contiguous)."""
        if type(data) is not bytes or len(data) > MAX_ENTRY:
            data = _check_data(data)
        s = (type(stream) is str and self._streams.get(stream)) or self._stream(stream, True)
        if self._closed:
            raise self._closed_error()
        seq = s.append_payload(LENGTH.pack(len(data)) + data, 1, trusted=True)  # type: ignore[union-attr]
        if self._sync_single:
            s.make_durable(seq + 1)  # type: ignore[union-attr]
        return seq

    def append_batch(self, stream: str, entries: Iterable[bytes]) -> range:
        """Append entries atomically, as one frame: after a crash all of them or none survive."""
        s, ids = self._write_batch(stream, [_check_data(e) for e in entries])
        self._settle_batch(s, ids)
        return ids

    def _write_batch(self, stream: str, items: List[bytes]) -> tuple[Stream, range]:
        """Write checked entries as one frame, not yet synced: (the stream, their ids)."""
        s = self._stream(stream, True)
        assert s is not None
        if not items:
            return s, range(s.next_id, s.next_id)
        start = s.append_payload(encode_entries(items), len(items), trusted=True)
        return s, range(start, start + len(items))

    def _settle_batch(self, s: Stream, ids: range) -> None:
        """Make a written batch as durable as the sync mode promises for batches."""
        if self._sync_batch and ids:
            s.make_durable(ids.stop)

    def writer(self, stream: str) -> "TxnWriter":
        """A transaction: entries added to it are appended as one batch on commit."""
        self._check_open()
        layout.check_stream_name(stream)
        self._check_writable()
        return TxnWriter(self, stream)

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyError("this Wal was opened read-only")

    def sync(self, stream: Optional[str] = None) -> None:
        """Fsync one stream, or every stream this handle wrote, now (for ASYNC users).

        Several streams are synced together as ``opts.group_sync`` says; the first stream's
        error, if any, is raised after all were tried.
        """
        self._check_open()
        if stream is not None:
            layout.check_stream_name(stream)  # (a stream this handle never wrote has nothing to sync)
        self._check_writable()
        targets = [self._streams[stream]] if stream in self._streams else (
            [] if stream is not None else list(self._streams.values())
        )
        errors = [err for err in self._syncer.sync(targets) if err is not None]
        if errors:
            raise errors[0]

    def truncate(self, stream: str, safe_id: int) -> int:
        """Delete whole segments whose ids are all below ``safe_id`` (never the active one)."""
        layout.check_id(safe_id, "safe_id")
        self._check_writable()
        s = self._stream(stream, False)
        return 0 if s is None else s.truncate(safe_id)

    def refresh(self, stream: Optional[str] = None) -> None:
        """Read-only handles: take in what the writer added to ``stream`` (or to every stream
        this handle has used) since it last looked: new entries and segments, truncations.

        Until then the handle keeps showing the streams as it saw them. Only whole, valid
        frames are taken in, so a write under way is seen once it is complete. A writing
        handle always sees its own writes: for it this does nothing.
        """
        self._check_open()
        if stream is not None:
            layout.check_stream_name(stream)
        if not self.read_only:
            return
        with self._open_lock:
            targets = list(self._streams.values()) if stream is None else (
                [self._streams[stream]] if stream in self._streams else [])
        for s in targets:  # (a stream not used yet is read afresh at its first use)
            try:
                s.follow()
            except OSError as exc:
                _raise_as_wal_error(exc, f"following stream {s.name!r} at", s.dir)

    # --- reads ----------------------------------------------------------------------------

    def _view(self, stream: str) -> tuple[StreamView, str]:
        s = (type(stream) is str and self._streams.get(stream)) or self._stream(stream, False)
        if self._closed:
            raise self._closed_error()
        if s is None:
            return _EMPTY_VIEW, ""
        return s.view(), s.dir

    def get(self, stream: str, seq_id: int) -> Optional[bytes]:
        """The entry with id ``seq_id``, or None if it is absent or truncated away."""
        layout.check_id(seq_id, "seq_id")
        view, stream_dir = self._view(stream)
        return self._reader.get(view, stream_dir, seq_id)

    def iter(self, stream: str, start_id: int = 0, *,
             with_ids: bool = False) -> Iterator[Union[bytes, Tuple[int, bytes]]]:
        """Entries in id order from ``start_id`` (or the first kept one) to the current end;
        ``(id, entry)`` pairs if ``with_ids``."""
        layout.check_id(start_id, "start_id")
        layout.check_flag(with_ids, "with_ids")
        view, stream_dir = self._view(stream)
        return self._reader.iter(view, stream_dir, start_id, with_ids)

    def next_id(self, stream: str) -> int:
        """The id the next append to ``stream`` will get (0 for a stream never written)."""
        return self._view(stream)[0].next_id

    def first_id(self, stream: str) -> Optional[int]:
        """The first readable id (after truncation), or None for an empty stream."""
        return self._view(stream)[0].first_id

    def current_segment_start_id(self, stream: str) -> Optional[int]:
        """Start id of the stream's active segment, or None for a stream never written."""
        view = self._view(stream)[0]
        return view.segments[-1] if view.segments else None

    def durable_id(self, stream: str) -> int:
        """Ids below this are known to be fsynced."""
        s = (type(stream) is str and self._streams.get(stream)) or self._stream(stream, False)
        if self._closed:
            raise self._closed_error()
        return 0 if s is None else s.durable_id

    def stream_stats(self, stream: str) -> Dict[str, int]:
        s = self._stream(stream, False)
        if s is None:
            return {"next_id": 0, "durable_id": 0, "fsyncs": 0, "frames": 0, "bytes": 0}
        return {
            "next_id": s.next_id,
            "durable_id": s.durable_id,
            "fsyncs": s.fsyncs,
            "frames": s.frames_written,
            "bytes": s.bytes_written,
        }


class TxnWriter:
    """Collects entries and appends them as one atomic batch.

    As a context manager it commits on a clean exit and writes nothing if the block raises.
    """

    def __init__(self, wal: Wal, stream: str) -> None:
        self._wal = wal
        self.stream = stream
        self._entries: List[bytes] = []
        self._done = False

    def add(self, data: bytes) -> None:
        if self._done:
            raise TransactionClosedError("the transaction was already committed or rolled back")
        self._entries.append(_check_data(data))

    def __len__(self) -> int:
        return len(self._entries)

    def commit(self) -> range:
        """Append everything added, as one frame; return the ids.

        If the write fails the transaction stays open with its entries, to retry or roll back;
        if only the sync after it fails, it is done (the entries may or may not survive).
        """
        if self._done:
            raise TransactionClosedError("the transaction was already committed or rolled back")
        # a write that fails has written nothing (or failed the stream until a reopen), so the
        # entries stay for a retry; once written, a failed sync must not lead to a second copy
        wal = self._wal
        s, ids = wal._write_batch(self.stream, self._entries)
        self._done = True
        self._entries = []
        wal._settle_batch(s, ids)
        return ids

    def rollback(self) -> None:
        """Discard everything added; nothing is written."""
        self._done = True
        self._entries = []

    def __enter__(self) -> "TxnWriter":
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._done:
            return
        if exc_type is None:
            self.commit()
        else:
            self.rollback()
