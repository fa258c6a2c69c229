"""Behaviour of ipc/names.py, ipc/control.py, ipc/leftovers.py, ipc/trylock.py and ipc/fdlimit.py
that a mutation audit found unpinned: tests written from that audit's surviving mutants."""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import mmap
import os
import signal
import subprocess
import sys
import threading

import posix_ipc
import pytest

import ringutil
from ironwal_mp.errors import ConfigError, SharedMemoryError
from ironwal_mp.ipc import control as C
from ironwal_mp.ipc import fdlimit
from ironwal_mp.ipc import leftovers
from ironwal_mp.ipc import names as N
from ironwal_mp.ipc import ring_layout as L
from ironwal_mp.ipc import trylock
from ironwal_mp.ipc.names import Names
from ironwal_mp.ipc.queues import Queue
from ironwal_mp.ipc.ring import Ring, pid_alive

SLEEPER = "import time; time.sleep(120)"


@pytest.fixture
def own_names(tmp_path):
    """The Names of a root of this test's own; every object of its prefix is removed afterwards."""
    root = tmp_path / "ipcroot"
    root.mkdir()
    names = Names(str(root))
    yield names
    names.remove_all()
    assert names.leftovers() == []


@pytest.fixture
def children():
    """Start processes for one test; every one still running is killed and reaped afterwards."""
    procs = []

    def start(args, stdin=subprocess.DEVNULL) -> subprocess.Popen:
        proc = subprocess.Popen(args, stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)
        # (vfork lets Popen return before the kernel has set the new command line up)
        want = b"\0".join(os.fsencode(a) for a in args) + b"\0"
        for _ in range(3000):  # (a hang guard, not a time check)
            with open(f"/proc/{proc.pid}/cmdline", "rb") as fh:
                if fh.read() == want:
                    return proc
            threading.Event().wait(0.01)
        pytest.fail(f"{args} did not start")

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def _mappings_of(name: str) -> int:
    """How many of this process's memory mappings are of the shared memory ``name``."""
    path = N.SHM_DIR + name
    with open("/proc/self/maps") as fh:
        return sum(1 for line in fh if line.rstrip("\n").split(" ", 5)[-1].strip().startswith(path))


def _nfds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _shm_exists(name: str) -> bool:
    try:
        posix_ipc.SharedMemory(name).close_fd()
    except posix_ipc.ExistentialError:
        return False
    return True


# --- ipc/names.py --------------------------------------------------------------------------------


def test_the_prefix_is_the_first_12_hex_digits_of_the_real_paths_sha1(tmp_path):
    """PROTOCOL §2: ``P = /ironwal_<first 12 hex digits of sha1(realpath(root))>``; a symlinked
    spelling of the root names the same objects."""
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    want = "/ironwal_" + hashlib.sha1(os.fsencode(os.path.realpath(real))).hexdigest()[:12]
    assert N.prefix_for(str(real)) == want
    assert N.prefix_for(str(link)) == want
    assert Names(str(link)).control == want + "_ctl"


def test_the_mqueue_mount_is_found_in_the_mount_table_when_dev_mqueue_is_missing(monkeypatch):
    """Without /dev/mqueue the first mount of type ``mqueue`` is used, its escaped spaces
    decoded; lines of other types, and lines too short to have a type, are passed over."""
    real_isdir = os.path.isdir
    monkeypatch.setattr(os.path, "isdir", lambda p: False if p == "/dev/mqueue" else real_isdir(p))
    table = ["proc /proc proc rw,nosuid 0 0", "two fields", "mqueue /run/my\\040mq mqueue",
             "mqueue /second mqueue rw 0 0"]

    def fake_open(path, *args, **kw):
        assert path == "/proc/self/mounts"
        return io.StringIO("\n".join(table) + "\n")

    monkeypatch.setattr(N, "open", fake_open, raising=False)
    assert N._mqueue_dir() == "/run/my mq"
    table[:] = ["proc /proc proc rw 0 0"]
    assert N._mqueue_dir() == "/dev/mqueue"  # (not mounted at all: the convention)


