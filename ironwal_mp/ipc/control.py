"""The control block: a small shared-memory page the coordinator publishes for everyone.

It says whether the WAL is up, who the coordinator and workers are, and how the layout looks,
so that clients attach without asking, and a later coordinator can find what a crashed one
left running. The coordinator is its only writer.
"""

from __future__ import annotations

import mmap
import os
import secrets

import posix_ipc

from ..errors import SharedMemoryError
from .names import Names, create_shm

CTL_MAGIC = 0x49574D5043544C31  # "IWMPCTL1"
SIZE = 16384
MAX_WORKERS = 256
MAX_CLIENTS = 128

# u64 field indexes
MAGIC, COORD_PID, STATE, SHARD_COUNT, WORKERS, RING_CAPACITY, STARTED_NS, STARTER_PID = range(8)
SYNC_MODE, EPOCH, FLUSH_US, IDLE_FLUSH_OFF = 8, 9, 10, 11
#: the flush interval (µs) when none was given; FLUSH_US = 0 (a block of an older coordinator) means it
DEFAULT_FLUSH_US = 100_000
WORKER_PIDS = 64  # MAX_WORKERS entries
WORKER_OF_SHARD = WORKER_PIDS + MAX_WORKERS  # up to 1000 shards: worker index of each
CLIENTS = WORKER_OF_SHARD + 1000  # MAX_CLIENTS (pid, queue token) pairs, 0 = free
FIELDS = SIZE // 8

ST_STARTING, ST_READY, ST_CLOSING, ST_CLOSED, ST_FAILED = 0, 1, 2, 3, 4
SYNC_CODES = {"strict": 0, "batch_only": 1, "async": 2}
SYNC_NAMES = {v: k for k, v in SYNC_CODES.items()}


class ControlBlock:
    def __init__(self, names: Names, *, create: bool = False) -> None:
        self.names = names
        name = names.control
        if create:
            try:
                shm = create_shm(name, SIZE)
            except OSError as exc:
                raise SharedMemoryError(f"cannot create {name}: {exc}; is /dev/shm full?") from exc
        else:
            shm = posix_ipc.SharedMemory(name)
        self._mm = mmap.mmap(shm.fd, SIZE)
        shm.close_fd()
        self.f = memoryview(self._mm).cast("Q")
        if create:
            self.f[MAGIC] = CTL_MAGIC
            self.f[COORD_PID] = os.getpid()
            self.f[EPOCH] = secrets.randbits(63) | 1  # this run's: rings open under it
            self.f[STATE] = ST_STARTING
        elif self.f[MAGIC] != CTL_MAGIC:
            raise SharedMemoryError(f"{name} is not an ironwal_mp control block")

    @classmethod
    def try_open(cls, names: Names) -> "ControlBlock | None":
        try:
            return cls(names)
        except (posix_ipc.ExistentialError, SharedMemoryError, ValueError):
            return None

    @property
    def state(self) -> int:
        return self.f[STATE]

    @property
    def coordinator_pid(self) -> int:
        return self.f[COORD_PID]

    @property
    def epoch(self) -> int:
        """This coordinator run's epoch (random, never 0): its rings are open under it."""
        return self.f[EPOCH]

    def worker_of(self, shard: int) -> int:
        return self.f[WORKER_OF_SHARD + shard]

    def worker_pids(self) -> list[int]:
        return [self.f[WORKER_PIDS + w] for w in range(self.f[WORKERS])]

    def clients(self) -> list[tuple[int, int]]:
        out = []
        for i in range(MAX_CLIENTS):
            pid, token = self.f[CLIENTS + 2 * i], self.f[CLIENTS + 2 * i + 1]
            if pid:
                out.append((pid, token))
        return out

    def set_clients(self, clients: list[tuple[int, int]]) -> None:
        for i in range(MAX_CLIENTS):
            pid, token = clients[i] if i < len(clients) else (0, 0)
            self.f[CLIENTS + 2 * i] = pid
            self.f[CLIENTS + 2 * i + 1] = token

    def close(self, release_memory: bool = True) -> None:
        """Detach. ``release_memory=False`` leaves the mapping to reference counting, for a
        client whose other threads may be reading the block (a released view raises ValueError)."""
        if not release_memory:
            return
        try:
            self.f.release()
            self._mm.close()
        except (BufferError, ValueError):
            pass

    def unlink(self) -> None:
        try:
            posix_ipc.unlink_shared_memory(self.names.control)
        except posix_ipc.ExistentialError:
            pass
