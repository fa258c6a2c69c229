"""The sharded root's checkpoint records: ``checkpoints.log`` and ``HEAD``.

Byte layout (ironwal 0.6 compatible, all integers little-endian)::

    record  = b"CKPT" | crc32(payload) u32 | len(payload) u32 | payload
    payload = version u8 (=1) | id length u16 | id | timestamp u64 (ns since the epoch)
              | shard count u16 | one u64 per shard (the shard's next id at the checkpoint)
    HEAD    = id length u16 | id

The first half of this module is a pure codec (bytes in, values out, no I/O). The second half,
:class:`CheckpointLog`, owns the two files of one root directory:

* On open the log is scanned. A torn or corrupt tail is cut at the end of the last valid record;
  the cut bytes are first copied to a ``checkpoints.log.broken`` side file and fsynced, so nothing
  is deleted silently. With ``repair=False`` nothing is written: the problem is only reported,
  and appends are refused while it stands (they would land behind the bad bytes).
* A repairing open makes what it read durable (the log, ``HEAD`` and their names), so that a
  record a killed process left in the page cache cannot be read as existing and then vanish.
* ``HEAD`` is the commit point for :meth:`CheckpointLog.latest`. A missing or corrupt ``HEAD``,
  or one naming an id that has no record, falls back to the last record in the log (and, when
  repairing, ``HEAD`` is rewritten to say so).
* Duplicate ids. This library never writes the same id twice (:meth:`CheckpointLog.append`
  raises :class:`CheckpointExistsError`), but a log written by the Rust crate may hold one id
  more than once, because the crate silently shadows the earlier record. Such a log is read as
  it is, nothing is cut: :meth:`~CheckpointLog.get` (and ``latest()`` through ``HEAD``) returns
  the *later* record, while :meth:`~CheckpointLog.list` and ``len()`` count every record,
  shadowed ones included. The report lists the duplicated ids.
* An empty id is not a valid checkpoint id here, so a record holding one is treated as
  corrupt (the crate has no reason to write one; ``ShardedWal`` never does).
"""

from __future__ import annotations

import errno
import os
import struct
import threading
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple

from ..errors import (
    CheckpointCorruptedError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConfigError,
    InvalidCheckpointIdError,
    NoCheckpointsError,
    WalIOError,
    io_error,
)
from ..options import GroupSync
from . import layout
from .group_sync import sync_files, syncfs_device

CHECKPOINTS_LOG = "checkpoints.log"
HEAD = "HEAD"

RECORD_MAGIC = b"CKPT"
RECORD_VERSION = 1
RECORD_HEADER = struct.Struct("<4sII")  # magic, crc32(payload), payload length
RECORD_HEADER_SIZE = RECORD_HEADER.size  # 12

MAX_ID_LEN = 0xFFFF
MAX_SHARDS = 0xFFFF
MAX_U64 = 0xFFFFFFFFFFFFFFFF

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U64 = struct.Struct("<Q")
_HEAD_LEN = _U16

#: payload bytes besides the id and the offsets: version, id length, timestamp, shard count
_PAYLOAD_FIXED = 1 + 2 + 8 + 2
#: the largest payload a record can describe; a longer stated length is corruption, not a tear
MAX_PAYLOAD = _PAYLOAD_FIXED + MAX_ID_LEN + 8 * MAX_SHARDS


# --- values --------------------------------------------------------------------------------------


