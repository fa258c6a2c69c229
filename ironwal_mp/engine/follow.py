"""Following a stream that another process writes: take in what it added since the last look.

A read-only handle's view of a stream is a prefix of what its writer wrote. Looking again
(:func:`advance`) reads only what is new: the rest of the active segment from where the view
ends, and the active segment of any rotation since (the segments the writer left behind are
sealed, and are read like any other). Segments the writer truncated away leave the view.

Nothing is written and nothing is repaired. The view ends just before the first frame that is
not (yet) whole and valid: a writer in the middle of a write leaves one there, and so does a
crashed writer whose torn tail no writer has repaired yet. The next look starts from there, so
it sees the frame once it is complete, or the frames a repairing writer puts in its place.

The files continue the old view only if the old active segment still holds, at the same
offset, the last frame the view took from it (its header, CRC included, is read again), is no
shorter if it is still the newest, and no segment has appeared below it. Otherwise (the stream
was deleted and written again, or its active segment cut short) the view is rebuilt from a full
scan of the newest segment, and the caller must drop everything it cached of the old files.

A new segment that holds no valid frame yet is taken in only once the segment before it is
seen to end, by its last frame, right below its name, as a rotation leaves it. Any other such
file was placed from outside (``layout.stray_segments``; a writer's recovery sets it aside),
and taking it for the active one would make the view's ids jump; once the writer has rotated
past it, taking it for a sealed one would shadow ids of the segment below. Leaving out an
empty file hides no entry, so a doubtful one simply waits for a later look.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List

from . import layout
from .frame import HEADER_SIZE, FrameError, parse_header
from .recovery import StreamTail, last_frame_ends_at, scan_active
from .scanner import ScanError, scan_frames
from .sparse_index import SparseIndex


@dataclass
class Followed:
    """The result of a look: the new tail, and what the caller's caches must drop."""

    tail: StreamTail
    #: start ids of old segments whose cached descriptors, indexes and blocks must go
    forget: List[int]
    #: False: the files did not continue the old view, which was rebuilt from scratch
    continued: bool = True


def advance(stream_dir: str, tail: StreamTail, chunk: int) -> Followed:
    """The view of ``stream_dir`` that continues ``tail``."""
    old = tail.segments
    try:
        segments = layout.list_segments(stream_dir)
    except FileNotFoundError:  # the stream's directory was removed
        segments = []
    segments = _without_unproven(stream_dir, segments, old)
    if not segments:
        return Followed(StreamTail([], 0, 0, SparseIndex()), list(old), not old)
    active = segments[-1]
    try:  # (a descriptor of its own: a cached one may belong to a file since replaced)
        fd = layout.open_segment(stream_dir, active)
    except FileNotFoundError:  # removed since the listing: nothing to add this time
        return Followed(tail, [])
    try:
        size = os.fstat(fd).st_size
        continued = _continues(stream_dir, segments, tail, fd, size)
        if continued and active == old[-1]:
            index, offset, first_id, last = tail.index, tail.active_size, tail.next_id, tail.last_frame
        else:
            index, offset, first_id, last = SparseIndex(), 0, active, None
        scan = scan_active(lambda off, n: os.pread(fd, n, off), offset, first_id, size, index, chunk)
    finally:
        os.close(fd)
    forget = [s for s in old if s < segments[0]] if continued else list(old)  # (truncated: oldest first)
    new = StreamTail(segments, scan.valid_end, scan.next_id, index, last_frame=scan.last or last)
    return Followed(new, forget, continued)


def _without_unproven(stream_dir: str, segments: List[int], viewed: List[int]) -> List[int]:
    """``segments`` less those new since the view (not in ``viewed``) that hold no valid frame
    and that the segment kept before them does not end right below (see the module's
    docstring). Every new one is looked at, not only the newest: a stray left out while it was
    the newest is in the middle once the writer rotates past it, and taken in there it would
    shadow the ids of the segment below it."""
    seen = set(viewed)
    kept = segments[:1]
    for start in segments[1:]:
        if start not in seen:
            try:
                if not (_holds_a_frame(stream_dir, start) or last_frame_ends_at(stream_dir, kept[-1], start)):
                    continue
            except FileNotFoundError:  # removed since the listing (a truncation): look again later
                continue
        kept.append(start)
    return kept


def _holds_a_frame(stream_dir: str, start: int) -> bool:
    """Whether the segment file starting at ``start`` begins with a valid frame of that id
    (read a header at a time: every new segment is looked at)."""
    fd = layout.open_segment(stream_dir, start)
    try:
        size = os.fstat(fd).st_size
        for _ in scan_frames(lambda off, n: os.pread(fd, n, off), 0, start, end=size, chunk=HEADER_SIZE):
            return True
        return False
    except ScanError:
        return False
    finally:
        os.close(fd)


def _continues(stream_dir: str, segments: List[int], tail: StreamTail, newest_fd: int, newest_size: int) -> bool:
    """Whether ``segments`` (the files now; the newest open as ``newest_fd``) continue ``tail``."""
    old = tail.segments
    if not old:
        return False
    last = old[-1]
    # what is present at or below the old active segment must be a suffix of the old view
    # (truncation removes the oldest first); everything above it is new
    below = [s for s in segments if s <= last]
    if below != old[len(old) - len(below):]:
        return False
    if not below:
        return True  # all of the old view truncated away: nothing left to compare
    if segments[-1] == last:
        return newest_size >= tail.active_size and _holds(newest_fd, tail)
    try:  # rotated since: the old active segment, now sealed, must be the file the view read
        fd = layout.open_segment(stream_dir, last)
    except FileNotFoundError:
        return False
    try:
        return os.fstat(fd).st_size >= tail.active_size and _holds(fd, tail)
    finally:
        os.close(fd)


def _holds(fd: int, tail: StreamTail) -> bool:
    """Whether the file still has the view's last frame header where the view found it."""
    if tail.last_frame is None:
        return True  # no frame taken from it: nothing the view holds can be wrong
    offset, header = tail.last_frame
    try:
        return parse_header(os.pread(fd, HEADER_SIZE, offset)) == header
    except FrameError:
        return False
