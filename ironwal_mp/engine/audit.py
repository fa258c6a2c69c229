"""Read-only audit of a stream directory: every frame and index file checked, nothing changed.

Used by ``ironwal-mp inspect`` and ``verify``. Unlike recovery (which only scans the active
segment), an audit reads every segment, proves every CRC and LZ4 payload, checks that ids run
on without gaps from one segment to the next, and that the index files agree with the files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, List, Optional, TypeVar

from . import layout
from .frame import TYPE_LZ4
from .scanner import ScanError, scan_frames

T = TypeVar("T")


@dataclass
class Problem:
    path: str
    offset: Optional[int]
    reason: str
    #: an index file that disagrees with segment files that are there: recovery rewrites it
    #: from them and cuts nothing (``replay`` lets such a stopped WAL start)
    rebuildable: bool = False

    def __str__(self) -> str:
        where = f"{self.path}" + (f" at offset {self.offset}" if self.offset is not None else "")
        return f"{where}: {self.reason}"


@dataclass
class SegmentAudit:
    start_id: int
    path: str
    size: int
    frames: int = 0
    lz4_frames: int = 0
    entries: int = 0
    end_id: int = 0
    raw_bytes: int = 0  # uncompressed payload bytes
    valid_bytes: int = 0


@dataclass
class StreamAudit:
    name: str
    path: str
    segments: List[SegmentAudit] = field(default_factory=list)
    problems: List[Problem] = field(default_factory=list)
    side_files: List[str] = field(default_factory=list)

    @property
    def first_id(self) -> Optional[int]:
        return self.segments[0].start_id if self.segments else None

    @property
    def next_id(self) -> int:
        return self.segments[-1].end_id if self.segments else 0

    @property
    def entries(self) -> int:
        return sum(s.entries for s in self.segments)

    @property
    def frames(self) -> int:
        return sum(s.frames for s in self.segments)

    @property
    def disk_bytes(self) -> int:
        return sum(s.size for s in self.segments)

    @property
    def raw_bytes(self) -> int:
        return sum(s.raw_bytes for s in self.segments)


def _read_hint(read: Callable[[str], Optional[T]], stream_dir: str, path: str, audit: StreamAudit) -> Optional[T]:
    """A hint file's content, or None; one the system will not read (a directory, no
    permission, an I/O error) is reported, and the rest of the stream is still checked."""
    try:
        return read(stream_dir)
    except OSError as exc:
        audit.problems.append(Problem(path, None, f"unreadable: {exc.strerror or exc}"))
        return None


def audit_stream(
    stream_dir: str, chunk: int = 1 << 20, progress: Optional[Callable[[int], None]] = None
) -> StreamAudit:
    """Check every frame of every segment; ``progress(bytes)`` is called as bytes are read."""
    audit = StreamAudit(os.path.basename(stream_dir), stream_dir)
    starts = layout.list_segments(stream_dir)
    audit.side_files = sorted(n for n in os.listdir(stream_dir) if layout.BROKEN_SUFFIX in n)
    odd = layout.odd_segments(stream_dir)
    for path in odd:  # (not opened: a FIFO would wait for a writer)
        audit.problems.append(Problem(path, None, f"unreadable: {layout.NOT_REGULAR}"))
    idx_path = os.path.join(stream_dir, layout.SEGMENTS_IDX)
    head_path = os.path.join(stream_dir, layout.HEAD_STATE)
    idx = _read_hint(layout.read_segments_idx, stream_dir, idx_path, audit)
    head = _read_hint(layout.read_head_state, stream_dir, head_path, audit)
    told = {p.path for p in audit.problems}  # (a hint the system would not read is told once)
    lost = set(layout.lost_segments(starts, idx, head))
    if idx_path in told:
        pass
    elif not starts and idx:
        audit.problems.append(Problem(idx_path, None, f"lists segments {idx}, but no segment file exists "
                                                      "(the stream's files were removed)"))
    elif starts and idx is None:
        audit.problems.append(Problem(idx_path, None, "missing or unreadable", rebuildable=True))
    elif starts and idx != starts:
        # a crash mid-rotation leaves files the index does not list yet, and one mid-prune
        # leaves it listing files deleted oldest first; anything else listed and gone is lost
        audit.problems.append(Problem(idx_path, None, f"lists {idx}, the segment files are {starts}",
                                      rebuildable=not lost.intersection(idx)))
    if head_path in told:
        pass
    elif os.path.exists(head_path) and head is None:
        audit.problems.append(Problem(head_path, None, "unreadable", rebuildable=bool(starts)))
    elif starts and head is not None and head != starts[-1]:
        # behind the newest file: a crash mid-rotation; ahead of it: the newest file is gone
        audit.problems.append(Problem(head_path, None, f"names segment {head}, the newest is {starts[-1]}",
                                      rebuildable=head not in lost))
    elif len(starts) > 1 and head is None:
        audit.problems.append(Problem(head_path, None, "missing although the stream has rotated", rebuildable=True))
    for start in starts:
        path = os.path.join(stream_dir, layout.segment_name(start))
        if path in odd:
            continue
        try:
            fh = open(path, "rb")
        except OSError as exc:  # (a directory, a dangling link, no permission...)
            audit.problems.append(Problem(path, None, f"unreadable: {exc.strerror or exc}"))
            continue
        size = os.fstat(fh.fileno()).st_size  # (cannot fail on an open descriptor)
        seg = SegmentAudit(start, path, size, end_id=start)
        audit.segments.append(seg)
        with fh:
            fd = fh.fileno()
            try:
                for offset, header, _ in scan_frames(
                    lambda off, n: os.pread(fd, n, off), 0, start, end=size, chunk=chunk
                ):
                    seg.frames += 1
                    seg.lz4_frames += header.type == TYPE_LZ4
                    seg.entries += header.count
                    seg.raw_bytes += header.uncompressed_size
                    seg.end_id = header.end_id
                    seg.valid_bytes = offset + header.frame_size
                    if progress is not None:
                        progress(header.frame_size)
            except ScanError as exc:
                audit.problems.append(Problem(path, exc.offset, exc.error.reason))
                if progress is not None:
                    progress(size - seg.valid_bytes)
            except OSError as exc:  # (EIO reading it)
                audit.problems.append(Problem(path, seg.valid_bytes, f"unreadable: {exc.strerror or exc}"))
    read = {seg.start_id: seg for seg in audit.segments}  # (the files that could be opened)

    def clean_end(start: int) -> Optional[int]:
        seg = read.get(start)
        return seg.end_id if seg is not None and seg.valid_bytes == seg.size else None

    strays = set(layout.stray_segments(starts, lambda s: s not in read or read[s].frames > 0, clean_end))
    for start, following in zip(starts, starts[1:]):
        end = clean_end(start)
        if following in strays:  # what recovery refuses (ERROR) or sets aside (TRUNCATE)
            audit.problems.append(Problem(read[following].path, 0, f"stray segment: {layout.stray_reason(end)}"))
        elif end is not None and end != following:
            audit.problems.append(Problem(read[start].path, read[start].size,
                                          f"ends at id {end} but the next segment starts at {following}"))
    return audit