def test_ring_shards_lists_only_this_roots_numbered_rings(tmp_path, monkeypatch):
    names = Names(str(tmp_path / "nowhere"))  # (no real object: a directory stands in for /dev/shm)
    shm = tmp_path / "fake_shm"
    shm.mkdir()
    stem = names.prefix.lstrip("/")
    for entry in [f"{stem}_ring000", f"{stem}_ring012", f"{stem}_ringx", f"{stem}_ring",
                  f"{stem}_lock001", f"sem.{stem}_lock003", "ironwal_0123456789ab_ring004"]:
        (shm / entry).touch()
    monkeypatch.setattr(N, "SHM_DIR", str(shm))
    assert names.ring_shards() == [0, 12]


def test_leftovers_lists_this_roots_shared_memory_semaphores_and_queues(tmp_path, monkeypatch):
    names = Names(str(tmp_path / "nowhere"))
    shm, mq = tmp_path / "fake_shm", tmp_path / "fake_mq"
    shm.mkdir()
    mq.mkdir()
    stem = names.prefix.lstrip("/")
    for entry in [f"{stem}_ring000", f"sem.{stem}_lock000", "other_thing", "sem.other", f"zzzz{stem}_x"]:
        (shm / entry).touch()
    for entry in [f"{stem}_coord", "other_q"]:
        (mq / entry).touch()
    monkeypatch.setattr(N, "SHM_DIR", str(shm))
    monkeypatch.setattr(N, "MQUEUE_DIR", str(mq))
    assert sorted(names.leftovers()) == sorted([f"{shm}/{stem}_ring000", f"{shm}/sem.{stem}_lock000",
                                                f"{mq}/{stem}_coord"])


@pytest.fixture
def unlinks(monkeypatch):
    """posix_ipc's three unlink functions, recorded instead of run; names in ``gone`` raise
    ExistentialError (removed meanwhile)."""
    calls = {"sem": [], "shm": [], "mq": []}
    gone: set = set()

    def recorder(kind):
        def unlink(name):
            calls[kind].append(name)
            if name in gone:
                raise posix_ipc.ExistentialError(name)

        return unlink

    monkeypatch.setattr(posix_ipc, "unlink_semaphore", recorder("sem"))
    monkeypatch.setattr(posix_ipc, "unlink_shared_memory", recorder("shm"))
    monkeypatch.setattr(posix_ipc, "unlink_message_queue", recorder("mq"))
    return calls, gone


def test_remove_all_unlinks_each_kind_by_name_but_those_kept(tmp_path, monkeypatch, unlinks):
    calls, gone = unlinks
    names = Names(str(tmp_path / "nowhere"))  # (no real object: the unlinks are recorded)
    p = names.prefix
    stem = p.lstrip("/")
    shm, mq = tmp_path / "fake_shm", tmp_path / "fake_mq"
    shm.mkdir()
    mq.mkdir()
    for entry in [f"{stem}_ring000", f"{stem}_ring001", f"sem.{stem}_lock000", f"sem.{stem}_lock001",
                  "other_x", "sem.other_y"]:
        (shm / entry).touch()
    for entry in [f"{stem}_coord", f"{stem}_wrep", f"{stem}_cli1f", "other_q"]:
        (mq / entry).touch()
    monkeypatch.setattr(N, "SHM_DIR", str(shm))
    monkeypatch.setattr(N, "MQUEUE_DIR", str(mq))
    gone.add(f"{p}_wrep")  # vanished meanwhile: not counted
    removed = names.remove_all(keep=[f"{p}_ring001", f"{p}_lock001", f"{p}_cli1f"])
    assert calls["sem"] == [f"{p}_lock000"] and calls["shm"] == [f"{p}_ring000"]
    assert sorted(calls["mq"]) == [f"{p}_coord", f"{p}_wrep"]
    assert removed == 3


def test_remove_all_without_an_mqueue_mount_unlinks_every_queue_name_it_knows(tmp_path, monkeypatch, unlinks):
    """With the mqueue file system nowhere to be listed, the coordinator's queues and the command
    queues of all 256 possible workers are unlinked by name."""
    calls, gone = unlinks
    names = Names(str(tmp_path / "nowhere"))
    shm = tmp_path / "fake_shm"
    shm.mkdir()
    monkeypatch.setattr(N, "SHM_DIR", str(shm))
    monkeypatch.setattr(N, "MQUEUE_DIR", str(tmp_path / "no_mqueue_mount"))
    gone.add(names.worker_replies)
    want = [names.coordinator_queue, names.worker_replies] + [names.worker_queue(w) for w in range(C.MAX_WORKERS)]
    assert names.remove_all() == len(want) - 1
    assert calls["mq"] == want and calls["sem"] == calls["shm"] == []


