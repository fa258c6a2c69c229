"""Names and small index files of a stream directory (see docs/FORMAT.md, "Stream directory").

Segment files are ``%020d.wal`` (the id of the segment's first entry). ``segments.idx`` lists the
segment start ids as u64s; ``head.state`` names the active segment. Both are hints that make
opening fast: the segment files themselves are the truth, and recovery rebuilds the hints from
them when they disagree.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import struct
from array import array
from typing import Callable, List, Optional, Sequence, Tuple

from ..errors import InvalidIdError, InvalidStreamNameError

SEGMENT_SUFFIX = ".wal"
SEGMENTS_IDX = "segments.idx"
HEAD_STATE = "head.state"
HEAD_STATE_VERSION = 1
BROKEN_SUFFIX = ".broken"

_SEGMENT_RE = re.compile(r"([0-9]{20})\.wal")  # ([0-9]: a str pattern's \d takes any Unicode digit)  # (fullmatch: "$" would also allow a trailing newline)
ID_LIMIT = 1 << 64  #: ids are u64: every id is below this


def check_id(value: object, name: str) -> None:
    """TypeError unless ``value`` is an int; InvalidIdError unless it is a u64 id."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not 0 <= value < ID_LIMIT:
        raise InvalidIdError(f"{name} must be in 0..2**64-1 (ids are u64), got {value}")


def check_flag(value: object, name: str) -> None:
    """TypeError unless ``value`` is True or False (a truthy object may be a misplaced argument)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, not {type(value).__name__}")


_STREAM_NAME_RE = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*")
MAX_STREAM_NAME = 200
#: files of a WAL root or stream directory that a stream may not be named after
_RESERVED_NAMES = {SEGMENTS_IDX, HEAD_STATE, "LOCK", "MANIFEST", "HEAD", "checkpoints.log"}
#: files of a WAL root, whose names with any suffix are never stream names
_ROOT_FILES = ("LOCK", "MANIFEST", "HEAD", "checkpoints.log")


def segment_name(start_id: int) -> str:
    return f"{start_id:020d}{SEGMENT_SUFFIX}"


def parse_segment_name(name: str) -> Optional[int]:
    match = _SEGMENT_RE.fullmatch(name)
    if match is None or int(match.group(1)) >= ID_LIMIT:
        return None
    return int(match.group(1))


def check_stream_name(name: object) -> str:
    """Return ``name`` if it is safe, unchanged, as a single directory name; else raise."""
    if not isinstance(name, str):
        raise TypeError(f"stream name must be str, not {type(name).__name__}")
    if not name:
        reason = "empty"
    elif len(name) > MAX_STREAM_NAME:
        reason = f"longer than {MAX_STREAM_NAME} characters"
    elif name in (".", ".."):
        reason = "a relative directory reference"
    elif "/" in name or "\\" in name or os.sep in name:
        reason = "contains a path separator"
    elif "\x00" in name:
        reason = "contains NUL"
    elif name.startswith("."):
        reason = "starts with '.'"
    elif not _STREAM_NAME_RE.fullmatch(name):
        reason = "only ASCII letters, digits, '_', '-' and '.' are allowed"
    elif name in _RESERVED_NAMES or any(name.startswith(f + ".") for f in _ROOT_FILES):
        reason = "reserved file name"  # (also a root file's temp and .broken copies)
    elif _SEGMENT_RE.fullmatch(name):  # (the root would look like a stream's directory)
        reason = "a segment file's name"
    else:
        return name
    raise InvalidStreamNameError(name, reason)


def is_stream_name(name: str) -> bool:
    try:
        check_stream_name(name)
    except (InvalidStreamNameError, TypeError):
        return False
    return True


# --- durable small-file helpers ------------------------------------------------------------------


def fsync_dir(path: str) -> None:
    """Make a directory's entries (creations, renames, unlinks) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: str) -> None:
    """``os.makedirs(path, exist_ok=True)``, with each directory it creates made durable (an
    fsync of its parent): a power loss must not take back a directory that files acknowledged
    as durable live in."""
    created = []
    level = os.path.abspath(path)
    while not os.path.lexists(level):
        created.append(level)
        parent = os.path.dirname(level)
        if parent == level:
            break
        level = parent
    os.makedirs(path, exist_ok=True)
    for new_dir in reversed(created):  # (another process may have made some: fsync anyway)
        fsync_dir(os.path.dirname(new_dir))


