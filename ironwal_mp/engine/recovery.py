"""Opening a stream: find its segments and active tail, and repair what a crash left behind.

The segment files are the truth. ``segments.idx`` and ``head.state`` are rebuilt from them when
they are missing, unreadable or disagree; when they name a segment that is gone and was not
truncated away, its ids were lost, which is refused under ``CorruptionPolicy.ERROR`` and
reported otherwise. Only the active (last) segment is scanned: sealed
segments were fsynced before the stream rotated past them. When the active segment holds no
frame, the one before it is read too, to prove that the empty file starts where it ends (its
last frame, found from the end, usually proves it; else it is scanned); an
empty file that does not was placed from outside (``layout.stray_segments``): it is refused
under ``CorruptionPolicy.ERROR`` and set aside as ``<segment>.wal.broken`` otherwise. A torn or
corrupt tail of the active segment is cut at the last valid frame; the cut bytes are first
copied to a ``<segment>.wal.broken`` side file and fsynced, so nothing is silently deleted.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import CorruptionError
from ..options import CorruptionPolicy
from . import layout
from .frame import FrameHeader
from .scanner import ReadFn, ScanError, scan_frames, tail_frame
from .sparse_index import SparseIndex


@dataclass
class RecoveryReport:
    """What opening a stream found and changed (empty ``actions``: nothing to repair)."""

    stream_dir: str
    actions: List[str] = field(default_factory=list)
    cut_offset: Optional[int] = None
    cut_bytes: int = 0
    cut_reason: Optional[str] = None
    side_file: Optional[str] = None
    #: where stray empty segments were moved (see ``layout.stray_segments``)
    set_aside: List[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.actions)


@dataclass
class StreamTail:
    """The state a writer resumes from."""

    segments: List[int]  # start ids, ascending; the last is the active segment
    active_size: int  # valid bytes in the active segment
    next_id: int
    index: SparseIndex  # sparse index of the active segment
    active_frames: int = 0
    #: (offset, header) of the active segment's last valid frame: tells a follower that the
    #: file still holds what it saw (see follow.py)
    last_frame: Optional[Tuple[int, FrameHeader]] = None


def _lost_ids(lost: Sequence[int], segments: Sequence[int]) -> Tuple[str, str]:
    """What the loss of segments ``lost`` (named by the hints, their files gone) costs, and what
    becomes of their ids: a writer resumes after the newest file left, so ids past it are given
    out again, while ids below a file still there stay a gap that reads refuse."""
    first = lost[0]
    name = layout.segment_name(first)
    later = [s for s in segments if s > first]
    if not later:
        return (f"segment {name} is named by segments.idx or head.state but is gone: ids from "
                f"{first} on were lost (removed outside ironwal_mp, or by the disk)",
                "those ids are given out again")
    what = (f"segment {name} is named by segments.idx or head.state but is gone: ids {first} to "
            f"{later[0] - 1} were lost (removed outside ironwal_mp, or by the disk)")
    fate = "those ids stay a gap: reading them raises CorruptionError"
    past = [s for s in lost if s > segments[-1]]
    if past:  # (the newest file went too: what followed the last file left is reissued)
        what += f", and segment {layout.segment_name(past[0])} is gone too: ids from {past[0]} on were lost"
        fate += f"; ids from {past[0]} on are given out again"
    return what, fate


def recover_stream(
    stream_dir: str,
    policy: CorruptionPolicy = CorruptionPolicy.TRUNCATE,
    *,
    repair: bool = True,
    chunk: int = 128 * 1024,
) -> tuple[StreamTail, RecoveryReport]:
    """Work out where ``stream_dir`` ends, repairing it unless ``repair`` is False.

    With ``repair=False`` nothing is written; the report says what repair would do. With
    ``CorruptionPolicy.ERROR`` a bad tail, a lost segment or a stray one raises
    :class:`CorruptionError` instead.
    """
    report = RecoveryReport(stream_dir)
    segments = layout.list_segments(stream_dir)
    # the newest two are the ones recovery reads; an older one that is not a regular file fails
    # only the reads of its ids (under every policy: nothing here may set it aside, and reading
    # a FIFO would block)
    for start in reversed(segments[-2:]):
        path = os.path.join(stream_dir, layout.segment_name(start))
        if not os.path.isfile(path):
            raise OSError(errno.EINVAL, layout.NOT_REGULAR, path)
    listed = layout.read_segments_idx(stream_dir)
    head = layout.read_head_state(stream_dir)
    lost = layout.lost_segments(segments, listed, head)
    if lost:
        what, fate = _lost_ids(lost, segments)
        if policy is CorruptionPolicy.ERROR:
            raise CorruptionError(os.path.join(stream_dir, layout.segment_name(lost[0])), 0,
                                  f"{what}; restore {'them' if len(lost) > 1 else 'it'}, or open with CorruptionPolicy.TRUNCATE to accept "
                                  f"the loss ({fate})")
        report.actions.append(f"{what}; {fate}")
    if not segments:
        # hints naming files that are all gone would report (or, under ERROR, refuse) the same
        # loss again at every open, after new entries were written
        stale = [n for n in (layout.SEGMENTS_IDX, layout.HEAD_STATE) if os.path.lexists(os.path.join(stream_dir, n))]
        if stale:
            report.actions.append(f"removed {' and '.join(stale)}: no segment file is left for them to name")
            if repair:
                for name in stale:
                    os.unlink(os.path.join(stream_dir, name))
                layout.fsync_dir(stream_dir)
        return StreamTail([], 0, 0, SparseIndex()), report

    scans: Dict[int, Tuple[ActiveScan, SparseIndex, int]] = {}  # each segment scanned at most once

    def scanned(start: int) -> ActiveScan:
        if start not in scans:
            scans[start] = _scan_segment(stream_dir, start, chunk)
        return scans[start][0]

    following = dict(zip(segments, segments[1:]))

    def clean_end(start: int) -> Optional[int]:
        # a rotation's own empty segment is confirmed by the last frame before it, found from
        # the file's end; the whole segment is walked only when that does not confirm it
        if start not in scans and last_frame_ends_at(stream_dir, start, following.get(start)):
            return following[start]
        scan = scanned(start)
        return scan.next_id if scan.problem is None else None

    strays = layout.stray_segments(segments, lambda s: scanned(s).frames > 0, clean_end)
    aside: List[Tuple[str, str]] = []  # (stray segment, where it is kept)
    if strays:
        segments = segments[: -len(strays)]
        end = scanned(segments[-1]).next_id
        names = ", ".join(layout.segment_name(s) for s in reversed(strays))
        what = f"stray segment{'s' if len(strays) > 1 else ''} {names}: {layout.stray_reason(end)}"
        if policy is CorruptionPolicy.ERROR:
            raise CorruptionError(os.path.join(stream_dir, layout.segment_name(strays[-1])), 0,
                                  f"{what}; remove it, or open with CorruptionPolicy.TRUNCATE to set it aside "
                                  f"(ids then go on from {end})")
        for start in reversed(strays):
            path = os.path.join(stream_dir, layout.segment_name(start))
            aside.append((path, layout.side_file_path(path)))
        kept = ", ".join(os.path.basename(side) for _, side in aside)
        report.actions.append(f"set aside {what}; kept as {kept}; ids go on from {end}")
        report.set_aside = [side for _, side in aside]

    active = segments[-1]
    scanned(active)  # (stray_segments may have scanned it already)
    scan, index, size = scans[active]
    problem, valid_end, next_id, frames = scan.problem, scan.valid_end, scan.next_id, scan.frames
    path = os.path.join(stream_dir, layout.segment_name(active))
    if problem is not None and policy is CorruptionPolicy.ERROR:
        # refuse before touching anything
        raise CorruptionError(path, problem.offset, problem.error.reason)
    rebuild_idx = listed != segments
    head_present = os.path.exists(os.path.join(stream_dir, layout.HEAD_STATE))
    # absent is fine before the first rotation (the crate writes it on rotation); unreadable is not
    rebuild_head = head != active and (head_present or len(segments) > 1)
    if rebuild_idx:
        report.actions.append("rebuilt segments.idx from the segment files")
    if rebuild_head:
        report.actions.append("rebuilt head.state from the segment files")
    if problem is not None:
        report.cut_offset = problem.offset
        report.cut_bytes = size - problem.offset
        report.cut_reason = problem.error.reason
        report.actions.append(
            f"cut {size - problem.offset} bytes from {layout.segment_name(active)} at offset "
            f"{problem.offset} ({problem.error.reason})"
        )
    if repair:
        fd = os.open(path, os.O_RDWR)
        try:
            # hints first: a crash before the strays are set aside leaves hints that do not name
            # them (found again on the next open), never hints naming files that are gone
            if rebuild_idx:
                layout.write_segments_idx(stream_dir, segments)
            if rebuild_head:
                layout.write_head_state(stream_dir, active)
            if aside:
                for stray, side in aside:
                    os.rename(stray, side)
            if problem is not None:
                report.side_file = _keep_aside(fd, path, problem.offset, size)
                os.ftruncate(fd, problem.offset)
            # what a crashed process left in the page cache is durable from now on: the tail,
            # and the segments' names (a writer killed while creating one left it unsynced, and
            # no later append would sync it; the stream's own name is the Wal's open's to sync)
            os.fsync(fd)
            layout.fsync_dir(stream_dir)
        finally:
            os.close(fd)
    return StreamTail(segments, valid_end, next_id, index, frames, scan.last), report


def last_frame_ends_at(stream_dir: str, start: int, end: Optional[int]) -> bool:
    """Whether the segment starting at ``start`` ends with a valid frame whose last id is just
    below ``end`` (a guess that may miss, never a proof against: see ``tail_frame``)."""
    if end is None:
        return False
    fd = layout.open_segment(stream_dir, start)
    try:
        header = tail_frame(lambda off, n: os.pread(fd, n, off), os.fstat(fd).st_size)
    finally:
        os.close(fd)
    return header is not None and header.start_id + header.count == end


def _scan_segment(stream_dir: str, start: int, chunk: int) -> Tuple[ActiveScan, SparseIndex, int]:
    """(scan, sparse index, file size) of one segment, scanned as an active segment is."""
    fd = layout.open_segment(stream_dir, start)
    try:
        size = os.fstat(fd).st_size
        index = SparseIndex()
        return scan_active(lambda off, n: os.pread(fd, n, off), 0, start, size, index, chunk), index, size
    finally:
        os.close(fd)


@dataclass
class ActiveScan:
    """Where the valid frames of an active segment end, and why they end there."""

    valid_end: int  # offset just past the last valid frame
    next_id: int  # the id after the last valid frame
    frames: int  # valid frames walked over
    problem: Optional[ScanError]  # None: the data ended cleanly at ``valid_end``
    last: Optional[Tuple[int, FrameHeader]] = None  # (offset, header) of the last valid frame


def scan_active(
    read: ReadFn, offset: int, first_id: int, size: int, index: SparseIndex, chunk: int
) -> ActiveScan:
    """Walk the valid frames of an active segment from ``offset`` (where id ``first_id``
    starts) up to ``size`` bytes, adding each to ``index``; stop at the first invalid one."""
    scan = ActiveScan(offset, first_id, 0, None)
    try:
        for off, header, _ in scan_frames(read, offset, first_id, end=size, chunk=chunk):
            index.add(header.start_id, off)
            scan.next_id = header.start_id + header.count
            scan.valid_end = off + header.frame_size
            scan.frames += 1
            scan.last = (off, header)
    except ScanError as exc:
        scan.problem = exc
    return scan


def _keep_aside(fd: int, path: str, offset: int, size: int) -> str:
    """Copy bytes [offset, size) of ``fd`` to a new side file, durably; return its path."""
    side = layout.side_file_path(path)
    out = os.open(side, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        pos = offset
        while pos < size:
            data = os.pread(fd, min(1 << 20, size - pos), pos)
            if not data:
                break
            layout.write_all(out, data)
            pos += len(data)
        os.fsync(out)
    except BaseException:
        # a part copy would pass for cut bytes (and fill a full disk further); nothing was cut
        os.close(out)
        os.unlink(side)
        raise
    os.close(out)
    layout.fsync_dir(os.path.dirname(path))
    return side
