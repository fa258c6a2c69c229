"""``<root>/MANIFEST``: what a sharded directory is (format version, shard count, router).

A small JSON document, replaced atomically. A directory written by the Rust crate has no
MANIFEST; it is adopted (shard count taken from its ``shard_NN`` directories) and given one.
A MANIFEST is written marked ``starting`` and the mark is dropped once the coordinator that
wrote it is ready: a marked one that describes nothing (no shard directory, no checkpoint) was
left by a start that died, and does not bind a retry to its shard count.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from typing import Optional, Tuple

from ..engine.checkpoint_log import CHECKPOINTS_LOG, HEAD
from ..engine.layout import fsync_dir, make_dirs, read_regular_file, write_file_atomic
from ..engine.rootkind import MANIFEST, MANIFEST_FORMAT as FORMAT, SHARD_DIR_RE as _SHARD_DIR
from ..errors import ConfigError, ManifestError, ShardCountMismatchError
from .router import DEFAULT_ROUTER, get_router

FORMAT_VERSION = 1
MAX_SHARDS = 1000  # shard directories are the crate's shard_%02d: shard_00 .. shard_999 (2 or 3 digits)


def shard_stream(shard: int) -> str:
    return f"shard_{shard:02d}"


@dataclass(frozen=True)
class Manifest:
    shard_count: int
    router: str = DEFAULT_ROUTER
    version: int = FORMAT_VERSION
    adopted: bool = False
    #: written by a start that has not (yet) become ready
    starting: bool = False

    def to_json(self) -> bytes:
        doc = {"format": FORMAT, "version": self.version, "shard_count": self.shard_count, "router": self.router}
        if self.adopted:
            doc["adopted_from"] = "ironwal 0.6 (no MANIFEST; routing of earlier keys was the crate's)"
        if self.starting:
            doc["starting"] = True
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def check_shard_count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"shard_count must be an int, not {type(value).__name__}")
    if not 1 <= value <= MAX_SHARDS:
        raise ConfigError("shard_count", f"must be between 1 and {MAX_SHARDS}, got {value}")
    return value


def read_manifest(root: str) -> Optional[Manifest]:
    path = os.path.join(root, MANIFEST)
    try:
        raw = read_regular_file(path)
    except OSError as exc:  # (a directory or FIFO put there, EIO, EACCES)
        raise ManifestError(f"{path} is unreadable: {exc.strerror or exc}") from None
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
        if doc.get("format") != FORMAT:
            raise ManifestError(f"{path}: not an ironwal_mp MANIFEST")
        if doc.get("version") != FORMAT_VERSION:
            raise ManifestError(f"{path}: format version {doc.get('version')} is not supported")
        get_router(doc["router"])
        manifest = Manifest(check_shard_count(doc["shard_count"]), doc["router"], doc["version"], "adopted_from" in doc,
                            doc.get("starting") is True)
    except (ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, ManifestError):
            raise
        raise ManifestError(f"{path} is unreadable: {exc}") from None
    beyond = [s for s in existing_shard_dirs(root) if s >= manifest.shard_count]
    if beyond:  # (opening it would leave those shards' entries out of every read and checkpoint)
        raise ManifestError(
            f"{path} records {manifest.shard_count} shards, but {root} also holds "
            f"{shard_stream(beyond[-1])}: the MANIFEST was changed or belongs to another WAL")
    return manifest


def existing_shard_dirs(root: str) -> list[int]:
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for m in map(_SHARD_DIR.fullmatch, names) if m)


def recorded_shard_count(root: str) -> Optional[int]:
    """The shard count the directory records: its MANIFEST's, else (a crate-written root) one
    past its highest ``shard_NN`` directory; None for a directory that holds no sharded WAL."""
    manifest = read_manifest(root)
    if manifest is not None:
        return manifest.shard_count
    shards = existing_shard_dirs(root)
    return max(shards) + 1 if shards else None


def open_manifest(root: str, shard_count: int, *, create: bool = True) -> Tuple[Manifest, bool]:
    """The directory's manifest, created (or adopted) if absent, and whether this call wrote it;
    checks the shard count. A manifest this call writes is marked ``starting`` (see
    :func:`confirm_manifest`). With ``create=False`` nothing is written (a check before a start)."""
    check_shard_count(shard_count)
    manifest = read_manifest(root)
    if manifest is not None and manifest.shard_count != shard_count:
        if not manifest.starting or describes_anything(root):
            raise ShardCountMismatchError(shard_count, manifest.shard_count)
        manifest = None  # left by a start that died before it made anything: it binds no one
    if manifest is None:
        shards = existing_shard_dirs(root)
        if shards:
            found = max(shards) + 1
            if found != shard_count:
                raise ShardCountMismatchError(shard_count, found)
            manifest = Manifest(shard_count, adopted=True, starting=True)
        else:
            manifest = Manifest(shard_count, starting=True)
        if create:
            make_dirs(root)
            write_file_atomic(os.path.join(root, MANIFEST), manifest.to_json())
            return manifest, True
    return manifest, False


def confirm_manifest(root: str) -> None:
    """Drop the ``starting`` mark once a coordinator is ready: from then on the shard count is
    the WAL's, even while no shard has been written."""
    manifest = read_manifest(root)
    if manifest is not None and manifest.starting:
        write_file_atomic(os.path.join(root, MANIFEST), replace(manifest, starting=False).to_json())


def describes_anything(root: str) -> bool:
    """Whether ``root`` holds anything its MANIFEST describes: a shard directory or a checkpoint."""
    return bool(existing_shard_dirs(root)) or any(os.path.lexists(os.path.join(root, f)) for f in (CHECKPOINTS_LOG, HEAD))


def discard_unused_manifest(root: str) -> bool:
    """Remove the MANIFEST of a start that failed before any shard or checkpoint existed, so
    that the directory holds no sharded WAL again (a retry may choose another shard count);
    False, and nothing removed, once there is anything the MANIFEST describes."""
    if describes_anything(root):
        return False
    try:
        os.unlink(os.path.join(root, MANIFEST))
    except FileNotFoundError:
        return False
    fsync_dir(root)
    return True