def check_keep_latest_n(value: object) -> None:
    """TypeError unless ``value`` is an int; ConfigError unless it is at least 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"keep_latest_n must be an int, not {type(value).__name__}")
    if value < 1:
        raise ConfigError("keep_latest_n", f"must be at least 1, got {value}")


def check_checkpoint_id(user_id: object) -> bytes:
    """Return ``user_id`` as ``bytes`` if it is a valid checkpoint id; else raise.

    Accepts ``bytes``, ``bytearray`` and ``memoryview``. Anything else (``str`` included: encode
    it yourself) raises ``TypeError``; empty ids and ids over 65535 bytes raise
    :class:`InvalidCheckpointIdError`.
    """
    if isinstance(user_id, bytes):
        value = user_id
    elif isinstance(user_id, (bytearray, memoryview)):
        value = bytes(user_id)
    elif isinstance(user_id, str):
        raise TypeError("checkpoint id must be bytes, not str (encode it, e.g. with .encode())")
    else:
        raise TypeError(f"checkpoint id must be bytes, not {type(user_id).__name__}")
    if not value:
        raise InvalidCheckpointIdError("checkpoint id must not be empty")
    if len(value) > MAX_ID_LEN:
        raise InvalidCheckpointIdError(
            f"checkpoint id of {len(value)} bytes exceeds the limit of {MAX_ID_LEN} bytes"
        )
    return value


@dataclass(frozen=True)
class CheckpointData:
    """One checkpoint record.

    ``offsets[s]`` is shard ``s``'s next id at the checkpoint; ``shard_count`` must equal
    ``len(offsets)``. ``user_id`` may be given as bytes-like and is stored as ``bytes``;
    ``offsets`` may be any sequence and is stored as a tuple.
    """

    user_id: bytes
    timestamp: int
    shard_count: int
    offsets: Tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "user_id", check_checkpoint_id(self.user_id))
        offsets = tuple(self.offsets)
        object.__setattr__(self, "offsets", offsets)
        _check_uint("timestamp", self.timestamp, MAX_U64)
        _check_uint("shard_count", self.shard_count, MAX_SHARDS)
        if self.shard_count != len(offsets):
            raise ValueError(
                f"shard_count is {self.shard_count} but {len(offsets)} offsets were given"
            )
        for s, off in enumerate(offsets):
            _check_uint(f"offsets[{s}]", off, MAX_U64)


def _check_uint(name: str, value: object, limit: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be int, not {type(value).__name__}")
    if not 0 <= value <= limit:
        raise ValueError(f"{name} must be in 0..{limit}, got {value}")


# --- codec (pure) --------------------------------------------------------------------------------


def encode_payload(data: CheckpointData) -> bytes:
    uid = data.user_id
    return b"".join(
        (
            _U8.pack(RECORD_VERSION),
            _U16.pack(len(uid)),
            uid,
            _U64.pack(data.timestamp),
            _U16.pack(data.shard_count),
            struct.pack(f"<{data.shard_count}Q", *data.offsets),
        )
    )


def encode_record(data: CheckpointData) -> bytes:
    """The bytes of one ``checkpoints.log`` record for ``data``."""
    payload = encode_payload(data)
    return RECORD_HEADER.pack(RECORD_MAGIC, zlib.crc32(payload), len(payload)) + payload


def decode_payload(payload: bytes) -> CheckpointData:
    """Parse one record payload; ``ValueError`` (with a reason) if it is not exactly one."""
    n = len(payload)
    if n < 1:
        raise ValueError("empty payload")
    version = payload[0]
    if version != RECORD_VERSION:
        raise ValueError(f"unknown record version {version}")
    if n < 3:
        raise ValueError("payload too short for the id length")
    (id_len,) = _U16.unpack_from(payload, 1)
    if id_len == 0:
        raise ValueError("empty checkpoint id")
    pos = 3 + id_len
    if n < pos + 10:
        raise ValueError("payload too short for its id, timestamp and shard count")
    user_id = bytes(payload[3:pos])
    (timestamp,) = _U64.unpack_from(payload, pos)
    (shard_count,) = _U16.unpack_from(payload, pos + 8)
    pos += 10
    expected = pos + 8 * shard_count
    if n != expected:
        raise ValueError(
            f"payload is {n} bytes but its id and {shard_count} shards make {expected}"
        )
    offsets = struct.unpack_from(f"<{shard_count}Q", payload, pos)
    return CheckpointData(user_id, timestamp, shard_count, offsets)


def decode_records(buf: bytes) -> Tuple[List[CheckpointData], int, Optional[str]]:
    """Decode the records at the start of ``buf``.

    Returns ``(records, valid_end, problem)``: every record before the first torn or invalid
    one, the offset just past the last of them, and ``None`` if ``buf`` ends exactly there, or
    else a short reason describing what is wrong at ``valid_end``.
    """
    view = memoryview(buf).cast("B") if not isinstance(buf, bytes) else buf
    size = len(view)
    records: List[CheckpointData] = []
    pos = 0
    while pos < size:
        if size - pos < RECORD_HEADER_SIZE:
            n = min(size - pos, len(RECORD_MAGIC))
            if bytes(view[pos : pos + n]) != RECORD_MAGIC[:n]:
                return records, pos, f"bad record magic {bytes(view[pos : pos + n])!r}"
            return records, pos, f"torn record header ({size - pos} of {RECORD_HEADER_SIZE} bytes)"
        magic, crc, length = RECORD_HEADER.unpack_from(view, pos)
        if magic != RECORD_MAGIC:
            return records, pos, f"bad record magic {bytes(magic)!r}"
        if length > MAX_PAYLOAD:
            return records, pos, f"payload length {length} exceeds the maximum {MAX_PAYLOAD}"
        start = pos + RECORD_HEADER_SIZE
        if size - start < length:
            return records, pos, f"torn record payload ({size - start} of {length} bytes)"
        payload = bytes(view[start : start + length])
        actual = zlib.crc32(payload)
        if actual != crc:
            return records, pos, f"CRC32 mismatch (stored 0x{crc:08x}, computed 0x{actual:08x})"
        try:
            records.append(decode_payload(payload))
        except ValueError as exc:
            return records, pos, f"invalid record payload: {exc}"
        pos = start + length
    return records, pos, None


def encode_head(user_id: bytes) -> bytes:
    """The bytes of a ``HEAD`` file naming ``user_id``."""
    uid = check_checkpoint_id(user_id)
    return _HEAD_LEN.pack(len(uid)) + uid


def decode_head(buf: bytes) -> Optional[bytes]:
    """The id ``HEAD`` names, or ``None`` if ``buf`` is not exactly one non-empty id."""
    if len(buf) < 2:
        return None
    (n,) = _HEAD_LEN.unpack_from(buf, 0)
    if n == 0 or len(buf) != 2 + n:
        return None
    return bytes(buf[2:])


# --- the files -----------------------------------------------------------------------------------


@dataclass
class CheckpointLogReport:
    """What opening a checkpoint log found and changed (empty ``actions``: all was well)."""

    log_path: str
    records: int = 0
    actions: List[str] = field(default_factory=list)
    #: where the log was (or, with repair=False, would be) cut; None if nothing was cut
    cut_offset: Optional[int] = None
    cut_bytes: int = 0
    cut_reason: Optional[str] = None
    #: the index in ``actions`` of the one that tells of the cut (or the damage, unrepaired)
    cut_action: Optional[int] = None
    side_file: Optional[str] = None
    #: complete, CRC-valid records found in the cut bytes (kept in the side file, not loaded)
    stranded_records: int = 0
    #: "ok", "missing", "corrupt" or "dangling" (names an id with no record)
    head_status: str = "missing"
    head_id: Optional[bytes] = None
    duplicate_ids: List[bytes] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.actions)


class CheckpointLog:
    """``<root>/checkpoints.log`` and ``<root>/HEAD``, loaded in memory, safe across threads.

    See the module docstring for repair, ``HEAD`` fallback and duplicate-id rules.
    """

    def __init__(self, root: str, *, repair: bool = True, group_sync: GroupSync = GroupSync.SYNCFS) -> None:
        if not os.path.isdir(root):
            raise WalIOError(f"checkpoint root {root} is not a directory", errno.ENOENT, root)
        self.root = root
        self.log_path = os.path.join(root, CHECKPOINTS_LOG)
        self.head_path = os.path.join(root, HEAD)
        self.repair = repair
        self._lock = threading.Lock()
        self._records: List[CheckpointData] = []
        self._by_id: Dict[bytes, CheckpointData] = {}
        self._head: Optional[bytes] = None  # the id HEAD names on disk, if HEAD is valid
        self._size = 0  # bytes of the log file on disk
        self._bad_tail: Optional[Tuple[int, str]] = None  # unrepaired problem (repair=False)
        self._stranded_ids: Set[bytes] = set()  # ids of intact records past it (repair=False)
        self._head_stranded: Optional[bytes] = None  # HEAD names one of them
        self._failed: Optional[str] = None
        self._group_sync = group_sync
        self._use_syncfs: Optional[bool] = None  # decided at the first append
        self._prepared: Optional[PreparedHead] = None  # the HEAD.tmp not yet appended or discarded
        self.report = CheckpointLogReport(self.log_path)
        self._open()
        if repair:
            self._make_durable_as_read()

    # --- opening ---------------------------------------------------------------------------

    def _open(self) -> None:
        report = self.report
        if self.repair:
            for leftover in (self.log_path + ".tmp", self.head_path + ".tmp"):
                if os.path.exists(leftover):
                    os.unlink(leftover)
                    report.actions.append(f"removed {os.path.basename(leftover)} left by a crash")
        # HEAD before the log: a commit writes its record before it renames HEAD, so the log
        # read after HEAD holds the record HEAD named (read the other way round, a commit between
        # the two reads paired a new HEAD with an older log: a reused id's old record, or a
        # fallback to a record that was never the latest)
        head_buf = _read_file(self.head_path)
        buf = _read_file(self.log_path)
        if buf is None:
            buf = b""
        records, valid_end, problem = decode_records(buf)
        self._size = len(buf)
        if problem is not None:
            cut = len(buf) - valid_end
            report.cut_offset = valid_end
            report.cut_bytes = cut
            report.cut_reason = problem
            stranded = _stranded(buf, valid_end)
            report.stranded_records = len(stranded)
            report.cut_action = len(report.actions)
            if self.repair:
                report.actions.append(f"cut {cut} bytes from {CHECKPOINTS_LOG} at offset {valid_end} ({problem})")
                report.side_file = self._cut_tail(buf, valid_end)
                self._size = valid_end
            else:  # nothing is cut: verify and inspect print this as what they found
                report.actions.append(f"damaged at offset {valid_end} ({problem}); "
                                      f"a repair cuts the {cut} bytes from there")
                self._bad_tail = (valid_end, problem)
                self._stranded_ids = {r.user_id for r in stranded}
        self._set_records(records)
        report.records = len(records)
        report.duplicate_ids = _duplicates(records)

        head = decode_head(head_buf) if head_buf is not None else None
        if head_buf is None:
            report.head_status = "missing"
        elif head is None:
            report.head_status = "corrupt"
        elif head not in self._by_id:
            report.head_status = "dangling"
        else:
            report.head_status = "ok"
        report.head_id = head
        self._head = head if report.head_status == "ok" else None
        if report.head_status == "dangling" and head in self._stranded_ids:
            self._head_stranded = head  # (not a fallback: latest() says the log is damaged)
            report.actions.append(f"HEAD names {head!r}, whose record lies past the damage; not readable "
                                  "until a repair cuts it (latest checkpoint then falls back)")
            return
        if report.head_status in ("corrupt", "dangling") and not self._records:
            # (the crate would answer CheckpointNotFound, not NoCheckpoints, for a dangling one)
            report.actions.append(f"HEAD is {report.head_status} and there are no records"
                                  + ("; removed HEAD" if self.repair else ""))
            if self.repair:
                try:
                    os.unlink(self.head_path)
                    layout.fsync_dir(self.root)
                except OSError as exc:
                    raise _io_error(exc, self.head_path, "removing") from exc
        elif report.head_status != "ok" and self._records:
            last = self._records[-1].user_id
            report.actions.append(
                f"HEAD is {report.head_status}; latest checkpoint falls back to the last record "
                f"{last!r}" + ("; rewrote HEAD" if self.repair else "")
            )
            if self.repair:
                self._write_head(last)
                self._head = last

    def _make_durable_as_read(self) -> None:
        """fsync the log, ``HEAD`` and their names: a process killed inside a commit's sync can
        leave a record (and the rename naming it) in the page cache only, and this open has
        just read it as a checkpoint that exists. A power loss must not take back what an open
        has answered (the engine's recovery does the same for a stream's tail)."""
        try:
            for path in (self.log_path, self.head_path):
                try:
                    fd = os.open(path, os.O_RDONLY)
                except FileNotFoundError:
                    continue
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            layout.fsync_dir(self.root)
        except OSError as exc:
            raise _io_error(exc, self.root, "making the checkpoint log durable in") from exc

    def _cut_tail(self, buf: bytes, valid_end: int) -> str:
        """Copy ``buf[valid_end:]`` to a side file durably, then truncate the log there."""
        side = layout.side_file_path(self.log_path)
        try:
            out = os.open(side, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                layout.write_all(out, buf[valid_end:])
                os.fsync(out)
            finally:
                os.close(out)
            layout.fsync_dir(self.root)
            fd = os.open(self.log_path, os.O_WRONLY)
            try:
                os.ftruncate(fd, valid_end)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise _io_error(exc, self.log_path, "repairing") from exc
        return side

    def _set_records(self, records: Sequence[CheckpointData]) -> None:
        self._records = list(records)
        self._by_id = {}
        for rec in self._records:
            self._by_id[rec.user_id] = rec  # later records shadow earlier ones

    def _write_head(self, user_id: bytes) -> None:
        try:
            layout.write_file_atomic(self.head_path, encode_head(user_id))
        except OSError as exc:
            _remove_quietly(self.head_path + ".tmp")
            raise _io_error(exc, self.head_path, "writing") from exc

    # --- reading ---------------------------------------------------------------------------

    def latest(self) -> CheckpointData:
        """The checkpoint ``HEAD`` names, else the last record; :class:`NoCheckpointsError`.

        :class:`CheckpointCorruptedError` (repair=False only) if ``HEAD`` names a record that
        lies past damage in the log: an older one is not passed off as the latest.
        """
        with self._lock:
            if self._head_stranded is not None:
                raise self._stranded_error(self._head_stranded)
            rec = self._latest_locked()
        if rec is None:
            raise NoCheckpointsError("no checkpoint has been created yet")
        return rec

    def _latest_locked(self) -> Optional[CheckpointData]:
        if self._head is not None and self._head in self._by_id:
            return self._by_id[self._head]
        return self._records[-1] if self._records else None

    def get(self, user_id: bytes) -> CheckpointData:
        """The (latest) record with this id; :class:`CheckpointNotFoundError` if none, or
        :class:`CheckpointCorruptedError` (repair=False only) if its record lies past damage."""
        uid = check_checkpoint_id(user_id)
        with self._lock:
            rec = self._by_id.get(uid)
            if rec is None and uid in self._stranded_ids:
                raise self._stranded_error(uid)
        if rec is None:
            raise CheckpointNotFoundError(f"no checkpoint with id {uid!r}")
        return rec

    def _stranded_error(self, uid: bytes) -> CheckpointCorruptedError:
        offset, reason = self._bad_tail  # type: ignore[misc]
        return CheckpointCorruptedError(
            self.log_path, offset,
            f"{reason}; the record of checkpoint {uid!r} lies past it and cannot be read in order "
            f"(a repair cuts the damage and what follows into {CHECKPOINTS_LOG}.broken)",
        )

    def __contains__(self, user_id: object) -> bool:
        try:
            uid = check_checkpoint_id(user_id)
        except (TypeError, InvalidCheckpointIdError):
            return False
        with self._lock:
            return uid in self._by_id

    def list(self) -> List[Tuple[bytes, int]]:
        """``(user_id, timestamp)`` of every record, oldest first (shadowed duplicates too)."""
        with self._lock:
            return [(r.user_id, r.timestamp) for r in self._records]

    def records(self) -> List[CheckpointData]:
        """Every record, oldest first."""
        with self._lock:
            return list(self._records)

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    @property
    def bytes_size(self) -> int:
        """Size of ``checkpoints.log`` on disk (an unrepaired bad tail included)."""
        with self._lock:
            return self._size

    @property
    def head_id(self) -> Optional[bytes]:
        """The id the ``HEAD`` file names, when it is valid and has a record."""
        with self._lock:
            return self._head

    # --- writing ---------------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self._failed is not None:
            raise WalIOError(
                f"{self.log_path} refuses writes after an earlier failure: {self._failed}; "
                "reopen to recover",
                None,
                self.log_path,
            )
        if self._bad_tail is not None:
            offset, reason = self._bad_tail
            raise CheckpointCorruptedError(
                self.log_path,
                offset,
                f"{reason}; opened with repair=False, so it cannot be appended to",
            )

    def prepare_head(self, user_id: bytes) -> "PreparedHead":
        """Write ``HEAD``'s replacement naming ``user_id`` to ``HEAD.tmp`` (not synced yet).

        Hand the result to :meth:`append`, or to :meth:`discard_head` if the checkpoint is
        abandoned. A coordinator does it while the workers prepare, so that only the record's
        write, the rename and one sync remain once they have answered. One at a time (they would
        share ``HEAD.tmp``): ``RuntimeError`` while another is outstanding.
        """
        uid = check_checkpoint_id(user_id)
        with self._lock:
            return self._prepare_head_locked(uid)

    def _prepare_head_locked(self, uid: bytes) -> "PreparedHead":
        if self._prepared is not None:
            raise RuntimeError(f"HEAD is already prepared for {self._prepared.user_id!r}: "
                               "append or discard that first")
        self._prepared = PreparedHead(self.root, self.head_path, uid)
        return self._prepared

    def discard_head(self, prepared: "PreparedHead") -> None:
        """Abandon a :meth:`prepare_head` (``HEAD`` was never touched)."""
        with self._lock:
            self._discard_head_locked(prepared)

    def _discard_head_locked(self, prepared: "PreparedHead") -> None:
        if self._prepared is not prepared:
            prepared.close()
            return  # already appended or discarded: HEAD.tmp may be another's now
        self._prepared = None
        try:
            prepared.close()
        finally:
            _remove_quietly(prepared.tmp)

    def append(self, data: CheckpointData, prepared_head: "Optional[PreparedHead]" = None) -> None:
        """Append ``data`` durably and make ``HEAD`` name it; both are durable on return.

        The record is written, ``HEAD.tmp`` renamed over ``HEAD``, then both (and the rename)
        are made durable by one sync: a syncfs of the root's filesystem where ``group_sync``
        allows it, else an fdatasync of each file and an fsync of the root. While the last
        record is the latest, ordering between the two is not needed: a crash may leave the
        record without ``HEAD`` naming it (listed, not latest, never acknowledged) or ``HEAD``
        naming a record that is not there (dangling: it falls back to the last record, the
        previous latest). When a newer record than the latest is in the log, the record is
        fdatasynced before the rename (FORMAT.md §9). :class:`CheckpointExistsError` if the id already has a record. If a
        step fails, the log is truncated back to its previous length, ``HEAD`` is put back,
        and :class:`WalIOError` (or :class:`DiskFullError`) is raised.
        """
        with self._lock:
            head = prepared_head
            try:
                if not isinstance(data, CheckpointData):
                    raise TypeError(f"expected CheckpointData, not {type(data).__name__}")
                if head is not None and head is not self._prepared:
                    head = None  # (not ours to discard)
                    raise ValueError("this prepared HEAD was already appended or discarded")
                if head is not None and head.user_id != data.user_id:
                    raise ValueError(f"HEAD was prepared for {head.user_id!r}, not {data.user_id!r}")
                record = encode_record(data)
                self._check_writable()
                if data.user_id in self._by_id:
                    raise CheckpointExistsError(f"a checkpoint with id {data.user_id!r} already exists")
                if head is None:
                    head = self._prepare_head_locked(data.user_id)
                if self._use_syncfs is None:
                    self._use_syncfs = self._group_sync is GroupSync.SYNCFS and syncfs_device(self.root) is not None
                prev = self._size
                # a dangling HEAD reads as the last record: only safe while that is the latest.
                # Records after HEAD's (a crash between write and rename left one) would then be
                # read as latest, so in that state the record is made durable before the rename.
                ordered = bool(self._records) and self._latest_locked() is not self._records[-1]
                try:
                    fd = os.open(self.log_path, os.O_RDWR | os.O_CREAT, 0o644)
                except OSError as exc:
                    raise _io_error(exc, self.log_path, "opening") from exc
            except BaseException:
                if head is not None:  # (a refused append leaves no HEAD.tmp behind)
                    self._discard_head_locked(head)
                raise
            renamed = False
            try:
                try:
                    os.lseek(fd, prev, os.SEEK_SET)
                    layout.write_all(fd, record)
                    if ordered:
                        os.fdatasync(fd)
                    os.replace(head.tmp, self.head_path)
                    renamed = True
                    sync_files([fd, head.fd], head.dir_fd, self._use_syncfs)
                except BaseException as exc:  # (an interrupt too: disk must match memory)
                    if renamed:
                        self._restore_head()
                    self._roll_back(fd, prev)
                    if isinstance(exc, OSError):
                        raise _io_error(exc, self.log_path, "appending a checkpoint to") from exc
                    raise
            finally:
                try:
                    os.close(fd)
                finally:
                    self._discard_head_locked(head)
            self._size = prev + len(record)
            self._records.append(data)
            self._by_id[data.user_id] = data
            self._head = data.user_id

    def _restore_head(self) -> None:
        """After a failed append whose rename happened: make ``HEAD`` name what it named before."""
        try:
            if self._head is not None:
                layout.write_file_atomic(self.head_path, encode_head(self._head))
            else:
                os.unlink(self.head_path)
                layout.fsync_dir(self.root)
        except OSError as exc:
            # HEAD names the record being rolled back; once that is cut it dangles, which reads
            # as the last record (the latest before this append), and a repairing open rewrites it
            _remove_quietly(self.head_path + ".tmp")
            self._failed = f"could not put HEAD back after a failed append: {exc}"

    def _roll_back(self, fd: int, length: int) -> None:
        try:
            os.ftruncate(fd, length)
            os.fsync(fd)
        except OSError as exc:
            self._failed = f"could not roll back a failed append: {exc}"

    def compact(self, keep_latest_n: int) -> Tuple[int, int, int]:
        """Rewrite the log atomically keeping the newest ``keep_latest_n`` records.

        The record ``HEAD`` names is always kept, so ``latest()`` never changes; ``HEAD`` itself
        is not touched. Returns ``(records_before, records_after, bytes_reclaimed)``.
        """
        check_keep_latest_n(keep_latest_n)
        with self._lock:
            self._check_writable()
            before = len(self._records)
            if before <= keep_latest_n:
                return before, before, 0
            cut = before - keep_latest_n
            kept = self._records[cut:]
            head_rec = self._by_id.get(self._head) if self._head is not None else None
            if head_rec is not None and not any(r is head_rec for r in kept):
                kept.insert(0, head_rec)
            data = b"".join(encode_record(r) for r in kept)
            try:
                os.replace(layout.prepare_atomic(self.log_path, data), self.log_path)
            except OSError as exc:  # (the old log is untouched)
                _remove_quietly(self.log_path + ".tmp")
                raise _io_error(exc, self.log_path, "compacting") from exc
            # the compacted file is in place: memory follows it, or the next record would be
            # written at the old length, past a hole of zeros, and cut at the next open
            reclaimed = self._size - len(data)
            self._size = len(data)
            self._set_records(kept)
            try:
                layout.fsync_dir(self.root)
            except OSError as exc:
                # a power loss may bring the old file back, and with it lose any record appended
                # to the new one: no more appends until a reopen reads what the disk kept
                self._failed = f"compacting replaced {CHECKPOINTS_LOG}, but the rename was not made durable: {exc}"
                raise io_error(exc, self.root, "making the compacted log durable in",
                               note="every checkpoint is still there; new ones are refused until the WAL is "
                                    "reopened") from exc
            return before, len(kept), reclaimed


# --- helpers -------------------------------------------------------------------------------------


def _read_file(path: str) -> Optional[bytes]:
    try:
        return layout.read_regular_file(path)
    except OSError as exc:
        raise _io_error(exc, path, "reading") from exc


def _stranded(buf: bytes, start: int) -> List[CheckpointData]:
    """The complete valid records that start somewhere in ``buf[start:]`` past a bad record."""
    found: List[CheckpointData] = []
    pos = buf.find(RECORD_MAGIC, start + 1)
    while pos != -1:
        records, end, _ = decode_records(buf[pos:])
        if records:
            found += records
            pos = buf.find(RECORD_MAGIC, pos + end)
        else:
            pos = buf.find(RECORD_MAGIC, pos + 1)
    return found


def _duplicates(records: Sequence[CheckpointData]) -> List[bytes]:
    seen: Dict[bytes, int] = {}
    for r in records:
        seen[r.user_id] = seen.get(r.user_id, 0) + 1
    return [uid for uid, n in seen.items() if n > 1]


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _io_error(exc: OSError, path: str, action: str) -> WalIOError:
    return io_error(exc, path, action, "the disk is full; nothing of this call was kept")


__all__ = [
    "CHECKPOINTS_LOG",
    "HEAD",
    "CheckpointData",
    "CheckpointLog",
    "CheckpointLogReport",
    "PreparedHead",
    "check_checkpoint_id",
    "decode_head",
    "decode_payload",
    "decode_records",
    "encode_head",
    "encode_payload",
    "encode_record",
]


class PreparedHead:
    """``HEAD.tmp`` written for one id, with the descriptors its commit syncs through.

    The root's descriptor is opened first: a descriptor is told only of writeback errors that
    happen after it was opened, and the sync at commit must hear of this file's and the record's.
    """

    def __init__(self, root: str, head_path: str, user_id: bytes) -> None:
        self.user_id = user_id
        self.tmp = head_path + ".tmp"
        self.fd = -1
        try:
            self.dir_fd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError as exc:
            raise _io_error(exc, root, "opening") from exc
        try:
            self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            layout.write_all(self.fd, encode_head(user_id))
        except BaseException as exc:
            self.close()
            _remove_quietly(self.tmp)
            if isinstance(exc, OSError):
                raise _io_error(exc, self.tmp, "writing") from exc
            raise

    def close(self) -> None:
        for name in ("fd", "dir_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                setattr(self, name, -1)
                os.close(fd)
