"""The shard ring in real POSIX shared memory and named semaphores (ironwal_mp.ipc.ring).

The test process plays the worker (next_slice / consume / skip_records / set_view); producers
are this process, threads in it, or child processes started with ``python -c`` (helpers in
ringutil.py). Every test uses its own root (its own object names) and removes what it created;
the fixture asserts that nothing of the root is left in /dev/shm.

No timing assertions: timeouts only bound hangs.
"""

from __future__ import annotations

import errno
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import posix_ipc
import pytest

import ringutil
from ringutil import Drainer, encode, pattern
from ironwal_mp.errors import RecordTooLargeError, WalClosedError, WorkerFailedError
from ironwal_mp.ipc import ring as ring_mod
from ironwal_mp.ipc import ring_layout as L
from ironwal_mp.ipc.names import Names
from ironwal_mp.ipc.ring import Ring

HANG = 30.0  # upper bound against hangs, never a performance expectation


@pytest.fixture
def make_ring(tmp_path):
    """make_ring(capacity, first_seq) -> an open Ring (created here; removed at teardown)."""
    made = []
    children = []

    def make(capacity: int = 4096, first_seq: int = 1) -> Ring:
        root = tmp_path / f"wal{len(made)}"
        root.mkdir()
        names = Names(str(root))
        try:
            ring = Ring(names, 0, capacity=capacity, create=True)
        except BaseException:
            names.remove_all()
            raise
        made.append((names, ring))
        ring.test_root = str(root)
        ringutil.open_ring(ring, first_seq)
        return ring

    make.children = children
    yield make
    for proc in children:
        if proc.poll() is None:
            proc.kill()
        proc.wait(HANG)
    left = []
    for names, ring in made:
        left.extend(ringutil.dispose(names, ring))
    assert left == [], f"objects left behind: {left}"


def root(ring: Ring) -> str:
    """The root a ring was made for (children attach with Ring(Names(root), 0))."""
    return ring.test_root


def spawn(make_ring, func, *args):
    proc = ringutil.spawn(func, *args)
    make_ring.children.append(proc)
    return proc


def pending(ring: Ring) -> int:
    ring.acquire()
    try:
        tail = ring.published()[0]
    finally:
        ring.release()
    return tail - ring.header[L.HEAD]


# --- single process -----------------------------------------------------------------------------


def test_round_trip_append_one_and_publish_with_wraps(make_ring):
    """Mixed append_one / publish, drained whenever the next block would not fit: every record
    comes back once, in id order, in batch encoding; many wraps happen."""
    cap = 4096
    ring = make_ring(cap, first_seq=1000)
    h = ring.header
    rng = random.Random(20240611)
    w = Drainer(ring)
    expected = []
    got = []
    next_id = 1000
    for step in range(3000):
        if rng.random() < 0.6:
            recs = [pattern(step, rng.choice([0, 1, 3, rng.randrange(0, 700)]))]
        else:
            recs = [pattern(step * 100 + i, rng.randrange(0, 300)) for i in range(rng.randrange(1, 7))]
        block = encode(recs)
        need = len(block)
        assert need <= cap // 2
        tail = ring.published()[0]
        off = tail & (cap - 1)
        skip = cap - off if off + need > cap else 0
        if (tail - h[L.HEAD]) + skip + need > cap:
            got += w.drain()  # otherwise the producer would wait for this very thread
        if len(recs) == 1 and rng.random() < 0.7:
            seq = ring.append_one(recs[0])
        else:
            seq = ring.publish(block, len(recs))
        assert seq == next_id
        expected += [(next_id + i, r) for i, r in enumerate(recs)]
        next_id += len(recs)
        if rng.random() < 0.1:
            got += w.drain(rng.randrange(1, 3))
    got += w.drain()
    assert [i for i, _ in got] == list(range(1000, next_id))
    assert got == expected
    assert h[L.HEAD_SEQ] == next_id and h[L.HEAD] == ring.published()[0]
    if hasattr(ring, "restore_head"):  # what a restarted worker would resume from
        assert ring.restore_head() == (h[L.HEAD], next_id)
    assert w.skips > 20  # wraps were exercised
    assert h[L.HOLDER] == 0
    w.assert_no_crossing()


def test_interleaved_appenders_of_one_process_keep_ids_and_bytes_exact(make_ring):
    """Each appender caches the slot it published last, trusted only while GEN is unchanged:
    three closures (and the general publish path) taking turns in random order, across many
    wraps and with the ring running full, must still give contiguous ids and intact records."""
    rng = random.Random(7)
    ring = make_ring(4096, first_seq=50)
    appenders = [ring.make_appender() for _ in range(3)]
    w = Drainer(ring)
    sent, got = [], []
    for i in range(6000):
        rec = pattern(i, rng.randrange(0, 180))
        how = rng.randrange(4)
        seq = ring.publish(encode([rec]), 1) if how == 3 else appenders[how](rec)
        assert seq == 50 + i
        sent.append((seq, rec))
        if rng.random() < 0.3 or pending(ring) > 3000:
            got += w.drain()
    got += w.drain()
    assert got == sent and w.crossings == []


