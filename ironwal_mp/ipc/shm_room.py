"""Whether /dev/shm and memory can hold what a start-up is about to create (PROTOCOL.md §15).

Ring pages are allocated when a ring is created (``names.create_shm``), so a full /dev/shm is an
error there, not a SIGBUS later. But tmpfs pages are RAM, and /dev/shm is often sized at half
the RAM or more: rings larger than the free memory yet within /dev/shm's size are allocated page
by page until the kernel's OOM killer kills the coordinator (or another process). Inside a
memory-limited cgroup (a container) the machine's free memory says little: tmpfs pages are
charged to the cgroup of the process that first touches them, so the cgroup's own OOM killer
comes first. So the start-up compares what it needs with the three figures first and refuses
with a SharedMemoryError naming ``ring_size``. The arithmetic (``start_needs``, ``refusal``,
``cgroup_headroom``) is pure; ``read_room`` alone reads the machine.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional

from ..errors import SharedMemoryError
from . import control as C
from . import ring_layout as L
from .names import SHM_DIR

MiB = 1 << 20
#: memory a start leaves to everything else (its own worker processes, the page cache, other
#: programs): the larger of this and a RESERVE_FRACTION-th of MemAvailable (or of the cgroup's room)
RESERVE_MIN = 64 * MiB
RESERVE_FRACTION = 8
#: a cgroup v1 limit this large is no limit (v1 writes its page counter's maximum,
#: 0x7FFFFFFFFFFFF000 on 64-bit machines, where v2 writes "max")
CGROUP_UNLIMITED = 1 << 62
#: (limit file, usage file, memory.stat key of the inactive file cache) of each cgroup version
CGROUP_V2_FILES = ("memory.max", "memory.current", "inactive_file")
CGROUP_V1_FILES = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")


class Room(NamedTuple):
    """Free bytes in /dev/shm, the memory available, and what the process's memory cgroup (and
    its parents) still allow; None where it cannot be read or there is no limit."""

    shm_free: Optional[int]
    mem_available: Optional[int]
    cgroup_room: Optional[int] = None


def start_needs(new_rings: int, ring_size: int) -> int:
    """Bytes of shared memory a start creates: ``new_rings`` rings (a header page and the data
    area each; a kept ring of an earlier run is not created again) and the control block."""
    return new_rings * (L.HEADER_BYTES + ring_size) + C.SIZE


def memory_reserve(mem_available: int) -> int:
    """The part of ``mem_available`` (or of a cgroup's room) a start leaves alone.

    The same rule serves the cgroup: the worker processes the start spawns next, and whatever
    else runs in the container, are charged to that cgroup too, and its usage moves."""
    return max(RESERVE_MIN, mem_available // RESERVE_FRACTION)


def cgroup_headroom(limit: int, usage: int, inactive_file: int) -> int:
    """Bytes a cgroup with ``limit`` still allows. Its usage counts the page cache, which fills
    up to the limit in a container that writes files (as a WAL does) and is reclaimed before
    the OOM killer runs; so the inactive file cache is not counted as used (the "working set"
    that container runtimes compare with the limit). Shared memory pages are not file cache:
    they stay counted."""
    return max(0, limit - max(0, usage - inactive_file))


def refusal(need: int, room: Room) -> Optional[str]:
    """Why ``need`` bytes of shared memory do not fit ``room``, or None when they do."""
    if room.shm_free is not None and need > room.shm_free:
        return f"{SHM_DIR} has {room.shm_free} bytes free"
    if room.mem_available is not None:
        reserve = memory_reserve(room.mem_available)
        if need > room.mem_available - reserve:
            return (f"the machine has {room.mem_available} bytes of memory available (MemAvailable; "
                    f"/dev/shm pages are memory), of which {reserve} are left to other processes")
    if room.cgroup_room is not None:
        reserve = memory_reserve(room.cgroup_room)
        if need > room.cgroup_room - reserve:
            return (f"the memory cgroup of this process allows {room.cgroup_room} more bytes (its "
                    f"limit less its usage; /dev/shm pages are charged to it), of which {reserve} "
                    "are left to other processes")
    return None


def read_room(proc_root: str = "/proc", cgroup_root: str = "/sys/fs/cgroup") -> Room:
    """This machine's figures: ``statvfs`` of /dev/shm, MemAvailable of ``proc_root``/meminfo,
    and the least room of this process's memory cgroup and its parents (``_read_cgroup_room``).
    The roots are parameters for tests."""
    try:
        st = os.statvfs(SHM_DIR)
        shm_free: Optional[int] = st.f_bavail * st.f_frsize
    except OSError:
        shm_free = None  # (creating the objects will say what is wrong)
    mem_available = None
    try:
        with open(os.path.join(proc_root, "meminfo")) as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    mem_available = int(line.split()[1]) * 1024  # (given in kB)
                    break
    except (OSError, ValueError, IndexError):
        pass
    return Room(shm_free, mem_available, _read_cgroup_room(proc_root, cgroup_root))


def _read_cgroup_room(proc_root: str, cgroup_root: str) -> Optional[int]:
    """The least ``cgroup_headroom`` of this process's memory cgroup (``proc_root``/self/cgroup:
    the v1 line naming the memory controller, else the v2 line "0::path") and of each parent up
    to ``cgroup_root`` (for v1, its memory/ directory), since a parent's limit applies too.
    A level without a limit, or whose files are missing or unreadable, is skipped (a container
    sees its own cgroup at the root while /proc names the host's path: the missing levels are
    skipped down to it); None when no level limits."""
    try:
        with open(os.path.join(proc_root, "self", "cgroup")) as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    found = None
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if "memory" in controllers.split(","):
            found = (os.path.join(cgroup_root, "memory"), CGROUP_V1_FILES, path)
            break
        if hierarchy == "0" and controllers == "":
            found = (cgroup_root, CGROUP_V2_FILES, path)
    if found is None:
        return None
    base, (limit_file, usage_file, inactive_key), path = found
    parts = [p for p in path.split("/") if p]
    if ".." in parts:
        return None  # (a cgroup outside this namespace's view: its files are not here)
    rooms = []
    for depth in range(len(parts), -1, -1):
        level = os.path.join(base, *parts[:depth])
        limit = _read_int(os.path.join(level, limit_file))
        usage = _read_int(os.path.join(level, usage_file))
        if limit is None or limit >= CGROUP_UNLIMITED or usage is None:
            continue  # ("max" is no limit, and reads as None)
        rooms.append(cgroup_headroom(limit, usage, _read_stat(os.path.join(level, "memory.stat"), inactive_key)))
    return min(rooms, default=None)


def _read_int(path: str) -> Optional[int]:
    """The integer a cgroup file holds, or None (missing, unreadable, or "max")."""
    try:
        with open(path) as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return None


def _read_stat(path: str, key: str) -> int:
    """The value of ``key`` in a memory.stat file, or 0 when it cannot be read (all counted as used)."""
    try:
        with open(path) as fh:
            for line in fh:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


def check_room(new_rings: int, ring_size: int, room: Optional[Room] = None) -> None:
    """SharedMemoryError, naming ``ring_size`` and the figures, unless ``new_rings`` rings of
    ``ring_size`` bytes and the control block fit ``room`` (by default this machine's)."""
    need = start_needs(new_rings, ring_size)
    why = refusal(need, read_room() if room is None else room)
    if why is not None:
        raise SharedMemoryError(
            f"cannot create the shared memory this start needs: {need} bytes ({new_rings} rings of "
            f"{L.HEADER_BYTES} + ring_size {ring_size} bytes, and a {C.SIZE}-byte control block), "
            f"but {why}: lower ring_size (or the shard count), or free memory")
