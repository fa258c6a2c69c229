"""Following a stream that another process writes: take in what it added since the last look.

A read-only handle's view of a stream is a prefix of what its writer wrote. Looking again
(:func:`advance`) reads only what is new: the rest of the active segment from where the view
ends, and the active segment of any rotation since (the segments the writer left behind are
sealed, and are read like any other). Segments the writer truncated away leave the view.

Nothing is written and nothing is repaired. The view ends just before the first frame that is
not (yet) whole and valid: a writer in the middle of a write leaves one there, and so does a
crashed writer whose torn tail no writer has repaired yet. The next look starts from there, so
it sees the frame once it is complete, or the frames a repairing writer puts in its place.

If the files do not continue the old view (the active segment was replaced or has shrunk, or
segments appeared below it), the view is built again from a full scan of the active segment,
and every file of the old view must be forgotten by the caller's caches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List

from . import layout
from .recovery import StreamTail, scan_active
from .sparse_index import SparseIndex


@dataclass
class Followed:
    """The result of a look: the new tail, and what the caller's caches must drop."""

    tail: StreamTail
    #: start ids of old segments whose cached descriptors, indexes and blocks must go
    forget: List[int]


def advance(stream_dir: str, tail: StreamTail, chunk: int) -> Followed:
    """The view of ``stream_dir`` that continues ``tail`` (``tail.active_file`` tells whether
    its active segment has since been replaced)."""
    old = tail.segments
    try:
        segments = layout.list_segments(stream_dir)
    except FileNotFoundError:  # the stream's directory was removed
        segments = []
    if not segments:
        return Followed(StreamTail([], 0, 0, SparseIndex()), list(old))
    active = segments[-1]
    try:  # (a descriptor of its own: a cached one may belong to a file since replaced)
        fd = os.open(os.path.join(stream_dir, layout.segment_name(active)), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:  # removed since the listing: nothing to add this time
        return Followed(tail, [])
    try:
        st = os.fstat(fd)
        ident = (st.st_dev, st.st_ino)
        if _continues(old, segments, tail, ident, st.st_size):
            forget = [s for s in old if s < segments[0]]  # truncated away, oldest first
            if active == old[-1]:
                index, offset, first_id = tail.index, tail.active_size, tail.next_id
            else:
                index, offset, first_id = SparseIndex(), 0, active
        else:
            forget = list(old)
            index, offset, first_id = SparseIndex(), 0, active
        scan = scan_active(lambda off, n: os.pread(fd, n, off), offset, first_id, st.st_size, index, chunk)
    finally:
        os.close(fd)
    return Followed(StreamTail(segments, scan.valid_end, scan.next_id, index, active_file=ident), forget)


def _continues(old: List[int], segments: List[int], tail: StreamTail, ident: tuple, size: int) -> bool:
    """Whether ``segments`` (the files now) can follow ``old`` (the view) without a rescan."""
    if not old:
        return False
    last = old[-1]
    # what is present at or below the old active segment must be a suffix of the old view
    # (truncation removes the oldest first); everything above it is new
    below = [s for s in segments if s <= last]
    if below != old[len(old) - len(below):]:
        return False
    if segments[-1] == last:  # the same active segment: the same file, not shorter
        return ident == tail.active_file and size >= tail.active_size
    return True