def test_a_slot_rewritten_without_a_publish_is_reread(make_ring):
    """A worker that starts a ring afresh rewrites NEXT_SEQ in place and moves GEN by 2: an
    appender's cached copy of the slot must not be used after that."""
    ring = make_ring(4096, first_seq=10)
    append = ring.make_appender()
    assert [append(b"x") for _ in range(3)] == [10, 11, 12]
    h = ring.header
    ring.acquire()
    h[L.slot_base(h[L.GEN]) + L.NEXT_SEQ] = 500  # as Worker.resume does for a fresh ring
    h[L.GEN] += 2
    tail = ring.published()[0]
    ring.set_head(tail, 500)
    ring.release()
    assert append(b"y") == 500
    assert Drainer(ring).drain() == [(500, b"y")]


def test_a_producer_of_another_coordinator_epoch_is_refused(make_ring):
    """A handle whose coordinator died must not publish into the ring a successor reopened
    (the same shared memory, kept for its records): the fast path and publish() both raise
    WalClosedError and publish nothing; the current epoch's producers go on, on the fast path."""
    ring = make_ring(4096, first_seq=7)
    h = ring.header
    stale = ringutil.attach(root(ring), 0)
    stale.epoch = ringutil.TEST_EPOCH + 1
    try:
        for attempt in (lambda: stale.make_appender()(b"x"), lambda: stale.publish(encode([b"y"]), 1),
                        lambda: stale.make_appender(strict=True)(b"z")):
            with pytest.raises(WalClosedError, match="another has opened"):
                attempt()
        assert ring.next_seq() == 7 and Drainer(ring).drain() == []
        assert h[L.DUR_WAITERS] == 0 and h[L.HOLDER] == 0
        locks = h[L.LOCKS]
        assert ring.make_appender()(b"ok") == 7
        assert h[L.LOCKS] == locks, "a producer of the ring's own epoch left the fast path"
        assert Drainer(ring).drain() == [(7, b"ok")]
        ring.acquire()
        ring.set_state(L.ST_CLOSING)  # leaving OPEN clears the open epoch with it
        ring.release()
        assert h[L.OPEN_EPOCH] == 0
        with pytest.raises(WalClosedError, match="shutting down"):
            ring.make_appender()(b"late")
    finally:
        stale.close()


@pytest.mark.parametrize("then", ["opened", "failed"])
def test_a_publish_between_set_states_two_stores_waits_for_the_second(make_ring, then):
    """STATE OPEN with no OPEN_EPOCH yet (or any more) is a state change under way, as seen by a
    client that attached the moment its ring opened, or a publish racing a failing worker: it
    waits for the change to finish, never reporting another coordinator's epoch."""
    ring = make_ring(4096, first_seq=3)
    h = ring.header
    h[L.OPEN_EPOCH] = 0  # (STATE is OPEN)

    def finish():
        time.sleep(0.1)
        if then == "opened":
            h[L.OPEN_EPOCH] = ringutil.TEST_EPOCH
        else:
            h[L.ERRNO] = errno.ENOSPC
            h[L.STATE] = L.ST_FAILED

    t = threading.Thread(target=finish)
    t.start()
    try:
        if then == "opened":
            assert ring.publish(encode([b"a"]), 1) == 3
        else:
            with pytest.raises(WorkerFailedError, match="the disk is full"):
                ring.make_appender()(b"a")
    finally:
        t.join(HANG)


def test_exact_fill_then_next_record_is_two_runs(make_ring):
    """A record that fills the data area exactly to its end, then one at offset 0 published
    before the worker takes the first: two runs, never one across the end of the data area.
    (The first version published no record of that crossing: next_slice returned one run of
    count=2 past the end, a truncated frame payload that lost the second record.)"""
    ring = make_ring(4096, first_seq=1)
    w = Drainer(ring)
    assert ring.append_one(b"a" * 96) == 1  # [0, 100)
    assert [i for i, _ in w.drain()] == [1]  # head = 100
    assert ring.append_one(b"b" * (4096 - 100 - 4)) == 2  # [100, 4096): exactly to the end
    assert ring.append_one(b"c" * 6) == 3  # offset 0
    s = ring.next_slice()
    assert s.offset + s.length <= ring.capacity, f"run crosses the end of the data area: {s}"
    assert (s.offset, s.length, s.first_seq, s.count) == (100, 3996, 2, 1)
    assert w.drain() == [(2, b"b" * 3992), (3, b"c" * 6)]
    # the same through publish(), and with the worker caught up before the next record
    assert ring.publish(encode([b"d" * 10, b"e" * (4096 - 10 - 10 - 8)]), 2) == 4
    assert w.drain() == [(4, b"d" * 10), (5, b"e" * 4068)]
    assert ring.append_one(b"f") == 6
    assert w.drain() == [(6, b"f")]
    w.assert_no_crossing()


