"""ironwal_mp: a durable, deterministic write-ahead log for Python, on ironwal 0.6's format.

``Wal`` is the single-process multi-stream engine; ``ShardedWal`` the multiprocess sharded
layer (a coordinator process and per-shard worker processes). See README.md and docs/.
"""

from .engine.wal import TxnWriter, Wal
from .errors import *  # noqa: F401,F403  (every error type is public)
from .errors import __all__ as _error_names
from .options import CompressionType, CorruptionPolicy, GroupSync, ReadStrategy, SyncMode, WalOptions
from .engine.checkpoint_log import CheckpointData
from .sharded.client import CompactionStats, PruneStats, ShardedWal, connect

__version__ = "0.1.0"

__all__ = [
    "Wal",
    "TxnWriter",
    "ShardedWal",
    "connect",
    "CheckpointData",
    "PruneStats",
    "CompactionStats",
    "WalOptions",
    "SyncMode",
    "CompressionType",
    "ReadStrategy",
    "CorruptionPolicy",
    "GroupSync",
    *_error_names,
]
