"""Every error ironwal_mp raises on purpose.

All of them derive from :class:`WalError`, so ``except WalError`` catches anything the library
itself decided to refuse. Errors about a bad argument also derive from ``ValueError`` and errors
about the machine (disk, shared memory) from ``OSError``, so generic handlers keep working.
Wrong argument *types* raise the built-in ``TypeError``.
"""

from __future__ import annotations

import errno as _errno


class WalError(Exception):
    """Base class of every ironwal_mp error."""


# --- configuration and arguments -------------------------------------------------------------


class ConfigError(WalError, ValueError):
    """An option or argument has an invalid value; the message (and ``field``) names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"invalid option {field!r}: {message}")
        self.field = field


class InvalidStreamNameError(WalError, ValueError):
    """A stream name is not safe to use, unchanged, as one directory name."""

    def __init__(self, name: object, reason: str) -> None:
        super().__init__(f"invalid stream name {name!r}: {reason}")
        self.name = name
        self.reason = reason


class InvalidIdError(WalError, ValueError):
    """A sequence id or shard id outside its range (negative, past u64, past the shard count)."""


class RecordTooLargeError(WalError, ValueError):
    """An entry or batch is larger than the format (or a shard's ring) can hold."""

    def __init__(self, size: int, limit: int, what: str = "record", hint: str = "") -> None:
        super().__init__(f"{what} of {size} bytes exceeds the limit of {limit} bytes{hint}")
        self.size = size
        self.limit = limit


# --- lifecycle ---------------------------------------------------------------------------------


class WalClosedError(WalError):
    """The handle was closed, its coordinator stopped or was replaced, or (a ``Wal``) it was
    inherited by a forked child: it cannot be used."""


class WalLockedError(WalError):
    """Another live process already owns this WAL directory."""


class ReadOnlyError(WalError):
    """A write (append, batch, transaction, sync, truncate) on a handle opened read-only."""


class TransactionClosedError(WalError):
    """A transaction (``Wal.writer``) was used after its commit or rollback."""


# --- storage -----------------------------------------------------------------------------------


class CorruptionError(WalError):
    """A log file holds bytes that are not a valid frame or record, a segment file is missing
    while the hints name it, or a stray empty segment was placed from outside (FORMAT.md §7).

    ``path`` and ``offset`` locate the first bad byte (offset 0 for a whole file).
    """

    def __init__(self, path: str, offset: int, reason: str) -> None:
        super().__init__(f"corruption in {path} at offset {offset}: {reason}")
        self.path = path
        self.offset = offset
        self.reason = reason


class CrcMismatchError(CorruptionError):
    """A frame's stored CRC32 does not match its contents; its bytes are never returned."""

    def __init__(self, path: str, offset: int, expected: int, actual: int) -> None:
        super().__init__(
            path, offset, f"CRC32 mismatch (stored 0x{expected:08x}, computed 0x{actual:08x})"
        )
        self.expected = expected
        self.actual = actual


class WalIOError(WalError, OSError):
    """The operating system refused a read, write or sync.

    Nothing from the failed call was acknowledged. A failed write is rolled back, so the log
    on disk is as it was before the call. A failed sync or segment rotation leaves the entries
    written since the last sync in doubt (they may or may not be there after a reopen), and
    the stream refuses writes until it is reopened; recovery then makes the files consistent.
    A failed truncation says how many segments went before it stopped.
    """

    def __init__(self, message: str, errno_: int | None = None, path: str | None = None) -> None:
        OSError.__init__(self, errno_ if errno_ is not None else 0, message)
        self.path = path

    def __str__(self) -> str:
        return self.strerror or super().__str__()


class DiskFullError(WalIOError):
    """The file system is out of space (ENOSPC/EDQUOT). As for any WalIOError: a failed write
    was rolled back; after a failed sync or rotation the stream refuses writes until reopened."""


def io_error(exc: OSError, path: str | None = None, action: str = "",
             full: str = "the disk is full", note: str = "") -> WalIOError:
    """The WalIOError (DiskFullError for ENOSPC/EDQUOT, its message ending in ``full``) for an
    OSError the system raised, with its errno and the file (``path``, else the error's own file
    name): what callers, and a client across the coordinator's queue, get instead of a bare
    OSError. ``note``, after the reason, says what the failure leaves (entries in doubt, a
    stream that refuses writes)."""
    if isinstance(exc, WalIOError):
        return exc
    if path is None and isinstance(exc.filename, str):
        path = exc.filename
    reason = exc.strerror or str(exc)
    message = f"{action} {path} failed: {reason}" if action and path else f"{path}: {reason}" if path else reason
    if note:
        message += f"; {note}"
    if exc.errno in (_errno.ENOSPC, getattr(_errno, "EDQUOT", _errno.ENOSPC)):
        return DiskFullError(f"{message} ({full})", exc.errno, path)
    return WalIOError(message, exc.errno, path)


class ConcurrentTruncationError(WalError):
    """An iteration was overtaken by a truncation that deleted entries it had yet to yield.

    Raised instead of silently skipping ids; iterate again from the first kept id.
    """


class StreamFailedError(WalError):
    """A stream refuses further writes: an fsync failed, or a rotation, a write it could not
    roll back, or an interrupt left the files in a state only recovery may settle.

    After a failed fsync the kernel may have dropped dirty pages, so retrying cannot prove the
    data durable. Reopen the WAL to recover from what is on disk. (A shard's clients see
    ``WorkerFailedError`` instead: its worker reopens.)
    """


# --- sharded layer -----------------------------------------------------------------------------


class ShardCountMismatchError(WalError, ValueError):
    """A sharded directory was reopened with another shard count than its MANIFEST records, or
    a checkpoint record to prune by (or to replay from) names another number of shards than the
    WAL has."""

    def __init__(self, expected: int, found: int, detail: str = "") -> None:
        super().__init__(
            f"shard count mismatch: {detail or f'the directory holds {found} shards, {expected} were requested'}"
        )
        self.expected = expected
        self.found = found


class ManifestError(WalError):
    """MANIFEST is unreadable, of an unknown format version or router, or records fewer shards
    than the directory holds."""


class InvalidCheckpointIdError(WalError, ValueError):
    """A checkpoint id is not non-empty bytes of at most 65535 bytes."""


class CheckpointNotFoundError(WalError, KeyError):
    """No checkpoint has the requested id."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "checkpoint not found"


class NoCheckpointsError(WalError):
    """The WAL holds no checkpoint yet."""


class CheckpointExistsError(WalError, ValueError):
    """A checkpoint with this id already exists: an id names one checkpoint while the log holds it
    (never silently replaced; compaction frees the ids of the records it drops)."""


class CheckpointCorruptedError(CorruptionError):
    """A checkpoint record cannot be read for damage before it in ``checkpoints.log`` (a reader
    that does not repair: the record asked for, or the one HEAD names, lies past it), or a log
    whose bad tail was not repaired is appended to."""


class CheckpointAbortedError(WalError):
    """A checkpoint's prepare phase failed or timed out; no record was written."""


class WorkerFailedError(WalError):
    """A shard's worker process died or failed and the request could not be served."""


class SharedMemoryError(WalError, OSError):
    """Shared memory or a POSIX IPC object could not be created (often /dev/shm is full), or
    the rings would not fit /dev/shm, the memory available or the process's memory cgroup
    (checked before any is created); the message names the option to lower."""


__all__ = [name for name, obj in dict(globals()).items() if isinstance(obj, type) and issubclass(obj, Exception)]
