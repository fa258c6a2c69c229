"""One stream's writer: ids, frames, rotation, group commit and truncation.

Everything that changes a stream happens under its own lock, so streams never wait on each
other. Durability is separate from writing: a writer appends its frame under the lock, then
(outside it) asks for its ids to become durable; whoever holds the sync lock fsyncs once for
every frame written so far, so concurrent STRICT appenders share fsyncs (group commit).
"""

from __future__ import annotations

import errno
import os
import threading
from typing import Optional

from ..errors import ReadOnlyError, RecordTooLargeError, StreamFailedError, WalClosedError, WalIOError, io_error
from ..options import CompressionType, WalOptions
from . import layout
from .frame import HEADER, LENGTH_SIZE, MAGIC, MAX_PAYLOAD, MAX_U32, FrameError, choose_payload, entry_bounds, frame_crc
from .reader import SegmentReader, StreamView
from .follow import advance
from .recovery import StreamTail
from .sparse_index import SparseIndex

_fdatasync = getattr(os, "fdatasync", os.fsync)


class Stream:
    """Writer state of one stream directory. Created by :class:`~ironwal_mp.Wal`."""

    def __init__(
        self, name: str, stream_dir: str, opts: WalOptions, reader: SegmentReader, tail: StreamTail,
        *, read_only: bool = False,
    ) -> None:
        self.name = name
        self.dir = stream_dir
        self.reader = reader
        self.lock = threading.Lock()
        self.sync_lock = threading.Lock()  # held for a whole fsync: see make_durable
        self._segments = list(tail.segments)
        self._active_size = tail.active_size
        self._next_id = tail.next_id
        self._index = tail.index
        self._last_frame = tail.last_frame
        self._epoch = 0  # bumped when a follower's view is rebuilt: keys its cached blocks
        self._chunk = opts.read_buffer_size
        #: a writer's recovery fsynced the tail; a reader knows only that sealed segments are durable
        self._synced_id = (tail.segments[-1] if tail.segments else 0) if read_only else tail.next_id
        self._failed: Optional[BaseException] = None
        self._closed = False  # set by close_writes: the handle is closing
        self._max_segment_size = opts.max_segment_size
        self._max_entries = opts.max_entries_per_segment
        self._compress = opts.compression is CompressionType.LZ4
        self._min_compression = opts.min_compression_size
        self._active_path = self._path(self._segments[-1]) if self._segments else ""
        self.read_only = read_only
        self.fsyncs = 0
        self.frames_written = 0
        self.bytes_written = 0

    # --- state ----------------------------------------------------------------------------

    def _path(self, start: int) -> str:
        return os.path.join(self.dir, layout.segment_name(start))

    @property
    def next_id(self) -> int:
        return self._next_id

    @property
    def durable_id(self) -> int:
        """Ids below this are known to be on stable storage."""
        return self._synced_id

    @property
    def active_start(self) -> Optional[int]:
        return self._segments[-1] if self._segments else None

    @property
    def segment_count(self) -> int:
        return len(self._segments)

    def view(self) -> StreamView:
        with self.lock:
            return StreamView(tuple(self._segments), self._active_size, self._next_id, self._index, self._epoch)

    def close_writes(self) -> None:
        """Refuse appends and truncation from now on (WalClosedError), once the one under way
        is done: the handle's close syncs after this, so no append it acknowledged is left out."""
        with self.lock:
            self._closed = True

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyError(f"stream {self.name!r} was opened read-only")
        if self._failed is not None:
            raise StreamFailedError(
                f"stream {self.name!r} failed earlier and refuses writes: {self._failed}"
            )

    def follow(self) -> None:
        """Read-only: take in what the stream's writer added since the last look (see follow.py)."""
        with self.lock:
            old = StreamTail(self._segments, self._active_size, self._next_id, self._index,
                             last_frame=self._last_frame)
            got = advance(self.dir, old, self._chunk)
            for start in got.forget:  # (closes descriptors of deleted or replaced files too)
                self.reader.forget(self._path(start))
            if not got.continued:  # reads under an older view cache nothing the new one sees
                self._epoch += 1
            tail = got.tail
            self._segments = list(tail.segments)
            self._active_size = tail.active_size
            self._next_id = tail.next_id
            self._index = tail.index
            self._last_frame = tail.last_frame
            self._active_path = self._path(self._segments[-1]) if self._segments else ""
            # sealed segments were fsynced by the rotation that sealed them
            self._synced_id = self._segments[-1] if self._segments else 0

    # --- writing ----------------------------------------------------------------------------

    def append_payload(self, payload: bytes, count: int, *, trusted: bool = False) -> int:
        """Write ``count`` batch-encoded entries as one frame; return the first id.

        The frame reaches the OS before this returns (a crash of this process loses nothing);
        call :meth:`make_durable` for stable storage. ``ValueError`` unless ``payload`` is the
        batch encoding of exactly ``count`` (at least one) entries: a frame that is not would
        be unreadable, and one of no entries would make recovery cut it and all after it.
        ``trusted``: the caller built ``payload`` itself (the engine's encoders, a shard
        worker's ring slices), so only the cheap checks are made.
        """
        if len(payload) > MAX_PAYLOAD:  # both header size fields are u32
            raise RecordTooLargeError(len(payload), MAX_PAYLOAD, "batch")
        if type(count) is not int or not 1 <= count <= MAX_U32 or len(payload) < LENGTH_SIZE * count:
            raise ValueError(f"stream {self.name!r}: {count!r} entries cannot be in a payload of {len(payload)} bytes "
                             f"(1 to {MAX_U32} entries of a u32 length each)")
        if not trusted:
            try:
                entry_bounds(payload, count)
            except FrameError as exc:
                raise ValueError(f"stream {self.name!r}: the payload is not a batch of {count} entries: {exc}") from None
        ftype, stored = choose_payload(payload, self._compress, self._min_compression)
        disk_size = len(stored)
        with self.lock:
            if self._closed:
                raise WalClosedError("the Wal is closed")
            self._check_writable()
            start = self._next_id
            if start + count > layout.ID_LIMIT:  # (before the header: its id field is a u64)
                raise WalIOError(f"stream {self.name!r} has run out of ids (they are u64)", errno.EOVERFLOW, self.dir)
            frame = (
                HEADER.pack(
                    MAGIC, frame_crc(start, count, ftype, stored), start, count, ftype,
                    disk_size, len(payload),
                )
                + stored
            )
            size = self._active_size
            try:
                if not self._segments:
                    self._create_first_segment(start)
                    size = 0
                elif size and (
                    size + len(frame) > self._max_segment_size
                    or (self._max_entries is not None and start - self._segments[-1] + count > self._max_entries)
                ):
                    self._rotate(start)
                    size = 0
                self._write(frame, size)
                self._index.add(start, size)
                self._active_size = size + len(frame)
                self._next_id = start + count
            except WalIOError:
                raise  # rolled back, or the stream marked failed
            except WalClosedError:
                raise  # the handle closed under this call (its files are gone): nothing goes on
            except BaseException as exc:
                # an interrupt between two steps: the files may hold a segment or frame that
                # memory does not; writing on would misplace ids, so only a reopen goes on
                self._failed = exc
                raise
            self.frames_written += 1
            self.bytes_written += len(frame)
            return start

    def _write(self, frame: bytes, size: int) -> None:
        cache = self.reader.fdcache
        try:
            entry = cache.acquire(self._active_path, True)
        except OSError as exc:  # (EMFILE, EACCES...: nothing written, the stream goes on)
            raise _io_error(exc, self._active_path, "opening to append to") from exc
        try:
            layout.write_all(entry.fd, frame)
        except OSError as exc:
            # roll back a partial frame so the file ends at a frame boundary again
            try:
                os.ftruncate(entry.fd, size)
            except OSError as exc2:
                self._failed = exc2
            raise _io_error(exc, self._active_path, "appending to", failed=self._failed is not None) from exc
        finally:
            cache.release(entry)

    def _create_first_segment(self, start: int) -> None:
        try:
            layout.make_dirs(self.dir)  # (fsyncs the root)
            fd = os.open(self._path(start), os.O_WRONLY | os.O_CREAT, 0o644)
            os.close(fd)
            layout.write_segments_idx(self.dir, [start])  # also fsyncs the directory
        except OSError as exc:
            raise _io_error(exc, self.dir, "creating the stream") from exc
        self._segments = [start]
        self._active_path = self._path(start)
        self._index = SparseIndex()

    def _rotate(self, start: int) -> None:
        """Seal the active segment (durably) and start a new one at ``start``."""
        cache = self.reader.fdcache
        try:
            entry = cache.acquire(self._active_path, True)
        except OSError as exc:  # (nothing changed yet: the stream goes on)
            raise _io_error(exc, self._active_path, "opening to seal") from exc
        try:
            _fdatasync(entry.fd)
            self.fsyncs += 1
        except OSError as exc:
            self._failed = exc
            raise _io_error(exc, self._active_path, "fsyncing", written=True) from exc
        finally:
            cache.release(entry)
        path = self._path(start)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            os.close(fd)
            layout.fsync_dir(self.dir)
            layout.append_segments_idx(self.dir, start)
            layout.write_head_state(self.dir, start)
        except OSError as exc:
            # the new (empty) segment may exist; recovery treats it as the active one
            self._failed = exc
            raise _io_error(exc, path, "rotating to", failed=True) from exc
        if self._synced_id < start:
            self._synced_id = start  # everything in the sealed segment is now durable
        self._segments.append(start)
        self._active_path = path
        self._active_size = 0
        self._index = SparseIndex()

    def make_durable(self, upto_id: int) -> None:
        """Return once every id below ``upto_id`` is on stable storage (shared fsync)."""
        if self._synced_id >= upto_id:
            return
        with self.sync_lock:
            if self._synced_id >= upto_id:
                return  # another caller's fsync covered us
            target, path = self.sync_target()
            if not path:
                return
            cache = self.reader.fdcache
            try:
                entry = cache.acquire(path, True)
            except FileNotFoundError as exc:
                if self._synced_id >= target:
                    return  # sealed (and so synced) by a rotation, then truncated away meanwhile
                raise _io_error(exc, path, "opening to fsync") from exc
            except OSError as exc:  # (EMFILE...: nothing is durable yet, a later sync may be)
                raise _io_error(exc, path, "opening to fsync") from exc
            try:
                _fdatasync(entry.fd)
            except OSError as exc:
                self._failed = exc
                raise _io_error(exc, path, "fsyncing", written=True) from exc
            finally:
                cache.release(entry)
            self.mark_durable(target)

    # The two halves of a sync, for syncing several streams with one call (group_sync): hold
    # ``sync_lock``, take the target, make the file durable, then mark the target durable.

    def sync_target(self) -> tuple[int, str]:
        """(the id everything written so far ends below, the active segment's path or "")."""
        with self.lock:
            self._check_writable()
            return self._next_id, self._active_path

    def mark_durable(self, target: int) -> None:
        """Record that ids below ``target`` are on stable storage (hold ``sync_lock``)."""
        self.fsyncs += 1
        if target > self._synced_id:
            self._synced_id = target

    # --- truncation -------------------------------------------------------------------------

    def truncate(self, safe_id: int) -> int:
        """Delete sealed segments whose ids are all below ``safe_id``; return how many."""
        with self.lock:
            if self._closed:
                raise WalClosedError("the Wal is closed")
            self._check_writable()
            doomed = []
            for i in range(len(self._segments) - 1):
                if self._segments[i + 1] <= safe_id:
                    doomed.append(self._segments[i])
                else:
                    break
            if not doomed:
                return 0
            gone = 0
            try:
                for start in doomed:  # oldest first: a crash leaves a contiguous suffix
                    path, step = self._path(start), "deleting"
                    self.reader.forget(path)
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        pass
                    self._segments = self._segments[1:]  # as each goes: memory follows the disk
                    gone += 1
                path, step = self.dir, "recording the deletions in"
                layout.fsync_dir(self.dir)
                layout.write_segments_idx(self.dir, self._segments)
            except OSError as exc:
                # (the files are the truth: a stale segments.idx is rebuilt at the next open)
                raise _io_error(exc, path, step, partial=gone > 0,
                                note=f"the truncation stopped after deleting {gone} of {len(doomed)} segments") from None
            return len(doomed)

    def forget_files(self) -> None:
        for start in self._segments:
            self.reader.forget(self._path(start))


def _io_error(exc: OSError, path: str, action: str, written: bool = False, partial: bool = False,
              failed: bool = False, note: str = "") -> WalIOError:
    """``errors.io_error`` saying what a failed stream call leaves. ``written``: a sync failed, so
    what was written before it may or may not survive; ``partial``: the call had done part of
    its work (``note`` says what); ``failed``: the stream now refuses writes (freeing space does
    not change that; a reopen does)."""
    leaves = [note] if note else []
    if written:
        leaves.append("entries written before it were not acknowledged as durable and may or may not be "
                      "there after a reopen (the stream refuses writes until then)")
    elif failed:
        leaves.append("the stream refuses writes until it is reopened")
    full = "the disk is full" if written or partial else "the disk is full; nothing of this call was kept"
    return io_error(exc, path, action, full, "; ".join(leaves))