def test_create_shm_replaces_a_stale_object_and_allocates_exactly_its_size(own_names):
    name = own_names.ring(7)
    stale = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=2 * mmap.PAGESIZE)
    os.pwrite(stale.fd, b"stale", 0)
    stale.close_fd()
    shm = N.create_shm(name, mmap.PAGESIZE)
    try:
        st = os.fstat(shm.fd)
        assert st.st_size == mmap.PAGESIZE
        assert st.st_blocks * 512 >= mmap.PAGESIZE  # every page allocated now
        assert os.pread(shm.fd, 5, 0) == b"\0" * 5
    finally:
        shm.close_fd()


def test_a_create_shm_that_cannot_allocate_leaves_no_object_and_no_descriptor(own_names, monkeypatch):
    name = own_names.ring(8)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    before = _nfds()
    with pytest.raises(OSError):
        N.create_shm(name, mmap.PAGESIZE)
    assert _nfds() == before
    assert not _shm_exists(name)


def test_root_arg_reads_both_spellings_and_only_with_a_value(tmp_path):
    root = tmp_path / "wal"
    root.mkdir()
    want = os.path.realpath(root)
    assert N._root_arg(1, ["python", "-m", "workers", "--index", "0", "--root", str(root)]) == want
    assert N._root_arg(1, ["python", "-m", "coordinator", f"--root={root}", "--x"]) == want
    assert N._root_arg(1, ["python", "-m", "workers", "--root"]) is None
    assert N._root_arg(1, ["python", "-m", "workers"]) is None


def test_a_relative_root_arg_is_resolved_against_that_processs_working_directory(tmp_path, monkeypatch):
    theirs = tmp_path / "theirs"
    (theirs / "wal").mkdir(parents=True)
    real_readlink = os.readlink

    def readlink(path, *a, **kw):
        if path == "/proc/4242/cwd":
            return str(theirs)
        if path == "/proc/4343/cwd":
            raise PermissionError(errno.EACCES, "not ours")
        return real_readlink(path, *a, **kw)

    monkeypatch.setattr(os, "readlink", readlink)
    monkeypatch.chdir(tmp_path)  # (ours differs from theirs)
    assert N._root_arg(4242, ["workers", "--root", "wal"]) == os.path.realpath(theirs / "wal")
    assert N._root_arg(4343, ["workers", "--root", "wal"]) is None


def test_processes_of_matches_role_and_real_root_and_none_matches_the_root_anywhere(tmp_path, children):
    root = tmp_path / "wal"
    root.mkdir()
    other = tmp_path / "wal2"
    other.mkdir()
    link = tmp_path / "link"
    link.symlink_to(root)
    py = [sys.executable, "-S", "-c", SLEEPER]
    worker = children(py + ["workers", "--root", str(root)])
    coordinator = children(py + ["coordinator", "--root", str(link)])
    elsewhere = children(py + ["workers", "--root", str(other)])
    roleless = children(py + ["--root", str(root)])
    found = {pid for pid, _ in N.processes_of(str(root))}
    assert found == {worker.pid, coordinator.pid}
    assert {pid for pid, _ in N.processes_of(str(root), roles=("workers",))} == {worker.pid}
    anywhere = dict(N.processes_of(str(root), roles=None))
    assert {worker.pid, elsewhere.pid, roleless.pid} <= set(anywhere)  # (".../wal" is in ".../wal2")
    assert coordinator.pid not in anywhere and os.getpid() not in anywhere
    assert anywhere[worker.pid] == " ".join(py + ["workers", "--root", str(root)])


def test_processes_of_skips_this_process_itself(tmp_path):
    with open(f"/proc/{os.getpid()}/cmdline", "rb") as fh:
        mine = fh.read().split(b"\0")[0].decode()  # (in this command line, and others')
    assert os.getpid() not in {pid for pid, _ in N.processes_of(mine, roles=None)}


def test_processes_of_reads_the_state_after_a_name_holding_a_parenthesis(tmp_path, children):
    """The state letter follows the *last* ") " of /proc/<pid>/stat: a live process whose name
    is ``x) Z`` is not a zombie."""
    root = tmp_path / "wal"
    root.mkdir()
    exe = tmp_path / "x) Z"
    exe.symlink_to(os.path.realpath(sys.executable))
    live = children([str(exe), "-S", "-c", SLEEPER, "workers", "--root", str(root)])
    with open(f"/proc/{live.pid}/stat", "rb") as fh:
        assert fh.read().startswith(f"{live.pid} (x) Z) ".encode())
    assert [pid for pid, _ in N.processes_of(str(root))] == [live.pid]


