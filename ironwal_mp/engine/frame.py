"""Frame codec: bytes <-> frames, with no I/O (see docs/FORMAT.md, "Frames").

A frame is a 32-byte little-endian header followed by a payload. The payload, before optional
LZ4 compression, is the *batch encoding* of its entries: for each entry a u32 length then the
bytes. The CRC32 covers start id, count, type, disk size and the stored payload.
"""

from __future__ import annotations

import struct
import zlib
from typing import Iterable, List, NamedTuple, Sequence

import lz4.frame

MAGIC = 0x4C57414C  # "LAWL" on disk
HEADER = struct.Struct("<IIQIBII3x")
HEADER_SIZE = HEADER.size  # 32
#: the CRC-covered header fields, in order
CRC_FIELDS = struct.Struct("<QIBI")
LENGTH = struct.Struct("<I")
LENGTH_SIZE = LENGTH.size

TYPE_RAW = 0
TYPE_LZ4 = 1

MAX_U32 = 0xFFFFFFFF
#: largest stored payload a frame header can describe
MAX_PAYLOAD = MAX_U32
#: largest entry: with its u32 length prefix it must fit one payload
MAX_ENTRY = MAX_PAYLOAD - LENGTH_SIZE

assert HEADER_SIZE == 32


class FrameHeader(NamedTuple):
    magic: int
    crc: int
    start_id: int
    count: int
    type: int
    disk_size: int
    uncompressed_size: int

    @property
    def end_id(self) -> int:
        """The id after this frame's last entry."""
        return self.start_id + self.count

    @property
    def frame_size(self) -> int:
        return HEADER_SIZE + self.disk_size


