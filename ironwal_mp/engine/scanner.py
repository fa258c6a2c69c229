"""Walks the frames of one segment file, reading it in chunks.

Recovery, index building and reads all go through :func:`scan_frames`, so "what is a valid
frame" is decided in one place: a parseable header, the expected start id (ids are contiguous),
a complete payload and a matching CRC.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Tuple

from .frame import HEADER_SIZE, MAGIC, TYPE_LZ4, FrameError, FrameHeader, check_payload, parse_header, raw_payload

#: read(offset, size) -> up to ``size`` bytes at ``offset`` (fewer at end of file)
ReadFn = Callable[[int, int], bytes]


class ScanError(Exception):
    """Scanning stopped at ``offset`` because the bytes there are not a valid next frame."""

    def __init__(self, offset: int, error: FrameError) -> None:
        super().__init__(f"offset {offset}: {error.reason}")
        self.offset = offset
        self.error = error


def scan_frames(
    read: ReadFn,
    offset: int,
    expected_start: Optional[int],
    *,
    end: int,
    chunk: int = 128 * 1024,
    verify: bool = True,
    decode_lz4: bool = True,
) -> Iterator[Tuple[int, FrameHeader, bytes]]:
    """Yield ``(offset, header, stored_payload)`` for each valid frame from ``offset``.

    Stops quietly at ``end`` (the file size, or a bound a reader must not pass; knowing it keeps
    a garbage length from causing a huge read). Raises :class:`ScanError` at the first
    bytes that are not a valid frame: a partial header or payload counts as invalid, so a torn
    tail is reported, not skipped. ``expected_start`` (if given) is the id the first frame must
    start at; later frames must continue without gaps. ``verify`` checks each frame's CRC and,
    with ``decode_lz4``, that an LZ4 frame decodes (its uncompressed size is not CRC-covered).
    Whoever walks from frame to frame by their sizes verifies: a damaged size field would
    otherwise land inside a payload, where the user's bytes may look like a valid next frame.
    """
    buf = b""
    buf_off = offset  # file offset of buf[0]
    pos = offset
    expected = expected_start

    def fill(need: int) -> bool:
        """Make buf cover [pos, pos+need); False when the data ends sooner."""
        nonlocal buf, buf_off
        if buf_off + len(buf) - pos >= need:
            return True
        want = min(max(need, chunk), end - pos)
        buf = read(pos, want) if want > 0 else b""
        buf_off = pos
        return len(buf) >= need

    while pos < end:
        if not fill(HEADER_SIZE):
            if buf_off == pos and not buf:
                return  # clean end of data
            raise ScanError(pos, FrameError("partial header"))
        rel = pos - buf_off
        try:
            header = parse_header(buf, rel)
        except FrameError as exc:
            raise ScanError(pos, exc) from None
        if expected is not None and header.start_id != expected:
            raise ScanError(
                pos, FrameError(f"frame starts at id {header.start_id}, expected {expected}")
            )
        size = HEADER_SIZE + header.disk_size
        if not fill(size):
            raise ScanError(pos, FrameError("truncated payload"))
        rel = pos - buf_off
        stored = buf[rel + HEADER_SIZE : rel + size]
        if verify:
            try:
                check_payload(header, stored)
                if decode_lz4 and header.type == TYPE_LZ4:
                    # the uncompressed size is not CRC-covered: prove the frame decodes
                    raw_payload(header, stored)
            except FrameError as exc:
                raise ScanError(pos, exc) from None
        yield pos, header, stored
        pos += size
        expected = header.start_id + header.count


#: how far back from a file's end :func:`tail_frame` looks (a sharded worker's frames, one per
#: run of ring records, can be as large as a 1 MiB default ring)
TAIL_WINDOWS = (64 * 1024, 4 * 1024 * 1024)
_MAGIC_BYTES = MAGIC.to_bytes(4, "little")


def tail_frame(read: ReadFn, size: int, windows: Tuple[int, ...] = TAIL_WINDOWS) -> Optional[FrameHeader]:
    """A valid frame ending exactly at ``size``, found by searching back from the end for its
    header rather than walking every frame before it; None if none starts in the last
    ``windows[-1]`` bytes.

    Not proof of where a segment's last frame is: an entry may itself hold a frame's bytes, and
    then the innermost one is found. A caller uses the answer only to confirm the end it expects
    and walks the file (:func:`scan_frames`) whenever it does not.
    """
    searched = 0
    for window in windows:
        lo = max(0, size - window)
        buf = read(lo, size - lo)
        if len(buf) != size - lo:
            return None  # (the file changed under us)
        # candidates start below ``limit`` (those in the part a smaller window searched were
        # tried already); the search may overlap the last one tried ("LAWLAWL")
        limit = len(buf) - searched
        while True:
            pos = buf.rfind(_MAGIC_BYTES, 0, limit + len(_MAGIC_BYTES) - 1)
            if pos < 0:
                break
            limit = pos
            try:
                header = parse_header(buf, pos)
                if lo + pos + HEADER_SIZE + header.disk_size == size:
                    stored = buf[pos + HEADER_SIZE :]
                    check_payload(header, stored)
                    if header.type == TYPE_LZ4:
                        raw_payload(header, stored)
                    return header
            except FrameError:
                pass
        if lo == 0:
            return None
        searched = size - lo
    return None
