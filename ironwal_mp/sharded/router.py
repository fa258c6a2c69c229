"""Key -> shard routing: named, versioned and stable across processes, runs and machines.

Python's ``hash()`` is salted per process, and the Rust crate's DefaultHasher may change between
compiler versions, so neither can route a directory that must route the same forever. The
router's name is recorded in MANIFEST; a directory keeps the router it was created with.
"""

from __future__ import annotations

import zlib
from typing import Callable, Dict

DEFAULT_ROUTER = "crc32-v1"


def _crc32_v1(key: bytes, shard_count: int) -> int:
    """CRC-32 (IEEE, as zlib) of the key bytes, modulo the shard count."""
    return zlib.crc32(key) % shard_count


ROUTERS: Dict[str, Callable[[bytes, int], int]] = {DEFAULT_ROUTER: _crc32_v1}


def get_router(name: str) -> Callable[[bytes, int], int]:
    try:
        return ROUTERS[name]
    except KeyError:
        from ..errors import ManifestError

        raise ManifestError(f"unknown router {name!r} (this version knows {sorted(ROUTERS)})") from None