def write_file_atomic(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename, directory fsync."""
    commit_atomic(prepare_atomic(path, data), path)


def prepare_atomic(path: str, data: bytes) -> str:
    """First half of an atomic replace: write and fsync ``<path>.tmp``; return its path."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    return tmp


def commit_atomic(tmp: str, path: str) -> None:
    """Second half: rename the prepared file over ``path`` and make the rename durable."""
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# --- segments.idx --------------------------------------------------------------------------------


def encode_segments_idx(starts: Sequence[int]) -> bytes:
    return array("Q", starts).tobytes() if _LITTLE else struct.pack(f"<{len(starts)}Q", *starts)


def decode_segments_idx(data: bytes) -> Optional[List[int]]:
    """Start ids, or None when the file is not a valid ascending u64 array."""
    if len(data) % 8:
        return None
    starts = list(struct.unpack(f"<{len(data) // 8}Q", data))
    if any(b <= a for a, b in zip(starts, starts[1:])):
        return None
    return starts


def open_regular(path: str, why: str = "not a regular file") -> int:
    """A read-only descriptor of ``path``, which must be a regular file: else OSError (EINVAL,
    ``why``). Opened non-blocking, as a FIFO placed under a WAL file's name would make an
    ordinary open wait for a writer; that flag changes nothing for a regular file."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, why, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular_file(path: str) -> Optional[bytes]:
    """A WAL file's whole bytes (a hint, HEAD, checkpoints.log), None if it is absent; OSError
    (EINVAL) if it is not a regular file (see :func:`open_regular`)."""
    try:
        fd = open_regular(path)
    except FileNotFoundError:
        return None
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


def read_segments_idx(stream_dir: str) -> Optional[List[int]]:
    data = read_regular_file(os.path.join(stream_dir, SEGMENTS_IDX))
    return None if data is None else decode_segments_idx(data)


def write_segments_idx(stream_dir: str, starts: Sequence[int]) -> None:
    write_file_atomic(os.path.join(stream_dir, SEGMENTS_IDX), encode_segments_idx(starts))


def append_segments_idx(stream_dir: str, start: int) -> None:
    """Add one start id at the end (rotation), then fsync the file."""
    fd = os.open(os.path.join(stream_dir, SEGMENTS_IDX), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        write_all(fd, struct.pack("<Q", start))
        os.fsync(fd)
    finally:
        os.close(fd)


# --- head.state ----------------------------------------------------------------------------------


def encode_head_state(active_start: int) -> bytes:
    name = segment_name(active_start).encode("ascii")
    return bytes([HEAD_STATE_VERSION, len(name)]) + name


def decode_head_state(data: bytes) -> Optional[int]:
    """The active segment's start id, or None when the file is not valid."""
    if len(data) < 2 or data[0] != HEAD_STATE_VERSION or len(data) != 2 + data[1]:
        return None
    try:
        return parse_segment_name(data[2:].decode("ascii"))
    except UnicodeDecodeError:
        return None


def read_head_state(stream_dir: str) -> Optional[int]:
    data = read_regular_file(os.path.join(stream_dir, HEAD_STATE))
    return None if data is None else decode_head_state(data)


def write_head_state(stream_dir: str, active_start: int) -> None:
    write_file_atomic(os.path.join(stream_dir, HEAD_STATE), encode_head_state(active_start))


def lost_segments(starts: Sequence[int], idx: Optional[Sequence[int]], head: Optional[int]) -> List[int]:
    """Segments that ``segments.idx`` or ``head.state`` name, whose files are gone, and that
    truncation cannot have removed (it deletes the oldest first and never the active one). A
    crash cannot lose them either: a rotation creates the file before naming it. So their ids
    were lost outside ironwal_mp; rebuilding the hints would hide that."""
    named = set(idx or ()) | ({head} if head is not None else set())
    present = set(starts)
    return sorted(s for s in named if s not in present and (not starts or s > starts[0]))


def stray_segments(
    starts: Sequence[int], holds_frames: Callable[[int], bool], end_of: Callable[[int], Optional[int]]
) -> List[int]:
    """The newest segments (newest first) that hold no frame and do not start at the id where
    the segment before them ends: a rotation names the new file exactly one past the previous
    segment's last id, so such a file was placed from outside (a bad copy, a restore mixing two
    backups), and taking it for the active one would make ids jump or repeat. ``end_of(start)``
    is the id after a segment's last frame, or None when its frames do not run cleanly to the
    end of its file (damage in a sealed segment is not judged here). Only an empty newest
    segment is checked, so a caller reads the one before it only in that rare case."""
    strays: List[int] = []
    for i in range(len(starts) - 1, 0, -1):
        if holds_frames(starts[i]):
            break
        end = end_of(starts[i - 1])
        if end is None or end == starts[i]:
            break
        strays.append(starts[i])
    return strays


def stray_reason(end: int) -> str:
    """Why a segment that :func:`stray_segments` found is refused or set aside."""
    return (f"no frame in it, and the segment before it ends at id {end}, where a rotation would have "
            "started the next one; placed from outside (a bad copy, a restore mixing two backups)")


def list_segments(stream_dir: str) -> List[int]:
    """Start ids of the entries named like segment files, ascending (:func:`odd_segments`
    tells which of them are not regular files)."""
    return sorted(start for start, _ in _segment_entries(stream_dir))


#: why an entry that :func:`odd_segments` names is refused
NOT_REGULAR = ("named like a segment but not a regular file (a directory, FIFO, socket, device or "
               "dangling link): remove or rename it")


def open_segment(stream_dir: str, start: int) -> int:
    """A read-only descriptor of its own for a segment file; OSError (EINVAL, naming it) if the
    name is not a regular file, which must be refused, never waited on."""
    return open_regular(os.path.join(stream_dir, segment_name(start)), NOT_REGULAR)


def odd_segments(stream_dir: str) -> List[str]:
    """Paths of the entries named like segments that are not regular files (placed from
    outside). Recovery refuses one it must read and the audit reports them all: opening a FIFO
    to read it would wait for a writer that never comes."""
    return sorted(os.path.join(stream_dir, segment_name(start))
                  for start, regular in _segment_entries(stream_dir) if not regular)


def _segment_entries(stream_dir: str) -> List[Tuple[int, bool]]:
    out = []
    with os.scandir(stream_dir) as entries:
        for entry in entries:
            start = parse_segment_name(entry.name)
            if start is not None:
                out.append((start, entry.is_file()))  # (follows a link: one to a file is a file)
    return out


def side_file_path(path: str) -> str:
    """A fresh ``<path>.broken`` (numbered if one exists) to keep bytes recovery cut off."""
    candidate = path + BROKEN_SUFFIX
    n = 1
    while os.path.exists(candidate):
        candidate = f"{path}{BROKEN_SUFFIX}.{n}"
        n += 1
    return candidate


_LITTLE = struct.pack("=H", 1) == struct.pack("<H", 1) and array("Q").itemsize == 8
