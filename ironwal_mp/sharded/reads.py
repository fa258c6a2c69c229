"""Reading shards directly from their segment files, in any process.

A reader never passes a shard's durable id: the worker publishes (active segment, readable
size, durable id) in the ring header under a seqlock, and every read works on a view built
from that triple, so it can neither see a frame being written nor one that is not yet durable.
"""

from __future__ import annotations

import os
import threading
from typing import Dict, Iterator, List, Optional, Tuple, Union

from ..engine import layout
from ..engine.fdcache import FdCache
from ..engine.reader import SegmentReader, StreamView
from ..engine.scanner import ScanError, scan_frames
from ..engine.sparse_index import SparseIndex
from ..ipc import ring_layout as L
from ..ipc.ring import Ring
from ..options import WalOptions
from .manifest import shard_stream


class _ActiveIndex:
    """An index of the shard's active segment, extended as the segment grows."""

    __slots__ = ("seg", "index", "scanned", "next_id")

    def __init__(self, seg: int) -> None:
        self.seg = seg
        self.index = SparseIndex()
        self.scanned = 0
        self.next_id = seg


class ShardReader:
    def __init__(self, root: str, rings: List[Ring], opts: WalOptions) -> None:
        self.root = root
        self.rings = rings
        self.opts = opts
        self.fdcache = FdCache(opts.max_open_segments)
        self.reader = SegmentReader.for_options(self.fdcache, opts)
        self._lock = threading.Lock()
        self._segments: Dict[int, List[int]] = {}
        self._prunes: Dict[int, int] = {}
        self._active: Dict[int, _ActiveIndex] = {}

    def shard_dir(self, shard: int) -> str:
        return os.path.join(self.root, shard_stream(shard))

    def view(self, shard: int, refresh: bool = False) -> Tuple[StreamView, str]:
        ring = self.rings[shard]
        seg, size, durable = ring.read_view()
        stream_dir = self.shard_dir(shard)
        prunes = ring.header[L.PRUNES]
        with self._lock:
            cached = segments = self._segments.get(shard)
            if self._prunes.get(shard, prunes) != prunes:  # the worker deleted segments
                self._forget(stream_dir, cached or ())
                cached = segments = None
            self._prunes[shard] = prunes
            if refresh or not segments or segments[-1] != seg:
                try:
                    listed = layout.list_segments(stream_dir)
                except FileNotFoundError:
                    listed = []
                segments = [s for s in listed if s <= seg]
                # files gone since the last listing: a prune whose PRUNES bump is still to come
                # (the worker bumps it after the unlinks and syncs); their descriptors go now
                self._forget(stream_dir, set(cached or ()).difference(listed))
                self._segments[shard] = segments
            if not segments or segments[-1] != seg or durable <= segments[0]:
                return StreamView(tuple(segments), 0, durable if segments else 0, SparseIndex()), stream_dir
            active = self._active.get(shard)
            if active is None or active.seg != seg:
                active = self._active[shard] = _ActiveIndex(seg)
            if active.scanned < size:
                self._extend(stream_dir, active, size)
            return StreamView(tuple(segments), size, durable, active.index), stream_dir

    def _forget(self, stream_dir: str, starts) -> None:
        """Close this process's descriptors (and drop cached blocks) of these segments."""
        for start in starts:
            self.reader.forget(os.path.join(stream_dir, layout.segment_name(start)))

    def _extend(self, stream_dir: str, active: _ActiveIndex, size: int) -> None:
        path = os.path.join(stream_dir, layout.segment_name(active.seg))
        try:
            for off, header, _ in scan_frames(
                self.reader.read_fn(path), active.scanned, active.next_id, end=size, decode_lz4=False
            ):
                active.index.add(header.start_id, off)
                active.scanned = off + header.frame_size
                active.next_id = header.end_id
        except ScanError:
            pass  # reads that reach the bad bytes report them with their offset

    def get(self, shard: int, seq_id: int) -> Optional[bytes]:
        view, stream_dir = self.view(shard)
        return self.reader.get(view, stream_dir, seq_id)

    def iter(self, shard: int, start_id: int, with_ids: bool = False) -> Iterator[Union[bytes, Tuple[int, bytes]]]:
        view, stream_dir = self.view(shard, refresh=True)
        return self.reader.iter(view, stream_dir, start_id, with_ids)

    def close(self) -> None:
        self.fdcache.close_all()

    def after_fork(self) -> "ShardReader":
        """A new reader for a forked child, whose copy of this one's locks may be held for good
        (by parent threads that do not exist in the child); the inherited descriptors are closed."""
        self.fdcache.abandon()
        return ShardReader(self.root, self.rings, self.opts)