# --- ipc/control.py ------------------------------------------------------------------------------


def test_the_control_block_layout_is_the_documented_one():
    """PROTOCOL §9: every process of a root, and the next run's coordinator (possibly of another
    version), reads the block by these u64 indexes."""
    assert C.CTL_MAGIC == int.from_bytes(b"IWMPCTL1", "big")
    assert C.SIZE == 16384 and C.FIELDS == C.SIZE // 8 == 2048
    assert (C.MAGIC, C.COORD_PID, C.STATE, C.SHARD_COUNT, C.WORKERS, C.RING_CAPACITY, C.STARTED_NS,
            C.STARTER_PID, C.SYNC_MODE, C.EPOCH, C.FLUSH_US, C.IDLE_FLUSH_OFF) == tuple(range(12))
    assert (C.WORKER_PIDS, C.MAX_WORKERS, C.WORKER_OF_SHARD, C.CLIENTS, C.MAX_CLIENTS) == (64, 256, 320, 1320, 128)
    assert C.CLIENTS + 2 * C.MAX_CLIENTS <= C.FIELDS
    assert (C.ST_STARTING, C.ST_READY, C.ST_CLOSING, C.ST_CLOSED, C.ST_FAILED) == (0, 1, 2, 3, 4)
    assert C.SYNC_CODES == {"strict": 0, "batch_only": 1, "async": 2}
    assert C.SYNC_NAMES == {0: "strict", 1: "batch_only", 2: "async"}
    assert C.DEFAULT_FLUSH_US == 100_000  # (FLUSH_US = 0: 100 ms)


def test_a_new_block_is_starting_names_its_creator_and_has_a_nonzero_epoch(own_names):
    block = C.ControlBlock(own_names, create=True)
    try:
        shm = posix_ipc.SharedMemory(own_names.control)
        try:
            assert os.pread(shm.fd, 8, 0) == b"IWMPCTL1"[::-1]  # (a little-endian u64 at offset 0)
        finally:
            shm.close_fd()
        assert block.state == C.ST_STARTING and block.coordinator_pid == os.getpid()
        assert block.epoch != 0
    finally:
        block.close()
        block.unlink()


def test_a_block_costs_one_descriptor_and_close_unmaps_it(own_names):
    """mmap keeps a descriptor of its own, so posix_ipc's is closed at once; close() unmaps; a
    close that leaves the memory to reference counting keeps the block readable."""
    before = _nfds()
    owner = C.ControlBlock(own_names, create=True)
    assert _nfds() - before == 1
    reader = C.ControlBlock(own_names)
    kept = C.ControlBlock(own_names)
    try:
        assert _nfds() - before == 3
        assert _mappings_of(own_names.control) == 3
        reader.close()
        assert _mappings_of(own_names.control) == 2
        with pytest.raises(ValueError):
            reader.state
        kept.close(release_memory=False)
        assert kept.state == C.ST_STARTING  # still readable
    finally:
        owner.close()
        owner.unlink()
    del kept


def test_unlink_removes_the_block(own_names):
    block = C.ControlBlock(own_names, create=True)
    block.close()
    assert C.ControlBlock.try_open(own_names) is not None
    block.unlink()
    assert not _shm_exists(own_names.control)
    assert C.ControlBlock.try_open(own_names) is None
    block.unlink()  # (a second one is harmless)


def test_a_block_without_the_magic_is_refused(own_names):
    shm = posix_ipc.SharedMemory(own_names.control, posix_ipc.O_CREX, size=C.SIZE)
    shm.close_fd()
    with pytest.raises(SharedMemoryError):
        C.ControlBlock(own_names)
    assert C.ControlBlock.try_open(own_names) is None


