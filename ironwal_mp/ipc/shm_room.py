"""Whether /dev/shm and memory can hold what a start-up is about to create (PROTOCOL.md §15).

Ring pages are allocated when a ring is created (``names.create_shm``), so a full /dev/shm is an
error there, not a SIGBUS later. But tmpfs pages are RAM, and /dev/shm is often sized at half
the RAM or more: rings larger than the free memory yet within /dev/shm's size are allocated page
by page until the kernel's OOM killer kills the coordinator (or another process). So the
start-up compares what it needs with both figures first and refuses with a SharedMemoryError
naming ``ring_size``. The arithmetic (``start_needs``, ``refusal``) is pure; ``read_room`` alone
reads the machine.
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
#: programs): the larger of this and a RESERVE_FRACTION-th of MemAvailable
RESERVE_MIN = 64 * MiB
RESERVE_FRACTION = 8


class Room(NamedTuple):
    """Free bytes in /dev/shm and the memory available; None where it cannot be read."""

    shm_free: Optional[int]
    mem_available: Optional[int]


def start_needs(new_rings: int, ring_size: int) -> int:
    """Bytes of shared memory a start creates: ``new_rings`` rings (a header page and the data
    area each; a kept ring of an earlier run is not created again) and the control block."""
    return new_rings * (L.HEADER_BYTES + ring_size) + C.SIZE


def memory_reserve(mem_available: int) -> int:
    """The part of ``mem_available`` a start leaves alone."""
    return max(RESERVE_MIN, mem_available // RESERVE_FRACTION)


def refusal(need: int, room: Room) -> Optional[str]:
    """Why ``need`` bytes of shared memory do not fit ``room``, or None when they do."""
    if room.shm_free is not None and need > room.shm_free:
        return f"{SHM_DIR} has {room.shm_free} bytes free"
    if room.mem_available is not None:
        reserve = memory_reserve(room.mem_available)
        if need > room.mem_available - reserve:
            return (f"the machine has {room.mem_available} bytes of memory available (MemAvailable; "
                    f"/dev/shm pages are memory), of which {reserve} are left to other processes")
    return None


def read_room() -> Room:
    """This machine's figures: ``statvfs`` of /dev/shm and MemAvailable of /proc/meminfo."""
    try:
        st = os.statvfs(SHM_DIR)
        shm_free: Optional[int] = st.f_bavail * st.f_frsize
    except OSError:
        shm_free = None  # (creating the objects will say what is wrong)
    mem_available = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    mem_available = int(line.split()[1]) * 1024  # (given in kB)
                    break
    except (OSError, ValueError, IndexError):
        pass
    return Room(shm_free, mem_available)


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