def test_record_too_large(make_ring):
    cap = 4096
    ring = make_ring(cap, first_seq=5)
    with pytest.raises(RecordTooLargeError) as err:
        ring.publish(b"\0" * (cap + 1), 1)
    assert str(cap) in str(err.value) and err.value.limit == cap and err.value.size == cap + 1
    with pytest.raises(RecordTooLargeError) as err:
        ring.append_one(b"x" * (cap - 3))  # 4 + cap - 3 = cap + 1 bytes encoded
    assert str(cap) in str(err.value)
    # nothing was published, the lock is free, and the largest record still fits
    assert ring.published()[:2] == (0, 5)
    assert ring.header[L.HOLDER] == 0
    assert ring.append_one(b"y" * (cap - 4)) == 5
    got = Drainer(ring).drain()
    assert got == [(5, b"y" * (cap - 4))]


def test_full_ring_blocks_the_producer_until_space_is_freed(make_ring):
    cap = 4096
    ring = make_ring(cap, first_seq=1)
    h = ring.header
    assert ring.publish(encode([b"F" * (cap - 4)]), 1) == 1  # one block of exactly the capacity
    assert pending(ring) == cap
    result = {}

    def producer():
        try:
            result["id"] = ring.append_one(b"after", timeout=HANG)
        except BaseException as exc:  # pragma: no cover - reported below
            result["error"] = exc

    t = threading.Thread(target=producer)
    t.start()
    deadline = time.monotonic() + HANG
    while h[L.SPACE_WAITERS] == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert h[L.SPACE_WAITERS] >= 1, "the producer never waited for space"
    assert t.is_alive() and not result  # the ring is full: it cannot have appended
    w = Drainer(ring)
    got = w.drain()
    t.join(HANG)
    assert not t.is_alive()
    assert result == {"id": 2}
    deadline = time.monotonic() + HANG
    while len(got) < 2 and time.monotonic() < deadline:
        got += w.drain()
    assert got == [(1, b"F" * (cap - 4)), (2, b"after")]
    assert h[L.SPACE_WAITERS] == 0


