"""What a path is (sharded root, engine root, single stream) and how to reach a WAL there."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional

from .. import ShardedWal, SyncMode, WalOptions, connect
from ..engine import layout
from ..engine.rootkind import check_sharded_root as _check_sharded_root, is_stream_dir, sharded_marker
from ..engine.rootlock import LOCK_FILE
from ..errors import ConfigError, WalClosedError, WalIOError
from ..sharded.manifest import recorded_shard_count, shard_stream
from .output import UsageError


@dataclass
class Target:
    kind: str  # "sharded", "engine" or "stream"
    root: str  # the WAL root (for a single stream: its parent)
    streams: List[str]
    shard_count: Optional[int] = None


def locate(path: str, allow_other: bool = False) -> Target:
    """What ``path`` holds. A directory that holds none of a WAL's files is a UsageError
    (a mistyped path is never reported as a sound, empty WAL) unless ``allow_other``."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise UsageError(f"{path} is not a directory")
    recorded = recorded_shard_count(path)
    if recorded is not None or sharded_marker(path) is not None:
        count = recorded or 0
        return Target("sharded", path, [shard_stream(s) for s in range(count)], count)
    if is_stream_dir(path):
        return Target("stream", os.path.dirname(path), [os.path.basename(path)])
    streams = sorted(n for n in os.listdir(path) if layout.is_stream_name(n) and is_stream_dir(os.path.join(path, n)))
    # (a root an engine WAL was opened on holds its LOCK even before any stream has entries)
    if not streams and not allow_other and not os.path.exists(os.path.join(path, LOCK_FILE)):
        raise UsageError(f"{path} holds no WAL (no streams, shard directories, MANIFEST or checkpoints.log)")
    return Target("engine", path, streams)


def sharded_root(path: str) -> str:
    """The root of the sharded WAL at ``path``; UsageError if it holds none."""
    target = locate(path, allow_other=True)
    if target.kind == "stream":  # (naming its parent alone read as if the parent were no WAL)
        raise UsageError(f"{os.path.abspath(path)} is one stream of the WAL at {target.root}, not a WAL's root")
    if target.kind != "sharded":
        raise UsageError(f"{target.root} is not a sharded WAL")
    return target.root


def check_sharded_root(root: str) -> None:
    """UsageError unless ``root`` is missing, empty, or a sharded WAL: a sharded WAL is never
    created inside an engine WAL, a stream's directory or a file."""
    try:
        _check_sharded_root(os.path.abspath(root))
    except (ConfigError, WalIOError) as exc:
        raise UsageError(str(exc).removeprefix("invalid option 'root_path': ")) from None


def open_sharded(root: str, sync_mode: SyncMode = SyncMode.STRICT, start: bool = True) -> ShardedWal:
    """Attach to the running coordinator of ``root``, or (``start``) start one for a stopped WAL."""
    try:
        return connect(root, sync_mode=sync_mode)
    except WalClosedError:
        if not start:
            raise
    target = locate(root)
    if target.kind != "sharded" or not target.shard_count:
        raise UsageError(f"{root} is not a sharded WAL (no MANIFEST or shard directories)")
    return ShardedWal(WalOptions(root_path=root, sync_mode=sync_mode), target.shard_count)