def test_worker_and_client_tables_are_read_and_written_at_their_documented_places(own_names):
    block = C.ControlBlock(own_names, create=True)
    try:
        f = block.f
        f[C.WORKERS] = 3
        for w, pid in enumerate([101, 102, 103, 999]):
            f[64 + w] = pid
        assert block.worker_pids() == [101, 102, 103]
        f[320 + 0], f[320 + 5] = 2, 1
        assert (block.worker_of(0), block.worker_of(5)) == (2, 1)

        block.set_clients([(11, 0xA), (12, 0xB)])
        assert list(f[1320:1326]) == [11, 0xA, 12, 0xB, 0, 0]
        assert block.clients() == [(11, 0xA), (12, 0xB)]
        block.set_clients([(13, 0xC)])  # a shorter table frees the rest: 0 in both words
        assert list(f[1320:1324]) == [13, 0xC, 0, 0]
        assert block.clients() == [(13, 0xC)]
        f[1320] = 0  # a free slot before a used one is skipped
        f[1320 + 2 * 3], f[1320 + 2 * 3 + 1] = 14, 0xD
        assert block.clients() == [(14, 0xD)]

        many = [(1000 + i, 2000 + i) for i in range(C.MAX_CLIENTS + 2)]
        block.set_clients(many)  # pairs beyond 128 are not recorded
        assert block.clients() == many[:C.MAX_CLIENTS]
        assert f[1320 + 2 * 127] == 1127 and f[1320 + 2 * 127 + 1] == 2127
    finally:
        block.close()
        block.unlink()


# --- ipc/leftovers.py ----------------------------------------------------------------------------


def _ring(names: Names, shard: int, records: int = 0) -> Ring:
    """A ring of an earlier run: open, holding ``records`` records no worker has written."""
    ring = Ring(names, shard, capacity=4096, create=True)
    ringutil.open_ring(ring, 1)
    for i in range(records):
        ring.append_one(b"record %d" % i)
    return ring


def _lock_value(names: Names, shard: int) -> int:
    sem = posix_ipc.Semaphore(names.ring_lock(shard))
    try:
        return sem.value
    finally:
        sem.close()


def _state(names: Names, shard: int) -> int:
    ring = Ring(names, shard, wake=False)
    try:
        return ring.header[L.STATE]
    finally:
        ring.close()


def test_a_ring_holding_unwritten_records_is_kept_closed_to_producers(own_names, caplog):
    old = _ring(own_names, 0, records=1)
    written = old.published()[0]
    old.append_one(b"not yet written")
    tail = old.published()[0]
    old.set_head(written, 2)  # (the worker wrote the first record)
    old.close()
    caplog.set_level(logging.WARNING, logger="ironwal_mp.leftovers")
    kept = leftovers.keep_or_drop_ring(own_names, 0)
    assert kept is not None
    try:
        assert kept.header[L.STATE] == L.ST_CLOSED
        assert _lock_value(own_names, 0) == 1  # taken for the decision, and given back
        assert f"shard 0: keeping a ring from an earlier run ({tail - written} unwritten bytes)" in caplog.text
    finally:
        kept.close()


def test_an_open_ring_with_nothing_unwritten_is_dropped_closed_and_unmapped(own_names):
    _ring(own_names, 0).close()
    before = _mappings_of(own_names.ring(0))
    assert leftovers.keep_or_drop_ring(own_names, 0) is None
    assert _mappings_of(own_names.ring(0)) == before
    assert _state(own_names, 0) == L.ST_CLOSED
    assert _lock_value(own_names, 0) == 1


def test_a_new_ring_is_dropped_and_left_new(own_names):
    Ring(own_names, 0, capacity=4096, create=True).close()
    assert leftovers.keep_or_drop_ring(own_names, 0) is None
    assert _state(own_names, 0) == L.ST_NEW
    assert _lock_value(own_names, 0) == 1


def test_a_ring_that_failed_at_resume_is_kept_and_one_failed_otherwise_is_not(own_names, caplog):
    """Only ERR_CANNOT_RESUME keeps a failed ring that holds nothing unwritten (its ids are
    remembered nowhere else)."""
    for shard, code in [(0, L.ERR_CANNOT_RESUME), (1, errno.EIO)]:
        ring = _ring(own_names, shard)
        ring.header[L.ERRNO] = code
        ring.set_state(L.ST_FAILED)
        ring.close()
    caplog.set_level(logging.WARNING, logger="ironwal_mp.leftovers")
    kept = leftovers.keep_or_drop_ring(own_names, 0)
    assert kept is not None
    kept.close()
    assert "shard 0: keeping a ring from an earlier run (0 unwritten bytes, failed at resume)" in caplog.text
    assert leftovers.keep_or_drop_ring(own_names, 1) is None


