"""Reading entries back from a stream's segment files (``get`` and ``iter``).

A reader works on a :class:`StreamView`: an immutable snapshot of where the stream's data ends,
taken under the stream's lock by the writer (or computed by a read-only opener). Reads never go
past the view, so a frame being written concurrently is never seen half-written. Reads do not
hold the stream's lock, so they never stall appends.
"""

from __future__ import annotations

import os
from bisect import bisect_right
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

from ..errors import ConcurrentTruncationError, CorruptionError, CrcMismatchError, WalIOError
from ..options import ReadStrategy, WalOptions
from . import layout
from .caches import LruCache
from .fdcache import FdCache
from .frame import FrameError, FrameHeader, decode_entries, check_payload, entry_at, raw_payload
from .scanner import ReadFn, ScanError, scan_frames
from .sparse_index import SparseIndex


class StreamView(NamedTuple):
    segments: Tuple[int, ...]  # start ids, ascending; the last is the active one
    active_size: int  # readable bytes of the active segment
    next_id: int  # ids below this (and at or above segments[0]) are readable
    active_index: SparseIndex
    #: which version of the files: a follower's view rebuilt from scratch gets a new one, so
    #: reads still under an older view put nothing in the caches that the new one reads
    epoch: int = 0

    @property
    def first_id(self) -> Optional[int]:
        """The first readable id (truncation moves it up), or None when nothing is readable."""
        return self.segments[0] if self.segments and self.next_id > self.segments[0] else None


