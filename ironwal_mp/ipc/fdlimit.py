"""Room for one descriptor per mapped ring, under this process's RLIMIT_NOFILE.

Python's ``mmap`` keeps a descriptor of its own for each mapping, so a process that maps
every ring of a WAL (a client, the coordinator, a worker owning many shards) holds about one
descriptor per shard on top of its segment files. The common soft limit of 1024 is too low
for the largest shard counts; the hard limit is usually far higher, and raising the soft one
up to it needs no privilege (Go's runtime does the same at start-up).
"""

from __future__ import annotations

import os

try:
    import resource
except ImportError:  # (not on every platform: then nothing is checked)
    resource = None  # type: ignore[assignment]

from ..errors import ConfigError

#: descriptors beside the rings: segment files (max_open_segments defaults to 128), queues,
#: the LOCK, the control block, pipes and the interpreter's own
SLACK = 192


def _open_now() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 64


def ensure_descriptors(rings: int, field: str = "shard_count") -> None:
    """Raise the soft RLIMIT_NOFILE, never past the hard one, so that ``rings`` more mappings
    and the usual rest fit; ConfigError naming ``field`` if even the hard limit is too low."""
    if resource is None:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = _open_now() + rings + SLACK
    if soft == resource.RLIM_INFINITY or want <= soft:
        return
    if hard != resource.RLIM_INFINITY and want > hard:
        raise ConfigError(field, f"{rings} shards need about {want} open descriptors in this process, "
                                 f"and its limit is {hard} (RLIMIT_NOFILE's hard limit): raise it "
                                 "(`ulimit -Hn`, LimitNOFILE= under systemd) or use fewer shards")
    new = want + SLACK if hard == resource.RLIM_INFINITY else min(hard, want + SLACK)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