def test_clear_leftovers_keeps_rings_with_records_and_removes_every_other_object(tmp_path, own_names, children,
                                                                                caplog):
    """Rings beyond the shard count given are looked at too; a leftover worker is stopped; the
    objects named in ``keep`` (a starter's notify queue) are spared."""
    root = str(tmp_path / "ipcroot")
    for shard, records in [(0, 1), (1, 0), (3, 2)]:
        _ring(own_names, shard, records).close()
    Queue(own_names.coordinator_queue, create=True).close()
    notify = own_names.client_queue(0xBEEF)
    Queue(notify, create=True).close()
    worker = children([sys.executable, "-S", "-c", SLEEPER, "workers", "--root", root])
    caplog.set_level(logging.INFO, logger="ironwal_mp.leftovers")
    kept = leftovers.clear_leftovers(root, own_names, 2, keep=[notify], wait_s=0)
    try:
        assert sorted(kept) == [0, 3]
        assert all(isinstance(ring, Ring) and ring.shard == shard for shard, ring in kept.items())
        want = {own_names.ring(s)[1:] for s in (0, 3)} | {notify[1:]}
        want |= {"sem." + n[1:] for s in (0, 3) for n in Ring.object_names(own_names, s)[1:]}
        assert {os.path.basename(p) for p in own_names.leftovers()} == want
        assert worker.wait(30) == -signal.SIGKILL
        # (the sweep finds the coordinator's queue and worker 0's wake semaphore: ring 1's objects
        # went with their ring)
        assert "removed 2 stale IPC objects of " + own_names.prefix in caplog.text
    finally:
        for ring in kept.values():
            ring.close()


def test_clear_leftovers_removes_the_old_blocks_client_queues_without_an_mqueue_mount(tmp_path, own_names,
                                                                                     monkeypatch):
    """With no mqueue file system to sweep, a client's reply queue (``P_cli<token>``, a name no
    sweep can guess) is found through the old control block's client table; the block itself is
    unmapped again."""
    root = str(tmp_path / "ipcroot")
    block = C.ControlBlock(own_names, create=True)
    block.set_clients([(os.getpid(), 0x5A5A)])
    block.close()
    Queue(own_names.client_queue(0x5A5A), create=True).close()
    monkeypatch.setattr(N, "MQUEUE_DIR", str(tmp_path / "no_mqueue_mount"))
    assert leftovers.clear_leftovers(root, own_names, 1, wait_s=0) == {}
    assert _mappings_of(own_names.control) == 0
    with pytest.raises(posix_ipc.ExistentialError):
        posix_ipc.MessageQueue(own_names.client_queue(0x5A5A))
    assert not _shm_exists(own_names.control)


class _WaitClock:
    """leftovers' ``time``, whose first sleep (the wait for a worker) asks the worker to finish."""

    def __init__(self, on_first_sleep):
        import time

        self._time, self._hook = time, on_first_sleep

    def monotonic(self):
        return self._time.monotonic()

    def sleep(self, s):
        if self._hook is not None:
            hook, self._hook = self._hook, None
            hook()
        self._time.sleep(s)


def test_a_leftover_worker_gets_the_time_given_to_finish(tmp_path, children, monkeypatch):
    root = tmp_path / "wal"
    root.mkdir()
    worker = children([sys.executable, "-S", "-c", "import sys; sys.stdin.read()", "workers", "--root", str(root)],
                      stdin=subprocess.PIPE)
    monkeypatch.setattr(leftovers, "time", _WaitClock(worker.stdin.close))
    leftovers.stop_leftover_workers(str(root), wait_s=60)
    assert worker.wait(30) == 0, "the worker was killed instead of being waited for"


def test_a_leftover_worker_still_there_after_the_wait_is_killed_and_gone_on_return(tmp_path, children, caplog):
    root = tmp_path / "wal"
    root.mkdir()
    worker = children([sys.executable, "-S", "-c", SLEEPER, "workers", "--root", str(root)])
    caplog.set_level(logging.WARNING, logger="ironwal_mp.leftovers")
    leftovers.stop_leftover_workers(str(root), wait_s=0)
    assert not pid_alive(worker.pid)
    assert worker.wait(30) == -signal.SIGKILL
    assert f"killing leftover worker {worker.pid}" in caplog.text


