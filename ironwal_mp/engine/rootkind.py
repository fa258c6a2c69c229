"""What a directory already holds, so that no WAL is opened inside another.

Each shard of a sharded WAL is an engine stream of its root, so an engine ``Wal`` may open a
stopped sharded root (as the crate's own sharded layer does). The other way round does not
hold: a ``ShardedWal`` opened on an engine root, or either kind opened in a stream's directory
or inside a WAL's directory, would mix files that each side's readers, recovery and ``verify``
then read wrongly (a MANIFEST in a stream directory, streams a sharded root's tools never
check, a WAL listed as a stream of another). Both openers ask here first; nothing here writes.
"""

from __future__ import annotations

import errno
import os
import re
from typing import List, Optional

from ..errors import ConfigError, WalIOError
from . import layout
from .checkpoint_log import CHECKPOINTS_LOG
from .rootlock import LOCK_FILE, ROLES, lock_owner

#: the sharded root's description (docs/FORMAT.md §1), written by ironwal_mp.sharded.manifest
MANIFEST = "MANIFEST"
#: the "format" its JSON names
MANIFEST_FORMAT = "ironwal_mp.sharded"
#: a shard's stream directory: shard_00 .. shard_999 (fullmatch)
SHARD_DIR_RE = re.compile(r"shard_([0-9]{2,3})")



def is_stream_dir(path: str) -> bool:
    """True if ``path`` holds a stream's files (a segment or ``segments.idx``). Directories do
    not count: a WAL root made before stream names like segment files were refused may hold one."""
    try:
        with os.scandir(path) as entries:
            return any(
                (e.name == layout.SEGMENTS_IDX or layout.parse_segment_name(e.name) is not None)
                and e.is_file() for e in entries
            )
    except OSError:
        return False


def sharded_marker(path: str) -> Optional[str]:
    """The sharded root's file ``path`` holds (MANIFEST or checkpoints.log), if any."""
    for name in (MANIFEST, CHECKPOINTS_LOG):
        if os.path.exists(os.path.join(path, name)):
            return name
    return None


def stream_dirs(path: str) -> List[str]:
    """Names of the stream directories in ``path``."""
    try:
        names = os.listdir(path)
    except OSError:
        return []
    return sorted(n for n in names if layout.is_stream_name(n) and is_stream_dir(os.path.join(path, n)))


def engine_streams(path: str) -> List[str]:
    """Stream directories in ``path`` that are not shard directories: an engine WAL's streams."""
    return [n for n in stream_dirs(path) if not SHARD_DIR_RE.fullmatch(n)]


def holds_wal(path: str) -> bool:
    """True if ``path`` is a WAL's root or a stream's directory, judged by what only this
    library (or the crate) leaves there: a name like LOCK or MANIFEST alone may be another
    program's (LevelDB keeps a LOCK too)."""
    if is_stream_dir(path) or os.path.exists(os.path.join(path, CHECKPOINTS_LOG)):
        return True
    if _ours(os.path.join(path, MANIFEST)) or stream_dirs(path):  # (a crate-written root has no LOCK)
        return True
    if not os.path.exists(os.path.join(path, LOCK_FILE)):
        return False
    owner = lock_owner(path)
    return owner is not None and owner[1] in ROLES


def _ours(manifest_path: str) -> bool:
    try:
        fd = layout.open_regular(manifest_path)
    except OSError:
        return False
    try:
        return f'"{MANIFEST_FORMAT}"'.encode() in os.read(fd, 4096)
    except OSError:
        return False
    finally:
        os.close(fd)


def check_engine_root(root: str) -> None:
    """ConfigError if an engine ``Wal`` may not write at ``root`` (absolute): one stream's
    directory, or a directory inside a WAL."""
    if os.path.isdir(root):  # (a sharded root is allowed: its shards are streams, as in the crate)
        if is_stream_dir(root):
            raise ConfigError("root_path", f"{root} is one stream of the WAL at {os.path.dirname(root)}, "
                                           "not a WAL's root")
    _check_not_inside(root)


def check_sharded_root(root: str) -> None:
    """WalIOError if ``root`` (absolute) is a file; ConfigError if a ShardedWal may not live
    there: an engine WAL's root, one stream's directory, or a directory inside a WAL."""
    if os.path.exists(root) and not os.path.isdir(root):
        raise WalIOError(f"root_path {root} is not a directory", errno.ENOTDIR, root)
    if os.path.isdir(root) and sharded_marker(root) is None:
        if is_stream_dir(root):
            raise ConfigError("root_path", f"{root} is one stream of the WAL at {os.path.dirname(root)}, "
                                           "not a WAL's root")
        streams = engine_streams(root)
        if streams:
            raise ConfigError("root_path", f"{root} is an engine WAL (streams {', '.join(streams[:5])}), "
                                           "not a sharded one: open it with Wal")
    _check_not_inside(root)


def _check_not_inside(root: str) -> None:
    """ConfigError if the nearest existing directory above ``root`` is a WAL's root or a
    stream's directory (the new WAL would be read as one of its streams, or as stray files)."""
    parent = os.path.dirname(root)
    while parent != os.path.dirname(parent) and not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    if holds_wal(parent):
        raise ConfigError("root_path", f"{root} is inside the WAL directory {parent}; "
                                       "a WAL cannot be nested in another")