class FrameError(ValueError):
    """Bytes that are not a valid frame (a torn write, garbage or bit rot)."""

    def __init__(self, reason: str, *, crc_expected: int = 0, crc_actual: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.crc_expected = crc_expected
        self.crc_actual = crc_actual

    @property
    def is_crc(self) -> bool:
        return self.crc_expected != self.crc_actual


# --- batch encoding ----------------------------------------------------------------------------


def encode_entries(entries: Iterable[bytes]) -> bytes:
    """The batch encoding of ``entries``: u32 length + bytes, for each."""
    pack = LENGTH.pack
    parts: List[bytes] = []
    append = parts.append
    for entry in entries:
        append(pack(len(entry)))
        append(entry)
    return b"".join(parts)


def entry_bounds(payload: bytes, count: int) -> Sequence[int]:
    """Where each of ``count`` batch-encoded entries starts (at its length prefix), then the
    payload's end; FrameError unless the entries fill the payload exactly. Copies nothing."""
    stride = _uniform_stride(payload, count)
    if stride:
        return range(0, len(payload) + 1, stride)
    bounds = [0]
    add = bounds.append
    unpack = LENGTH.unpack_from
    pos = 0
    try:
        for _ in range(count):
            pos += LENGTH_SIZE + unpack(payload, pos)[0]
            add(pos)
    except struct.error:  # a length prefix past the end (a walk past the end fails below)
        raise FrameError("entries run past the payload") from None
    if pos != len(payload):
        if pos > len(payload):
            raise FrameError("entries run past the payload")
        raise FrameError(f"payload has {len(payload) - pos} bytes after its {count} entries")
    return bounds


def _uniform_stride(payload: bytes, count: int) -> int:
    """``4 + n`` when the payload is ``count`` entries of ``n`` bytes each, else 0. Records of
    one size are common, and this checks every length prefix with four slices, not a loop."""
    if count <= 0 or len(payload) % count:
        return 0
    stride = len(payload) // count
    if stride < LENGTH_SIZE:
        return 0
    prefix = LENGTH.pack(stride - LENGTH_SIZE)
    for i in range(LENGTH_SIZE):
        if payload[i::stride] != prefix[i : i + 1] * count:
            return 0
    return stride


def decode_entries(payload: bytes, count: int) -> List[bytes]:
    """Split a batch encoding of ``count`` entries; raises FrameError if it does not add up."""
    payload = bytes(payload)
    bounds = entry_bounds(payload, count)
    return [payload[start + LENGTH_SIZE : end] for start, end in zip(bounds, bounds[1:])]


def entry_at(payload: bytes, count: int, index: int) -> bytes:
    """Entry ``index`` of a batch encoding of ``count`` entries, checked as :func:`decode_entries`
    checks, copying only that entry (a ``get`` from a large batch frame)."""
    bounds = entry_bounds(payload, count)
    return bytes(payload[bounds[index] + LENGTH_SIZE : bounds[index + 1]])


# --- frames ------------------------------------------------------------------------------------


def frame_crc(start_id: int, count: int, ftype: int, stored: bytes) -> int:
    return zlib.crc32(stored, zlib.crc32(CRC_FIELDS.pack(start_id, count, ftype, len(stored))))


def choose_payload(raw: bytes, compress: bool, min_compression_size: int) -> tuple[int, bytes]:
    """(type, stored payload): LZ4 only when enabled, large enough, and actually smaller."""
    if compress and len(raw) >= min_compression_size:
        packed = lz4.frame.compress(
            raw,
            block_size=lz4.frame.BLOCKSIZE_MAX64KB,
            block_linked=False,
            content_checksum=False,
            store_size=False,
        )
        if len(packed) < len(raw):
            return TYPE_LZ4, packed
    return TYPE_RAW, raw


def encode_frame(
    start_id: int,
    count: int,
    raw_payload: bytes,
    *,
    compress: bool = False,
    min_compression_size: int = 1024,
) -> bytes:
    """One complete frame (header + stored payload) for an already batch-encoded payload."""
    if len(raw_payload) > MAX_PAYLOAD:
        from ..errors import RecordTooLargeError

        raise RecordTooLargeError(len(raw_payload), MAX_PAYLOAD, "frame payload")
    ftype, stored = choose_payload(raw_payload, compress, min_compression_size)
    crc = frame_crc(start_id, count, ftype, stored)
    return HEADER.pack(MAGIC, crc, start_id, count, ftype, len(stored), len(raw_payload)) + stored


def parse_header(buf: bytes, offset: int = 0) -> FrameHeader:
    """Decode and sanity-check a header (not the CRC, which needs the payload)."""
    if len(buf) - offset < HEADER_SIZE:
        raise FrameError("partial header")
    header = FrameHeader._make(HEADER.unpack_from(buf, offset))
    if header.magic != MAGIC:
        raise FrameError(f"bad magic 0x{header.magic:08x}")
    if header.type not in (TYPE_RAW, TYPE_LZ4):
        raise FrameError(f"unknown frame type {header.type}")
    if header.count == 0:
        raise FrameError("frame with no entries")
    if header.type == TYPE_RAW and header.disk_size != header.uncompressed_size:
        raise FrameError("raw frame whose sizes disagree")
    # every entry needs at least its length prefix
    if header.uncompressed_size < header.count * LENGTH_SIZE:
        raise FrameError("payload too small for its entry count")
    return header


def check_payload(header: FrameHeader, stored: bytes) -> None:
    """Raise FrameError if ``stored`` is not the payload ``header`` describes."""
    if len(stored) != header.disk_size:
        raise FrameError("truncated payload")
    actual = frame_crc(header.start_id, header.count, header.type, stored)
    if actual != header.crc:
        raise FrameError("CRC32 mismatch", crc_expected=header.crc, crc_actual=actual)


def raw_payload(header: FrameHeader, stored: bytes) -> bytes:
    """The batch encoding held by a (CRC-checked) stored payload."""
    if header.type == TYPE_RAW:
        return stored
    try:
        raw = lz4.frame.decompress(stored)
    except RuntimeError as exc:  # lz4 reports corrupt input as RuntimeError
        raise FrameError(f"LZ4 payload does not decode: {exc}") from None
    if len(raw) != header.uncompressed_size:
        raise FrameError("LZ4 payload decodes to the wrong size")
    return raw


def decode_frame(header: FrameHeader, stored: bytes) -> List[bytes]:
    """Check and decode a frame's entries."""
    check_payload(header, stored)
    return decode_entries(raw_payload(header, stored), header.count)


def decode_frame_at(buf: bytes, offset: int = 0) -> tuple[FrameHeader, List[bytes]]:
    """Decode the whole frame that starts at ``offset`` of ``buf``."""
    header = parse_header(buf, offset)
    start = offset + HEADER_SIZE
    stored = bytes(buf[start : start + header.disk_size])
    return header, decode_frame(header, stored)


def frame_for_entries(
    start_id: int,
    entries: Sequence[bytes],
    *,
    compress: bool = False,
    min_compression_size: int = 1024,
) -> bytes:
    """Convenience: encode ``entries`` as one frame."""
    return encode_frame(
        start_id,
        len(entries),
        encode_entries(entries),
        compress=compress,
        min_compression_size=min_compression_size,
    )


__all__ = [
    "MAGIC",
    "HEADER",
    "HEADER_SIZE",
    "TYPE_RAW",
    "TYPE_LZ4",
    "FrameHeader",
    "FrameError",
    "encode_entries",
    "decode_entries",
    "entry_bounds",
    "entry_at",
    "encode_frame",
    "frame_for_entries",
    "parse_header",
    "check_payload",
    "raw_payload",
    "decode_frame",
    "decode_frame_at",
    "frame_crc",
    "choose_payload",
]