def test_the_leftover_wait_is_15_seconds_unless_given(tmp_path):
    """PROTOCOL §11: the start-up waits up to 15 s for an earlier run's workers."""
    assert leftovers.LEFTOVER_WAIT_S == 15.0
    leftovers.stop_leftover_workers(str(tmp_path / "none"))  # (no worker: returns at once)


# --- ipc/trylock.py ------------------------------------------------------------------------------


def test_the_posix_ipc_try_acquire_never_waits(sem_name, monkeypatch):
    """The fallback's try-acquire passes a zero timeout every time, also on a held lock (the
    append path then takes its slow path at once)."""
    real = posix_ipc.Semaphore
    timeouts = []

    class Spy:
        def __init__(self, name):
            self._sem = real(name)

        def acquire(self, timeout=None):
            timeouts.append(timeout)
            return self._sem.acquire(timeout)

        def release(self):
            self._sem.release()

        def close(self):
            self._sem.close()

    monkeypatch.setattr(posix_ipc, "Semaphore", Spy)
    acquire, release, handle = trylock._posix_ipc_pair(sem_name)
    try:
        assert acquire(False) is True
        assert acquire(False) is False
        release()
        assert timeouts == [0, 0]
    finally:
        handle.close()


def test_the_probe_refuses_a_semlock_that_does_not_act_on_the_kernel_semaphore(monkeypatch):
    """A SemLock that attaches by name but whose acquire does not take the semaphore posix_ipc
    sees is a difference: posix_ipc is used."""
    import _multiprocessing

    class Detached:
        @classmethod
        def _rebuild(cls, *args):
            return cls()

        def acquire(self, block=True):
            return True

        def release(self):
            pass

    monkeypatch.setattr(_multiprocessing, "SemLock", Detached)
    assert trylock._probe() is False


# --- ipc/fdlimit.py ------------------------------------------------------------------------------


class _Limits:
    """Stands in for the resource module: one RLIMIT_NOFILE, setrlimit recorded."""

    RLIMIT_NOFILE = 7
    RLIM_INFINITY = -1

    def __init__(self, soft, hard):
        self.soft, self.hard, self.set = soft, hard, []

    def getrlimit(self, which):
        assert which == self.RLIMIT_NOFILE
        return self.soft, self.hard

    def setrlimit(self, which, limits):
        assert which == self.RLIMIT_NOFILE
        self.set.append(limits)


@pytest.fixture
def limits(monkeypatch):
    monkeypatch.setattr(fdlimit, "_open_now", lambda: 100)

    def make(soft, hard):
        fake = _Limits(soft, hard)
        monkeypatch.setattr(fdlimit, "resource", fake)
        return fake

    return make


def test_a_soft_limit_with_room_enough_is_left_alone(limits):
    rl = limits(1024, 4096)
    fdlimit.ensure_descriptors(1024 - 100 - fdlimit.SLACK)  # exactly at the soft limit
    fdlimit.ensure_descriptors(5)
    assert rl.set == []
    rl = limits(-1, -1)  # an unlimited soft limit
    fdlimit.ensure_descriptors(100_000)
    assert rl.set == []


def test_the_soft_limit_is_raised_with_slack_but_never_past_the_hard_one(limits):
    rl = limits(1024, 4096)
    fdlimit.ensure_descriptors(1000)
    want = 100 + 1000 + fdlimit.SLACK
    assert rl.set == [(want + fdlimit.SLACK, 4096)]
    rl = limits(1024, want + 10)
    fdlimit.ensure_descriptors(1000)
    assert rl.set == [(want + 10, want + 10)]
    rl = limits(1024, want)  # exactly the hard limit: enough
    fdlimit.ensure_descriptors(1000)
    assert rl.set == [(want, want)]
    rl = limits(1024, -1)  # an unlimited hard limit
    fdlimit.ensure_descriptors(1000)
    assert rl.set == [(want + fdlimit.SLACK, -1)]


def test_a_hard_limit_too_low_is_a_config_error_naming_the_field(limits):
    rl = limits(1024, 1200)
    with pytest.raises(ConfigError) as info:
        fdlimit.ensure_descriptors(1000, field="workers")
    assert info.value.field == "workers"
    assert "1200" in str(info.value) and str(100 + 1000 + fdlimit.SLACK) in str(info.value)
    assert rl.set == []
