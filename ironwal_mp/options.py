"""Configuration of a WAL: :class:`WalOptions` and its enums."""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, fields
from typing import Optional, Union

from .errors import ConfigError

KiB = 1024
MiB = 1024 * KiB


class SyncMode(enum.Enum):
    """When an append is fsynced before the call returns."""

    STRICT = "strict"  #: every call returns after its entries are fsynced
    BATCH_ONLY = "batch_only"  #: batches and transactions are fsynced; single appends are not
    ASYNC = "async"  #: nothing is fsynced on the call path (the OS flushes; ``sync()`` forces it)


class CompressionType(enum.Enum):
    """How frame payloads may be stored."""

    NONE = "none"
    LZ4 = "lz4"  #: LZ4 frame format, used only when a payload is large enough and shrinks


class ReadStrategy(enum.Enum):
    """How reads reach segment files."""

    STANDARD_IO = "standard_io"  #: positioned reads (pread) through the descriptor cache
    MMAP = "mmap"  #: memory maps of segment files


class CorruptionPolicy(enum.Enum):
    """What recovery does with a torn or corrupt tail when a stream is opened."""

    TRUNCATE = "truncate"  #: cut at the last valid frame, keeping the cut bytes in a side file
    ERROR = "error"  #: refuse to open the stream, naming the file and offset


class GroupSync(enum.Enum):
    """How several files that are due together are made durable (docs: engine/group_sync.py)."""

    #: one syncfs(2) per filesystem: one journal commit instead of one per file, but it also
    #: writes back other programs' dirty data on that filesystem (falls back to FDATASYNC
    #: where syncfs cannot report write-back errors: no syncfs, a kernel before 5.8, or a
    #: filesystem other than ext4, ext3, xfs or btrfs; see engine/group_sync.py)
    SYNCFS = "syncfs"
    FDATASYNC = "fdatasync"  #: an fdatasync per file (in parallel threads in a shard worker)


@dataclass
class WalOptions:
    """Options of a :class:`~ironwal_mp.Wal` (and of every shard of a ShardedWal).

    Sizes are in bytes. Validation happens at construction and raises
    :class:`~ironwal_mp.errors.ConfigError` naming the field.
    """

    root_path: Union[str, "os.PathLike[str]"]
    #: soft limit: a segment is rotated before a frame would take it past this size
    #: (a single frame larger than the limit gets a segment of its own)
    max_segment_size: int = 64 * MiB
    #: rotate once a segment holds this many entries (None: no limit)
    max_entries_per_segment: Optional[int] = None
    #: at most this many segment files are open at once (LRU over all streams)
    max_open_segments: int = 128
    #: a shard worker that wrote less than this in a pass (and has nobody waiting for
    #: durability) pauses briefly before the next, so that its frames grow; frames are never
    #: split, since each published batch must stay whole (the engine itself writes each call
    #: with one write(), so no buffered bytes are ever held back from the OS)
    write_buffer_size: int = 64 * KiB
    #: chunk size of sequential reads (recovery scans, iteration, index building)
    read_buffer_size: int = 128 * KiB
    #: bytes of decoded frames kept in an LRU cache for reads (None: no cache)
    block_cache_size: Optional[int] = None
    sync_mode: SyncMode = SyncMode.STRICT
    compression: CompressionType = CompressionType.LZ4
    #: payloads shorter than this are never compressed
    min_compression_size: int = 1024
    read_strategy: ReadStrategy = ReadStrategy.STANDARD_IO
    on_corruption: CorruptionPolicy = CorruptionPolicy.TRUNCATE
    #: how a shard worker, a checkpoint prepare or ``Wal.sync()`` makes several files durable
    group_sync: GroupSync = GroupSync.SYNCFS

    def __post_init__(self) -> None:
        if not isinstance(self.root_path, (str, os.PathLike)):
            raise ConfigError("root_path", f"expected a str or path, got {type(self.root_path).__name__}")
        path = os.fspath(self.root_path)
        if not path:
            raise ConfigError("root_path", "must not be empty")
        if ("\0" if isinstance(path, str) else b"\0") in path:  # (no system call takes one)
            raise ConfigError("root_path", "must not contain a NUL character")
        _positive_int(self, "max_segment_size", minimum=64)
        _positive_int(self, "max_entries_per_segment", optional=True)
        _positive_int(self, "max_open_segments", minimum=2)
        _positive_int(self, "write_buffer_size", minimum=64)
        _positive_int(self, "read_buffer_size", minimum=64)
        _positive_int(self, "block_cache_size", optional=True)
        _positive_int(self, "min_compression_size", minimum=0)
        for name, kind in (
            ("sync_mode", SyncMode),
            ("compression", CompressionType),
            ("read_strategy", ReadStrategy),
            ("on_corruption", CorruptionPolicy),
            ("group_sync", GroupSync),
        ):
            value = getattr(self, name)
            if not isinstance(value, kind):
                # accept the member's name or value as a string ("strict", "STRICT")
                coerced = _coerce_enum(kind, value)
                if coerced is None:
                    allowed = ", ".join(m.name for m in kind)
                    raise ConfigError(name, f"expected a {kind.__name__} ({allowed}), got {value!r}")
                setattr(self, name, coerced)

    def replace(self, **changes: object) -> "WalOptions":
        """A copy with some fields changed (validated again)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return WalOptions(**values)  # type: ignore[arg-type]


def _positive_int(opts: WalOptions, name: str, *, minimum: int = 1, optional: bool = False) -> None:
    value = getattr(opts, name)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, f"expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ConfigError(name, f"must be at least {minimum}, got {value}")


def _coerce_enum(kind: type[enum.Enum], value: object) -> Optional[enum.Enum]:
    if isinstance(value, str):
        for member in kind:
            if value.lower() in (member.name.lower(), str(member.value).lower()):
                return member
    return None


def options_to_dict(opts: WalOptions) -> dict:
    """A JSON-safe form of ``opts`` (enums by value), to hand options to another process."""
    out = {}
    for f in fields(opts):
        value = getattr(opts, f.name)
        if isinstance(value, enum.Enum):
            value = value.value
        elif f.name == "root_path":
            value = os.fspath(value)
        out[f.name] = value
    return out


def options_from_dict(data: dict) -> WalOptions:
    return WalOptions(**data)  # enum fields accept their values as strings
