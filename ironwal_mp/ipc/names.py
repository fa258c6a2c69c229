"""Names of the POSIX IPC objects that belong to one WAL root, and their clean-up.

Every object's name starts with a prefix derived from the root's real path, so two WALs never
collide and a later open can find (and remove) what a crashed run left behind.
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterable, List, Optional, Tuple

import posix_ipc

SHM_DIR = "/dev/shm"


def _mqueue_dir() -> str:
    """Where the mqueue file system is mounted: /dev/mqueue by convention, else per the mount table
    (containers and sandboxes mount it elsewhere, and without it leaked queues go unseen)."""
    if os.path.isdir("/dev/mqueue"):
        return "/dev/mqueue"
    try:
        with open("/proc/self/mounts") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) > 2 and parts[2] == "mqueue":
                    return parts[1].replace("\\040", " ")
    except OSError:
        pass
    return "/dev/mqueue"


MQUEUE_DIR = _mqueue_dir()


def prefix_for(root: str) -> str:
    """The name prefix of ``root``'s objects: a hash of its real path's bytes (a path that is not
    UTF-8 is as good a root as any)."""
    digest = hashlib.sha1(os.fsencode(os.path.realpath(root))).hexdigest()[:12]
    return f"/ironwal_{digest}"


class Names:
    """All object names of one root."""

    def __init__(self, root: str) -> None:
        self.prefix = prefix_for(root)

    def ring(self, shard: int) -> str:
        return f"{self.prefix}_ring{shard:03d}"

    def ring_lock(self, shard: int) -> str:
        return f"{self.prefix}_lock{shard:03d}"

    def worker_wake(self, worker: int) -> str:
        """Posted when a worker has something to do (data in any of its rings, a command)."""
        return f"{self.prefix}_wake{worker:03d}"

    def space_free(self, shard: int) -> str:
        return f"{self.prefix}_space{shard:03d}"

    def durable(self, shard: int) -> str:
        return f"{self.prefix}_dur{shard:03d}"

    @property
    def control(self) -> str:
        return f"{self.prefix}_ctl"

    @property
    def coordinator_queue(self) -> str:
        return f"{self.prefix}_coord"

    @property
    def worker_replies(self) -> str:
        return f"{self.prefix}_wrep"

    def worker_queue(self, worker: int) -> str:
        return f"{self.prefix}_work{worker:03d}"

    def client_queue(self, token: int) -> str:
        return f"{self.prefix}_cli{token:x}"

    def ring_shards(self) -> List[int]:
        """Shards whose ring's shared memory exists now."""
        head = self.prefix.lstrip("/") + "_ring"
        return sorted(int(e[len(head):]) for e in _listdir(SHM_DIR)
                      if e.startswith(head) and e[len(head):].isdigit())

    def leftovers(self) -> List[str]:
        """Objects with this prefix that exist now (shared memory, semaphores, queues)."""
        stem = self.prefix.lstrip("/")
        found = []
        for directory, strip in ((SHM_DIR, ""), (SHM_DIR, "sem."), (MQUEUE_DIR, "")):
            try:
                entries = os.listdir(directory)
            except OSError:
                continue
            for entry in entries:
                name = entry[len(strip):] if strip and entry.startswith(strip) else (None if strip else entry)
                if name and name.startswith(stem):
                    found.append(f"{directory}/{entry}")
        return found

    def remove_all(self, keep: Iterable[str] = ()) -> int:
        """Unlink every object with this prefix but those in ``keep``; return how many."""
        stem = self.prefix.lstrip("/")
        kept = set(keep)
        removed = 0
        for entry in _listdir(SHM_DIR):
            if entry.startswith("sem." + stem) and "/" + entry[4:] not in kept:
                removed += _unlink(posix_ipc.unlink_semaphore, "/" + entry[4:])
            elif entry.startswith(stem) and "/" + entry not in kept:
                removed += _unlink(posix_ipc.unlink_shared_memory, "/" + entry)
        if os.path.isdir(MQUEUE_DIR):
            for entry in _listdir(MQUEUE_DIR):
                if entry.startswith(stem) and "/" + entry not in kept:
                    removed += _unlink(posix_ipc.unlink_message_queue, "/" + entry)
        else:  # /dev/mqueue not mounted: remove the names we know of
            for name in [self.coordinator_queue, self.worker_replies] + [self.worker_queue(w) for w in range(256)]:
                removed += _unlink(posix_ipc.unlink_message_queue, name)
        return removed


def create_shm(name: str, size: int) -> posix_ipc.SharedMemory:
    """Create shared memory ``name`` of ``size`` bytes, replacing a stale object of that name.

    Every page is allocated now: a full /dev/shm raises OSError here (and leaves nothing),
    not SIGBUS at the first store to a page that could not be allocated.
    """
    try:
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=size)
    except posix_ipc.ExistentialError:
        posix_ipc.unlink_shared_memory(name)
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=size)
    try:
        os.posix_fallocate(shm.fd, 0, size)
    except OSError:
        shm.close_fd()
        posix_ipc.unlink_shared_memory(name)
        raise
    return shm


def processes_of(root: str, roles: Optional[tuple] = ("coordinator", "workers")) -> List[Tuple[int, str]]:
    """(pid, command line) of live processes of ``root``'s WAL. Zombies are not counted.

    With ``roles``: processes started as ``-m <role>`` whose ``--root`` is the same directory
    as ``root`` (compared as real paths, as the IPC names are: a symlinked spelling is the same
    WAL, ``/data/wal2`` is not ``/data/wal``'s). With None: any process whose command line
    mentions ``root`` at all.
    """
    found = []
    me = os.getpid()
    want = os.path.realpath(root)
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                args = [os.fsdecode(a) for a in fh.read().split(b"\0")]
            with open(f"/proc/{pid}/stat", "rb") as fh:
                if fh.read().rsplit(b") ", 1)[1][:1] == b"Z":
                    continue
        except (OSError, IndexError):
            continue
        cmd = " ".join(args).strip()
        if roles is None:
            if root in cmd:
                found.append((int(pid), cmd))
        elif any(r in args for r in roles) and _root_arg(int(pid), args) == want:
            found.append((int(pid), cmd))
    return found


def _root_arg(pid: int, args: List[str]) -> Optional[str]:
    """The real path of a command line's ``--root`` (None without one, or if unresolvable)."""
    raw = None
    for i, arg in enumerate(args):
        if arg == "--root" and i + 1 < len(args):
            raw = args[i + 1]
            break
        if arg.startswith("--root="):
            raw = arg[len("--root="):]
            break
    if raw is None:
        return None
    if not os.path.isabs(raw):  # relative to that process's working directory
        try:
            raw = os.path.join(os.readlink(f"/proc/{pid}/cwd"), raw)
        except OSError:
            return None
    return os.path.realpath(raw)


def _listdir(path: str) -> List[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _unlink(fn, name: str) -> int:
    try:
        fn(name)
        return 1
    except posix_ipc.ExistentialError:
        return 0
