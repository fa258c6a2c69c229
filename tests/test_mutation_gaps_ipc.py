"""Behaviour of ipc/queues.py and ipc/shm_room.py that a mutation audit found unpinned."""

from __future__ import annotations

import os
import threading
import time

import posix_ipc
import pytest

from ironwal_mp.ipc import messages as M
from ironwal_mp.ipc import shm_room as R
from ironwal_mp.ipc.queues import DEPTH, Queue

MIB = 1 << 20


@pytest.fixture
def qname():
    """Make queue names for one test; every one is unlinked afterwards, whatever happened."""
    names = []

    def make(tag: str) -> str:
        name = f"/iwmp-mutgap-{os.getpid()}-{tag}"
        names.append(name)
        return name

    yield make
    for name in names:
        try:
            posix_ipc.unlink_message_queue(name)
        except posix_ipc.ExistentialError:
            pass


def _exists(name: str) -> bool:
    try:
        posix_ipc.MessageQueue(name).close()
    except posix_ipc.ExistentialError:
        return False
    return True


def _descriptors_of(name: str) -> int:
    """How many of this process's descriptors point at the message queue ``name``."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target == name or target.startswith(name + " "):
            count += 1
    return count


# --- ipc/queues.py -------------------------------------------------------------------------------


@pytest.mark.parametrize("timeout", [10.0, None])
def test_a_timed_receive_waits_for_a_message_sent_later(qname, timeout):
    """A receive with a timeout (or none) blocks until a message arrives; only a zero timeout
    is a poll that gives up at once on an empty queue."""
    name = qname("late")
    q = Queue(name, create=True)
    ready = threading.Event()

    def later():
        sender = Queue(name)
        try:
            ready.wait(10)
            time.sleep(0.2)  # (the receive below is meant to be blocked by then)
            sender.send(M.Message(M.OK, 1, 41, {"k": "v"}))
        finally:
            sender.close()

    thread = threading.Thread(target=later)
    thread.start()
    try:
        ready.set()
        msg = q.receive(timeout)
        assert msg is not None and msg.req_id == 41 and msg.body == {"k": "v"}
    finally:
        thread.join(30)
        q.close()


def test_a_send_to_a_full_queue_retries_while_the_peer_is_alive(qname):
    """While the queue is full, ``alive`` is consulted and the part is tried again until the
    timeout; a reader that makes room in the meantime lets the send complete."""
    q = Queue(qname("full"), create=True)
    try:
        for i in range(DEPTH):
            q.send(M.Message(M.OK, 1, i, {}))
        calls = []

        def alive():
            calls.append(q.receive(0))  # the peer reads one message: there is room again

        q.send(M.Message(M.OK, 1, 99, {}), timeout=30.0, alive=alive)
        assert calls and calls[0].req_id == 0
        got = [q.receive(0) for _ in range(DEPTH)]
        assert [m.req_id for m in got] == list(range(1, DEPTH)) + [99]
        assert q.receive(0) is None
    finally:
        q.close()


def test_creating_a_queue_over_a_leftover_replaces_it(qname):
    """A queue left under the name (a crashed run's) is removed and made anew, empty."""
    name = qname("stale")
    stale = Queue(name, create=True)
    try:
        stale.send(M.Message(M.OK, 1, 5, {}))
        fresh = Queue(name, create=True)
        try:
            assert fresh.receive(0) is None, "the leftover's message was carried over"
            fresh.send(M.Message(M.OK, 1, 6, {}))
            assert fresh.receive(0).req_id == 6
        finally:
            fresh.close()
    finally:
        stale.close()


def test_unlink_removes_the_queue_name(qname):
    """``unlink`` removes the name (opening it then fails); a second unlink is harmless."""
    name = qname("unlink")
    q = Queue(name, create=True)
    try:
        assert _exists(name)
        q.unlink()
        assert not _exists(name)
        with pytest.raises(posix_ipc.ExistentialError):
            Queue(name)
        q.unlink()
    finally:
        q.close()


def test_unlink_name_removes_a_queue_by_name_and_ignores_a_missing_one(qname):
    """The static ``unlink_name`` removes a queue by name alone, and a missing name is no error."""
    name = qname("byname")
    Queue(name, create=True).close()
    assert _exists(name)
    Queue.unlink_name(name)
    assert not _exists(name)
    Queue.unlink_name(name)


def test_close_releases_every_descriptor_of_the_queue(qname):
    """A poll opens a second, non-blocking descriptor of the queue beside the blocking one
    (a poll then costs no kernel timer); ``close`` releases both."""
    name = qname("close")
    assert _descriptors_of(name) == 0
    q = Queue(name, create=True)
    try:
        q.send(M.Message(M.OK, 1, 1, {}))
        assert q.receive(0) is not None
        assert q.receive(0.01) is None
        assert _descriptors_of(name) == 2, "a poll reads through a second, non-blocking descriptor"
    finally:
        q.close()
    assert _descriptors_of(name) == 0


# --- ipc/shm_room.py -----------------------------------------------------------------------------


def test_the_memory_reserve_is_64_mib_when_an_eighth_is_less():
    """64 MiB are left alone whenever an eighth of the memory available is smaller."""
    assert R.memory_reserve(100 * MIB) == 64 * MIB
    assert R.memory_reserve(512 * MIB) == 64 * MIB
    assert R.memory_reserve(1024 * MIB) == 128 * MIB
    avail = 100 * MIB
    assert R.refusal(36 * MIB, R.Room(None, avail)) is None
    assert R.refusal(36 * MIB + 1, R.Room(None, avail)) is not None
    assert R.refusal(36 * MIB, R.Room(None, None, avail)) is None
    assert R.refusal(36 * MIB + 1, R.Room(None, None, avail)) is not None


def test_inactive_file_cache_beyond_the_usage_counts_as_nothing_used():
    """Figures read at different moments may show more inactive cache than usage: the usage
    then counts as zero, and the whole limit is room."""
    assert R.cgroup_headroom(1000, 100, 300) == 1000
    assert R.cgroup_headroom(1000, 300, 300) == 1000


def _fake_proc(root, files: dict) -> str:
    """A directory tree under ``root`` holding ``files`` ({relative path: content})."""
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(root)


def test_mem_available_is_read_from_meminfo_in_kib(tmp_path):
    proc = _fake_proc(tmp_path / "proc", {
        "meminfo": "MemTotal:        8000000 kB\nMemFree:          100000 kB\nMemAvailable:    1234567 kB\n",
    })
    room = R.read_room(proc, str(tmp_path / "no_cgroup"))
    assert room.mem_available == 1234567 * 1024
    assert room.cgroup_room is None


def test_a_cgroup_limit_at_the_unlimited_mark_is_no_limit(tmp_path):
    """A v1 limit equal to the "no limit" threshold limits nothing; one byte less does."""
    for limit, expected in ((R.CGROUP_UNLIMITED, None), (R.CGROUP_UNLIMITED - 1, R.CGROUP_UNLIMITED - 1 - 5000)):
        base = tmp_path / str(limit)
        proc = _fake_proc(base / "proc", {"self/cgroup": "4:memory:/\n"})
        cgroup = _fake_proc(base / "cgroup", {
            "memory/memory.limit_in_bytes": f"{limit}\n",
            "memory/memory.usage_in_bytes": "5000\n",
        })
        assert R.read_room(proc, cgroup).cgroup_room == expected, limit