def test_producer_and_consumer_threads_with_capacity_sized_blocks(make_ring):
    """A producer thread publishes blocks up to exactly the capacity (so it waits for space
    often and wraps at many offsets); a consumer thread drains. No error, nothing lost."""
    cap = 4096
    ring = make_ring(cap, first_seq=42)
    rng = random.Random(7)
    plan = []
    for i in range(1500):
        r = rng.random()
        if r < 0.05:
            plan.append([pattern(i, cap - 4)])  # exactly the capacity
        elif r < 0.15:
            n = rng.randrange(1, 5)
            plan.append([pattern(i * 10 + j, (cap - 4 * n) // n - rng.randrange(0, 8)) for j in range(n)])
        elif r < 0.6:
            plan.append([pattern(i, rng.randrange(0, 400))])
        else:
            plan.append([pattern(i * 10 + j, rng.randrange(0, 100)) for j in range(rng.randrange(1, 9))])
    expected = []
    errors = []
    done = threading.Event()

    def producer():
        try:
            nxt = 42
            for recs in plan:
                if len(recs) == 1:
                    seq = ring.append_one(recs[0], timeout=HANG)
                else:
                    seq = ring.publish(encode(recs), len(recs), timeout=HANG)
                assert seq == nxt, (seq, nxt)
                expected.extend((seq + i, r) for i, r in enumerate(recs))
                nxt += len(recs)
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    w = Drainer(ring)
    got = []
    total = sum(len(p) for p in plan)

    def consumer():
        try:
            deadline = time.monotonic() + 2 * HANG
            while len(got) < total and time.monotonic() < deadline:
                run = w.take()
                if run is None:
                    if done.is_set() and errors:
                        return
                    time.sleep(0.0002)
                else:
                    got.extend(run)
        except BaseException as exc:
            errors.append(exc)

    tp = threading.Thread(target=producer)
    tc = threading.Thread(target=consumer)
    tp.start()
    tc.start()
    tp.join(3 * HANG)
    tc.join(3 * HANG)
    assert not tp.is_alive() and not tc.is_alive()
    assert not errors, errors
    assert got == expected
    assert [i for i, _ in got] == list(range(42, 42 + total))
    w.assert_no_crossing()


# --- several producer processes -----------------------------------------------------------------


def test_three_producer_processes(make_ring, tmp_path):
    """3 processes x 20k records of 1..300 bytes (append_one and batches) into one ring while
    this process drains: every acknowledged record arrives exactly once, with the id its
    producer was given; ids are contiguous; each producer's records keep their order."""
    n_each, n_procs, first = 20000, 3, 7
    ring = make_ring(16384, first_seq=first)
    outs = [str(tmp_path / f"ids{i}") for i in range(n_procs)]
    procs = [spawn(make_ring, "child_producer", root(ring), 0, n_each, out) for out in outs]
    w = Drainer(ring)
    got = []
    total = n_each * n_procs
    deadline = time.monotonic() + 2 * HANG
    while len(got) < total:
        run = w.take()
        if run is None:
            assert time.monotonic() < deadline, f"only {len(got)} of {total} records arrived"
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.0005)
            continue
        got.extend(run)
    for p in procs:
        assert p.wait(HANG) == 0
    assert w.drain() == []
    assert len(got) == total
    assert [i for i, _ in got] == list(range(first, first + total))
    by_id = dict(got)
    seen = set()
    for out in outs:
        pid, ids = ringutil.ids_of(out)
        assert len(ids) == n_each
        assert list(ids) == sorted(ids) and len(set(ids)) == n_each  # per-producer order
        for counter, i in enumerate(ids):
            assert by_id[i] == ringutil.producer_record(pid, counter), (pid, counter, i)
        seen.update(ids)
    assert seen == set(range(first, first + total))  # exactly once, no stranger
    # records that carry pid+counter appear in ring order per producer
    last = {}
    for _, rec in got:
        pc = ringutil.record_pid_counter(rec)
        if pc:
            assert pc[1] > last.get(pc[0], -1)
            last[pc[0]] = pc[1]
    assert ring.header[L.SPACE_WAITERS] == 0
    w.assert_no_crossing()


# --- a producer killed while holding the lock ---------------------------------------------------


@pytest.mark.parametrize("reap", [True, False], ids=["reaped", "zombie"])
def test_lock_of_a_killed_holder_is_repaired(make_ring, reap):
    ring = make_ring(4096, first_seq=1)
    proc = spawn(make_ring, "child_hold_lock", root(ring), 0, False)
    line = ringutil.read_line(proc)
    assert line == f"locked {proc.pid}"
    assert ring.header[L.HOLDER] == proc.pid
    proc.send_signal(signal.SIGKILL)
    if reap:
        proc.wait(HANG)
    else:
        # wait until it is dead (a zombie), without reaping it
        deadline = time.monotonic() + HANG
        while time.monotonic() < deadline:
            with open(f"/proc/{proc.pid}/stat", "rb") as fh:
                if fh.read().split(b") ", 1)[1][:1] == b"Z":
                    break
            time.sleep(0.01)
    ring.acquire(timeout=HANG)  # repairs the lock
    assert ring.header[L.HOLDER] == os.getpid()
    ring.release()
    assert ring.append_one(b"ok") == 1
    assert Drainer(ring).drain() == [(1, b"ok")]


def test_the_repair_lock_waits_for_a_live_repairer_and_dies_with_a_killed_one(make_ring):
    """A repairer stalled inside a repair (SIGSTOP, starved) is waited for: the lock stays as it
    is. One killed inside its repair blocks nobody, as the kernel drops its flock. (With the old
    repair semaphore, two waiters taking over from a dead repairer at once could both post it,
    and two repairs could then release one lock twice.)"""
    ring = make_ring(4096, first_seq=1)
    h = ring.header
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(HANG)
    shm_file = ring._shm_path
    repairer = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({shm_file!r}, os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "print('inside', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert repairer.stdout.readline().strip() == "inside"
        ring.lock.acquire(0)  # held by a holder that died, while another repairer is inside
        h[L.HOLDER] = gone.pid
        repairer.send_signal(signal.SIGSTOP)
        assert not ring.repair_lock(gone.pid), "repaired beside a live repairer"
        assert ring.lock.value == 0 and h[L.HOLDER] == gone.pid and h[L.REPAIRS] == 0
        assert ring._repair_acquire() is None
    finally:
        ringutil.kill_and_reap(repairer)
        repairer.stdout.close()
    assert ring.repair_lock(gone.pid)  # (no takeover delay: the kernel released the dead one's)
    assert h[L.HOLDER] == 0 and h[L.REPAIRS] == 1
    # two threads of this process exclude each other too (each opens its own description)
    held = ring._repair_acquire()
    try:
        assert held is not None
        assert ring._repair_acquire() is None, "a second thread took the repair lock beside the first"
    finally:
        os.close(held)
    ring.acquire(timeout=HANG)
    ring.release()


def test_half_written_publish_of_a_killed_holder_is_not_published(make_ring):
    ring = make_ring(4096, first_seq=100)
    h = ring.header
    recs = [pattern(i, 50 + i) for i in range(10)]
    for r in recs:
        ring.append_one(r)
    published_before = ring.published()
    proc = spawn(make_ring, "child_hold_lock", root(ring), 0, True)
    assert ringutil.read_line(proc).startswith("locked")
    ringutil.kill_and_reap(proc)
    gen = h[L.GEN]
    inactive = L.slot_base(gen + 1)
    assert h[inactive + L.NEXT_SEQ] == 113  # the junk is really there
    w = Drainer(ring)
    got = w.drain()  # the worker reads the slot GEN selects, without the lock
    assert got == [(100 + i, r) for i, r in enumerate(recs)]
    assert h[L.GEN] == gen and ring.published() == published_before
    more = [pattern(1000 + i, 30) for i in range(5)]
    assert [ring.append_one(r) for r in more] == list(range(110, 115))  # (repairs the lock)
    assert w.drain() == [(110 + i, r) for i, r in enumerate(more)]


def test_holder_killed_before_recording_its_pid_is_repaired(make_ring):
    """BUG: acquire() stores HOLDER only after sem_wait returned, and release() clears it before
    sem_post; a producer SIGKILLed between the two steps leaves the lock taken with HOLDER=0,
    which nobody ever repairs: every producer and the worker then fail after their timeout.
    Emulated by a child that takes the semaphore itself; with real SIGKILLs of a process
    appending in a loop it happened 1 time in 40."""
    ring = make_ring(4096, first_seq=1)
    proc = spawn(make_ring, "child_acquire_raw", root(ring), 0)
    assert ringutil.read_line(proc) == "locked"
    ringutil.kill_and_reap(proc)
    assert ring.header[L.HOLDER] == 0
    try:
        ring.acquire(timeout=HANG)  # repaired after STUCK_S; a missing repair still fails, later
        ring.release()
    except WorkerFailedError as exc:
        ring.lock.release()  # free it for the teardown
        pytest.fail(f"lock of a dead holder never repaired: {exc}")


def test_holder_stopped_before_recording_its_pid_is_waited_for_not_repaired(make_ring, monkeypatch):
    """BUG (review): a live producer paused for over STUCK_S between taking the lock and storing
    HOLDER had its lock "repaired": two producers were then inside at once, the semaphore stayed
    at 2 for good, and the same ids were acknowledged to both. A stopped process that maps the
    ring may be that holder: it is waited for."""
    monkeypatch.setattr(ring_mod, "STUCK_S", 0.2)
    ring = make_ring(4096, first_seq=1)
    proc = spawn(make_ring, "child_acquire_raw_then_stop", root(ring), 0)
    assert ringutil.read_line(proc) == "locked"
    deadline = time.monotonic() + HANG
    while open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "T":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        with pytest.raises(WorkerFailedError, match=f"pid {proc.pid} maps the ring and is stopped"):
            ring.acquire(timeout=1.5)
    except BaseException:
        os.kill(proc.pid, signal.SIGCONT)
        raise
    assert ring.header[L.REPAIRS] == 0
    os.kill(proc.pid, signal.SIGCONT)
    assert ringutil.read_line(proc) == "released"
    ring.acquire(timeout=HANG)
    ring.release()
    assert ring.lock.value == 1 and ring.header[L.REPAIRS] == 0


# --- worker side ----------------------------------------------------------------------------------


def _fill_with_wrap(ring):
    """Records with a wrap among them; returns [(id, record)] (nothing drained)."""
    cap = ring.capacity
    out = []
    w = Drainer(ring)
    # move the head/tail near the end so the records below wrap
    ring.append_one(b"z" * (cap - 700 - 4))
    w.drain()
    sizes = [100, 200, 150, 90, 300, 10, 0, 250]  # 100+200+150+90 fit before the end; 300 wraps
    for i, size in enumerate(sizes):
        rec = pattern(i, size)
        out.append((ring.append_one(rec), rec))
    assert ring.published()[2] != L.WRAP_NONE  # a wrap was published
    return out


def test_skip_records_skips_exactly_below_n_across_a_wrap(make_ring):
    cap = 4096
    probe = make_ring(cap, first_seq=500)
    recs = _fill_with_wrap(probe)
    ids = [i for i, _ in recs]
    assert ids == list(range(501, 509))
    for n in range(501, 510):
        ring = probe if n == 501 else make_ring(cap, first_seq=500)
        if ring is not probe:
            assert _fill_with_wrap(ring) == recs
        skipped = ring.skip_records(n)
        assert skipped == n - 501
        assert ring.header[L.HEAD_SEQ] == n
        w = Drainer(ring)
        assert w.drain() == [(i, r) for i, r in recs if i >= n]
        w.assert_no_crossing()
        # and the ring goes on normally
        assert ring.append_one(b"next") == 509
        assert w.drain() == [(509, b"next")]
    with pytest.raises(WorkerFailedError):
        probe.skip_records(600)  # ids the ring never held


def test_read_view_is_consistent_under_a_writer_thread(make_ring):
    ring = make_ring(4096)
    stop = threading.Event()

    def writer():
        x = 0
        while not stop.is_set():
            x += 1
            ring.set_view(x, x, x)

    t = threading.Thread(target=writer)
    t.start()
    try:
        last = 0
        for _ in range(50000):
            seg, size, durable = ring.read_view()
            assert seg == size == durable, (seg, size, durable)
            assert seg >= last
            last = seg
    finally:
        stop.set()
        t.join(HANG)
    assert last > 0


def test_lock_free_snapshot_is_never_torn_by_a_publishing_process(make_ring):
    """The worker reads the published slot without the ring lock (Ring.snapshot). With records
    of one size and no wrap, every consistent (tail, next_seq) pair satisfies
    tail = (next_seq - first) * (4 + size): a pair taken from two different publishes would not."""
    size, count = 12, 150000
    ring = make_ring(1 << 22, first_seq=7)
    t0 = ring.snapshot()[0]
    proc = spawn(make_ring, "child_append_fixed", root(ring), 0, count, size)
    assert ringutil.read_line(proc) == "go"
    last = (t0, 7)
    while True:
        done = proc.poll() is not None  # (one more snapshot after the producer has finished)
        tail, next_seq, _, _ = ring.snapshot()
        assert tail - t0 == (next_seq - 7) * (4 + size), (tail, next_seq)
        assert (tail, next_seq) >= last
        last = (tail, next_seq)
        if done:
            break
    assert proc.wait(HANG) == 0
    assert last[1] == 7 + count  # (how many snapshots overlap the producer is the scheduler's call)
    assert ring.next_slice() == L.Slice(t0 & ring.mask, count * (4 + size), 7, count, t0 + count * (4 + size))


def test_read_view_is_consistent_under_a_writer_process(make_ring):
    ring = make_ring(4096)
    proc = spawn(make_ring, "child_set_view", root(ring), 0, 300000)
    assert ringutil.read_line(proc) == "go"
    last = reads = 0
    while proc.poll() is None and reads < 200000:
        seg, size, durable = ring.read_view()
        assert seg == size == durable, (seg, size, durable)
        assert seg >= last
        last = seg
        reads += 1
    assert proc.wait(HANG) == 0
    assert ring.read_view() == (300000,) * 3


def test_wait_durable_returns_when_the_worker_advances_it(make_ring):
    ring = make_ring(4096, first_seq=10)
    h = ring.header
    seq = ring.append_one(b"strict", strict=True)
    assert seq == 10 and h[L.DUR_WAITERS] == 1

    def worker():
        deadline = time.monotonic() + HANG
        while h[L.DUR_WAITERS] and time.monotonic() < deadline:
            Drainer(ring).drain()
            h[L.WRITTEN_SEQ] = h[L.DURABLE_SEQ] = seq + 1
            ring.wake_durable_waiters()
            time.sleep(0.001)

    t = threading.Thread(target=worker)
    t.start()
    try:
        ring.wait_durable(seq + 1, timeout=HANG)
    finally:
        t.join(HANG)
    assert h[L.DURABLE_SEQ] >= seq + 1
    assert h[L.DUR_WAITERS] == 0
    # an unregistered wait on an id already durable returns at once
    ring.wait_durable(seq, timeout=HANG, registered=False)
    assert h[L.DUR_WAITERS] == 0


@pytest.mark.parametrize("code, says", [
    (errno.ENOSPC, "the disk is full (ENOSPC). Nothing acknowledged is lost"),
    (L.ERR_GAVE_UP, "kept exiting right after it started"),
    (L.ERR_CANNOT_RESUME, "cannot resume it"),
    (errno.EIO, "Input/output error (errno EIO"),
    (0, "its worker failed (see the coordinator's log)"),
])
def test_a_failed_shard_says_why(make_ring, code, says):
    ring = make_ring(4096, first_seq=1)
    ring.header[L.ERRNO] = code
    ring.set_state(L.ST_FAILED)
    for call in (lambda: ring.append_one(b"x"), lambda: ring.publish(encode([b"y"]), 1)):
        with pytest.raises(WorkerFailedError, match=re.escape(says)):
            call()


def test_wait_durable_raises_when_the_worker_fails(make_ring):
    ring = make_ring(4096, first_seq=10)
    h = ring.header
    seq = ring.publish(encode([b"a", b"b"]), 2, strict=True)
    assert h[L.DUR_WAITERS] == 1

    def fail():
        time.sleep(0.05)
        ring.set_state(L.ST_FAILED)

    t = threading.Thread(target=fail)
    t.start()
    try:
        with pytest.raises(WorkerFailedError):
            ring.wait_durable(seq + 2, timeout=HANG)
    finally:
        t.join(HANG)
    assert h[L.DUR_WAITERS] == 0
    # appending to a failed ring is refused too
    with pytest.raises(WorkerFailedError):
        ring.append_one(b"x")
    assert h[L.HOLDER] == 0


def test_a_waiter_whose_time_is_spent_still_takes_itself_out_of_the_count(make_ring, monkeypatch):
    """wait_durable(..., timeout=0, registered=False) (the coordinator's kept-ring wait once its
    budget is spent) registers, times out, and must still deregister: the lock is busy for a
    moment then (another appender), and taking it with the caller's spent timeout gave up and
    left DUR_WAITERS one too high, so the worker synced every pass until the stale clear."""
    ring = make_ring(4096, first_seq=1)
    h = ring.header
    ring.publish(encode([b"a"]), 1)  # (not durable: the wait must register)
    real_wait = ring._wait
    held = threading.Event()

    def holder():  # (another appender inside the lock for a moment)
        ring.acquire(HANG)
        held.set()
        time.sleep(0.2)
        ring.release()

    t = threading.Thread(target=holder)

    def busy_then_time_out(sem, deadline, what):
        t.start()
        held.wait(HANG)
        real_wait(sem, deadline, what)

    monkeypatch.setattr(ring, "_wait", busy_then_time_out)
    try:
        with pytest.raises(WorkerFailedError):
            ring.wait_durable(2, timeout=0.0, registered=False)
    finally:
        t.join(HANG)
    assert h[L.DUR_WAITERS] == 0 and h[L.HOLDER] == 0


def test_live_holder_with_odd_process_name_is_not_taken_for_dead(make_ring):
    """BUG (minor): pid_alive() finds the state letter of /proc/PID/stat by splitting at the
    FIRST ") ", but the process name in parentheses may itself contain ") " (any process can set
    it: prctl/setproctitle, up to 15 bytes). A live holder named e.g. "x) Zed" reads as a zombie,
    so another producer "repairs" the lock while the holder is still inside its critical
    section: two writers in the ring. (Split at the LAST ") " instead.)"""
    ring = make_ring(4096, first_seq=1)
    proc = spawn(make_ring, "child_hold_lock", root(ring), 0, False, "x) Zed")
    assert ringutil.read_line(proc).startswith("locked")
    assert proc.poll() is None
    try:
        ring.acquire(timeout=1.0)
    except WorkerFailedError:
        pass  # right: the holder is alive, the lock stays its
    else:
        ring.release()
        assert proc.poll() is None
        pytest.fail(f"took the lock of a live holder (pid {proc.pid}, named 'x) Zed')")


@pytest.mark.parametrize("how", ["timeout", "sigkill"])
def test_a_producer_that_stops_waiting_for_space_leaves_no_waiter(make_ring, how):
    """publish() counts itself in SPACE_WAITERS while it waits for space. If the count outlives
    the waiter, every later consume() posts space_free for nobody: a syscall per slice and a
    semaphore value that grows without bound (sem_post fails with EOVERFLOW at SEM_VALUE_MAX, in
    the worker), and the next real waiter's waits return at once.

    timeout: the wait raised (timeout, FAILED/CLOSED, liveness) -- this leaked in the first
    version; the working tree now decrements in a finally. sigkill: BUG, still leaks (a dead
    waiter is never subtracted)."""
    cap = 4096
    ring = make_ring(cap, first_seq=1)
    h = ring.header
    ring.publish(encode([b"F" * (cap - 4)]), 1)  # full
    if how == "timeout":
        with pytest.raises(WorkerFailedError):
            ring.append_one(b"x", timeout=0.2)
    else:
        proc = spawn(make_ring, "child_wait_for_space", root(ring), 0)
        assert ringutil.read_line(proc) == "waiting"
        deadline = time.monotonic() + HANG
        while h[L.SPACE_WAITERS] == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert h[L.SPACE_WAITERS] == 1
        ringutil.kill_and_reap(proc)
        ring.acquire(timeout=HANG)  # in case it died holding the lock
        ring.release()
    w = Drainer(ring)
    for i in range(20):
        w.drain()
        ring.append_one(b"y")
    w.drain()
    # a live waiter is briefly counted too, so a stale count is cleared once it has stayed
    # unchanged for ring.STALE_S; the worker keeps consuming meanwhile
    deadline = time.monotonic() + HANG
    while h[L.SPACE_WAITERS] and time.monotonic() < deadline:
        ring.append_one(b"z")
        w.drain()
        time.sleep(0.05)
    value = ring.space_free.value
    assert value <= 1, f"space_free grew to {value}: posts for nobody"
    assert h[L.SPACE_WAITERS] == 0, (
        f"SPACE_WAITERS stuck at {h[L.SPACE_WAITERS]}; space_free grew to {value} with no waiter"
    )


def test_a_strict_producer_killed_while_waiting_leaves_no_durable_waiter(make_ring):
    """BUG (same family): DUR_WAITERS counts a STRICT appender from its publish until
    wait_durable's finally; a waiter SIGKILLed in between is never subtracted. The worker then
    believes someone waits for durability forever (workers/worker.py: fsync at every pass, no
    gathering of larger frames) and wake_durable_waiters posts P_dur on every pass for nobody."""
    ring = make_ring(4096, first_seq=1)
    h = ring.header
    proc = spawn(make_ring, "child_wait_durable", root(ring), 0)
    assert ringutil.read_line(proc) == "waiting 1"
    assert h[L.DUR_WAITERS] == 1
    ringutil.kill_and_reap(proc)
    ring.acquire(timeout=HANG)  # in case it died holding the lock
    ring.release()
    assert Drainer(ring).drain() == [(1, b"strict")]
    h[L.WRITTEN_SEQ] = h[L.DURABLE_SEQ] = 2
    # cleared once it has stayed unchanged with nothing left to wait for (ring.STALE_S)
    deadline = time.monotonic() + HANG
    while h[L.DUR_WAITERS] and time.monotonic() < deadline:
        ring.wake_durable_waiters()
        time.sleep(0.05)
    assert ring.durable_sem.value <= 1, "durable semaphore posted for nobody"
    assert h[L.DUR_WAITERS] == 0, f"DUR_WAITERS stuck at {h[L.DUR_WAITERS]} for a dead waiter"


@pytest.fixture
def own_ring(tmp_path):
    """A ring created by this test (its objects removed afterwards)."""
    root = str(tmp_path / "ringroot")
    os.mkdir(root)
    names = Names(root)
    ring = Ring(names, 0, capacity=4096, create=True)
    ringutil.open_ring(ring, 1)
    yield ring, names
    ring.close()
    names.remove_all()


def _nfds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --- review, session 9: the repair lock's descriptors ---------------------------------------------


def test_an_attached_ring_costs_one_descriptor(own_ring):
    """mmap keeps its own descriptor of the shared memory; keeping posix_ipc's too (for the
    repair lock) made it two per ring per process, and a 600-shard WAL no longer opened under
    the usual limit of 1024 descriptors."""
    _ring, names = own_ring
    before = _nfds()
    rings = [Ring(names, 0) for _ in range(10)]
    try:
        assert _nfds() - before == 10
    finally:
        for r in rings:
            r.close()


# --- 2. a Ring whose __init__ fails leaks the kept descriptor -----------------------------------


def test_a_failed_ring_attach_closes_its_descriptor(own_ring):
    """Ring.__init__ keeps shm.fd before it opens the semaphores and checks the magic; when those
    raise (a WAL shutting down while a client attaches: _attach returns None and retries; a
    leftover ring in keep_or_drop_ring) nothing ever closes it. Before, close_fd() ran at once."""
    ring, names = own_ring
    posix_ipc.unlink_semaphore(names.ring_lock(0))  # (this test's own object)
    before = _nfds()
    for _ in range(20):
        with pytest.raises(posix_ipc.ExistentialError):
            Ring(names, 0)
    assert _nfds() == before, f"{_nfds() - before} descriptors leaked by 20 failed attaches"


# --- 3. a fork while a thread is repairing keeps the repair flock held for good -----------------


def test_a_child_forked_during_a_repair_does_not_block_later_repairs(own_ring, monkeypatch):
    """flock belongs to the open file description; a child forked (multiprocessing's default
    start method, any os.fork) while a thread of the parent is inside _repair_if inherits the
    descriptor that holds it, so the parent's close() no longer releases it. From then on no
    process can repair that ring while the child lives: a producer that dies holding the ring
    lock blocks every producer until WorkerFailedError. (The old repair semaphore had no such
    tie to descriptors.)"""
    ring, _names = own_ring
    h = ring.header
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(30)

    real_pid_alive = ring_mod.pid_alive
    inside, go = threading.Event(), threading.Event()

    def slow_pid_alive(pid):  # called by _repair_if while it holds the repair flock
        if threading.current_thread().name == "repairer":
            inside.set()
            go.wait(30)
        return real_pid_alive(pid)

    ring.lock.acquire(0)
    h[L.HOLDER] = dead.pid
    monkeypatch.setattr(ring_mod, "pid_alive", slow_pid_alive)
    result = []
    t = threading.Thread(target=lambda: result.append(ring.repair_lock(dead.pid)), name="repairer")
    t.start()
    assert inside.wait(30)
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # an ordinary forked child that never touches the WAL
        try:
            os.close(w)
            os.read(r, 1)
        finally:
            os._exit(0)
    os.close(r)
    try:
        go.set()
        t.join(30)
        monkeypatch.setattr(ring_mod, "pid_alive", real_pid_alive)
        assert result == [True]  # the first repair went through
        # the lock is orphaned again by a dead holder: the next repair must be possible
        ring.lock.acquire(0)
        h[L.HOLDER] = dead.pid
        deadline = time.monotonic() + 3
        repaired = False
        while not repaired and time.monotonic() < deadline:
            repaired = ring.repair_lock(dead.pid)
        assert repaired, "the forked child (which never repaired anything) holds the repair lock"
    finally:
        os.close(w)
        os.waitpid(child, 0)
        if h[L.HOLDER] == dead.pid:
            h[L.HOLDER] = 0
            ring.lock.release()