class SegmentReader:
    """Shared by all streams of a Wal: descriptor cache, index cache and block cache."""

    def __init__(
        self,
        fdcache: FdCache,
        *,
        strategy: ReadStrategy = ReadStrategy.STANDARD_IO,
        chunk: int = 128 * 1024,
        block_cache_size: Optional[int] = None,
        index_cache_segments: int = 1024,
    ) -> None:
        self.fdcache = fdcache
        self.strategy = strategy
        self.chunk = chunk
        self.indexes: LruCache[tuple[SparseIndex, int]] = LruCache(index_cache_segments)
        self.blocks: Optional[LruCache[tuple[List[bytes], int]]] = (
            LruCache(block_cache_size, cost=lambda v: v[1] + 64) if block_cache_size else None
        )

    @classmethod
    def for_options(cls, fdcache: FdCache, opts: "WalOptions") -> "SegmentReader":
        """A reader configured by a Wal's options (strategy, chunk size, block cache)."""
        return cls(
            fdcache,
            strategy=opts.read_strategy,
            chunk=opts.read_buffer_size,
            block_cache_size=opts.block_cache_size,
        )

    # --- low level --------------------------------------------------------------------------

    def read_fn(self, path: str) -> ReadFn:
        cache = self.fdcache
        if self.strategy is ReadStrategy.MMAP:

            def read(offset: int, size: int) -> bytes:
                entry = _acquire(cache, path)
                try:
                    try:
                        return entry.mapping(offset + size)[offset : offset + size]
                    except EOFError:  # the file ends sooner: a short read, as pread gives
                        return os.pread(entry.fd, size, offset)
                except OSError as exc:  # (ENODEV: not a regular file; EIO...)
                    raise _read_error(exc, path) from exc
                finally:
                    cache.release(entry)

        else:

            def read(offset: int, size: int) -> bytes:
                entry = _acquire(cache, path)
                try:
                    return os.pread(entry.fd, size, offset)
                except OSError as exc:
                    raise _read_error(exc, path) from exc
                finally:
                    cache.release(entry)

        return read

    def file_size(self, path: str) -> int:
        entry = _acquire(self.fdcache, path)
        try:
            return os.fstat(entry.fd).st_size
        finally:
            self.fdcache.release(entry)

    def _truncated(self, view: StreamView, stream_dir: str, pos: int) -> bool:
        """Whether segment ``pos`` of ``view``, found missing, went by truncation: that deletes
        the oldest first, so the view's first segment is gone too. Else CorruptionError."""
        if pos == 0 or not os.path.exists(os.path.join(stream_dir, layout.segment_name(view.segments[0]))):
            return True
        path = os.path.join(stream_dir, layout.segment_name(view.segments[pos]))
        raise CorruptionError(path, 0, "the segment file is missing, although older segments are still there")

    def sealed_index(self, path: str, start: int, epoch: int = 0) -> tuple[SparseIndex, int]:
        """(index, valid size) of a sealed segment, built once by a CRC-checked scan."""
        cached = self.indexes.get((path, epoch))
        if cached is not None:
            return cached
        size = self.file_size(path)
        index = SparseIndex()
        valid = 0
        try:
            for offset, header, _ in scan_frames(
                self.read_fn(path), 0, start, end=size, chunk=self.chunk, decode_lz4=False
            ):
                index.add(header.start_id, offset)
                valid = offset + header.frame_size
        except ScanError:
            valid = size  # let a read that reaches the bad bytes report them precisely
        result = (index, valid)
        self.indexes.put((path, epoch), result)
        return result

    def forget(self, path: str) -> None:
        self.fdcache.forget(path)
        self.indexes.discard_where(lambda key: key[0] == path)  # type: ignore[index]
        if self.blocks is not None:
            self.blocks.discard_where(lambda key: key[0] == path)  # type: ignore[index]

    def decode(self, path: str, offset: int, header: FrameHeader, stored: bytes,
               crc_checked: bool = False, epoch: int = 0) -> List[bytes]:
        """A frame's entries, CRC-checked (unless the caller just did); from the block cache when enabled."""
        blocks = self.blocks
        if blocks is not None:
            hit = blocks.get((path, epoch, offset))
            if hit is not None:
                return hit[0]
        try:
            if not crc_checked:
                check_payload(header, stored)
            entries = decode_entries(raw_payload(header, stored), header.count)
        except FrameError as exc:
            raise _frame_error(exc, path, offset) from None
        if blocks is not None:
            blocks.put((path, epoch, offset), (entries, header.uncompressed_size))
        return entries

    def entry(self, path: str, offset: int, header: FrameHeader, stored: bytes, seq_id: int,
              epoch: int = 0) -> bytes:
        """Entry ``seq_id`` of a CRC-checked frame. Without a block cache to fill, only that
        entry is copied out: decoding a whole batch frame made a ``get`` several times slower."""
        if self.blocks is not None:
            return self.decode(path, offset, header, stored, True, epoch)[seq_id - header.start_id]
        try:
            return entry_at(raw_payload(header, stored), header.count, seq_id - header.start_id)
        except FrameError as exc:
            raise _frame_error(exc, path, offset) from None

    # --- frames of one segment ------------------------------------------------------------

    def _frames(
        self, view: StreamView, stream_dir: str, pos: int, from_id: int
    ) -> Iterator[tuple[int, FrameHeader, List[bytes]]]:
        """Decoded frames of segment ``view.segments[pos]``, from the one holding ``from_id``."""
        for path, off, header, stored in self._stored_frames(view, stream_dir, pos, from_id):
            yield off, header, self.decode(path, off, header, stored, True, view.epoch)

    def _stored_frames(
        self, view: StreamView, stream_dir: str, pos: int, from_id: int
    ) -> Iterator[tuple[str, int, FrameHeader, bytes]]:
        """(path, offset, header, CRC-checked stored payload) of the frames of segment
        ``view.segments[pos]``, from the one holding ``from_id``."""
        start = view.segments[pos]
        path = os.path.join(stream_dir, layout.segment_name(start))
        if pos == len(view.segments) - 1:
            index, end = view.active_index, view.active_size
            end_id = view.next_id
        else:
            index, end = self.sealed_index(path, start, view.epoch)
            end_id = view.segments[pos + 1]
        try:
            first_id, offset = index.floor(from_id) if from_id > start else (start, 0)
        except KeyError:
            first_id, offset = start, 0
        reached, last = first_id, None
        try:
            for off, header, stored in scan_frames(
                self.read_fn(path), offset, first_id, end=end, chunk=self.chunk, decode_lz4=False
            ):  # (every frame walked over is CRC-checked: see scan_frames)
                reached, last = header.start_id + header.count, (off, header, stored)
                if reached > from_id:
                    yield path, off, header, stored
        except ScanError as exc:
            if last is not None:  # a gap in ids may be the previous frame's damaged count
                self.decode(path, *last, epoch=view.epoch)
            raise _frame_error(exc.error, path, exc.offset) from None
        if reached != end_id:
            # frames must end exactly where the next segment (or the view) begins; the last
            # frame's count is the likely culprit, and it is CRC-covered
            if last is None:
                raise CorruptionError(path, offset, f"no frame holds id {first_id}")
            off, header, stored = last
            self.decode(path, off, header, stored, epoch=view.epoch)
            if reached < end_id and pos < len(view.segments) - 1:  # (every frame checks)
                raise CorruptionError(path, off, f"ids {reached} to {end_id - 1} are missing: this file's frames "
                                                 f"end at id {reached} and the next segment file starts at "
                                                 f"{end_id} (a lost segment file, or a tail cut off)")
            raise CorruptionError(path, off, f"frames end at id {reached}, expected {end_id}")

    # --- public reads -----------------------------------------------------------------------

    def get(self, view: StreamView, stream_dir: str, seq_id: int) -> Optional[bytes]:
        segments = view.segments
        if not segments or seq_id < segments[0] or seq_id >= view.next_id:
            return None
        pos = bisect_right(segments, seq_id) - 1
        try:
            for path, off, header, stored in self._stored_frames(view, stream_dir, pos, seq_id):
                return self.entry(path, off, header, stored, seq_id, view.epoch)
        except FileNotFoundError:
            if self._truncated(view, stream_dir, pos):
                return None  # truncated away meanwhile
        return None

    def iter(self, view: StreamView, stream_dir: str, start_id: int,
             with_ids: bool = False) -> Iterator[Union[bytes, Tuple[int, bytes]]]:
        """Entries from ``start_id`` (or the view's first id, if that is later) to the view's end;
        ``(id, entry)`` pairs if ``with_ids`` (where it started is then never a guess).

        ConcurrentTruncationError if ids the caller asked for, at or after the view's first id,
        are truncated away before they are read: an iteration never skips ids silently.
        """
        segments = view.segments
        if not segments:
            return
        from_first = start_id < segments[0]  # (asked for ids already gone: "from the first kept")
        start_id = max(start_id, segments[0])
        end_id = view.next_id
        if start_id >= end_id:
            return
        pos = bisect_right(segments, start_id) - 1
        next_id = start_id  # the id the caller expects next
        for p in range(pos, len(segments)):
            try:
                for _, header, entries in self._frames(view, stream_dir, p, next_id):
                    first = next_id - header.start_id if header.start_id < next_id else 0
                    stop = min(header.count, end_id - header.start_id)
                    if with_ids:
                        base = header.start_id
                        for k in range(first, stop):
                            yield base + k, entries[k]
                    else:
                        for k in range(first, stop):
                            yield entries[k]
                    next_id = header.start_id + stop
                    if next_id >= end_id:
                        return
            except FileNotFoundError:
                self._truncated(view, stream_dir, p)
                if next_id == start_id and from_first:
                    continue  # truncated before we began: start at the first kept segment
                raise ConcurrentTruncationError(
                    f"{stream_dir}: ids from {next_id} were truncated away while this iteration "
                    f"was reading them; restart it (the first kept id is now later)"
                ) from None


def _acquire(cache: FdCache, path: str):
    """Pin ``path`` for reading. FileNotFoundError stays as it is (the callers tell truncation
    from loss); any other refusal is a WalIOError naming the file."""
    try:
        return cache.acquire(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _read_error(exc, path) from exc


def _frame_error(exc: FrameError, path: str, offset: int) -> CorruptionError:
    """The public error for bytes of ``path`` at ``offset`` that are not a valid frame."""
    if exc.is_crc:
        return CrcMismatchError(path, offset, exc.crc_expected, exc.crc_actual)
    return CorruptionError(path, offset, exc.reason)


def _read_error(exc: OSError, path: str) -> WalIOError:
    return WalIOError(f"reading {path} failed: {exc.strerror or exc}", exc.errno, path)


def view_of(segments: Sequence[int], active_size: int, next_id: int, index: SparseIndex) -> StreamView:
    return StreamView(tuple(segments), active_size, next_id, index)
