"""Regressions from code review: stale readers after prune, pickling, workers that cannot restart."""

import os
import pickle
import signal
import subprocess
import sys
import time

import pytest

from conftest import open_files_under
from ironwal_mp import (
    CheckpointAbortedError,
    CorruptionPolicy,
    ShardedWal,
    SyncMode,
    WalOptions,
    WorkerFailedError,
)
from ironwal_mp.engine import layout


def test_readers_stop_serving_pruned_entries(wal_root):
    opts = WalOptions(root_path=wal_root, sync_mode=SyncMode.STRICT, max_segment_size=512)
    with ShardedWal(opts, 1) as wal:
        for i in range(200):
            wal.append(b"k", b"entry-%03d" % i)
        assert wal.get(0, 3) == b"entry-003"  # opens (and caches) the first segment here
        wal.create_checkpoint(b"c")
        stats = wal.prune_before_checkpoint(b"c")
        assert stats.segments_deleted > 0
        assert wal.get(0, 3) is None  # pruned: not served from a cached descriptor
        first = layout.list_segments(os.path.join(wal_root, "shard_00"))[0]
        assert wal.get(0, first) is not None
        assert next(wal.iter_shard(0, 0)) == b"entry-%03d" % first


def test_pickled_handle_carries_an_absolute_root(wal_root, tmp_path, monkeypatch):
    monkeypatch.chdir(os.path.dirname(wal_root))
    rel = os.path.basename(wal_root)
    with ShardedWal(WalOptions(root_path=rel, sync_mode=SyncMode.STRICT), 2) as wal:
        shard, seq = wal.append(b"k", b"v")
        blob = pickle.dumps(wal)
        code = (
            "import pickle, sys; w = pickle.loads(sys.stdin.buffer.read()); "
            "print(w.append(b'k', b'w')); w.close()"
        )
        out = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True,
                             cwd="/", timeout=60)  # elsewhere: a relative root would miss
        assert out.returncode == 0, out.stderr.decode()
        assert out.stdout.decode().strip() == str((shard, seq + 1))


def test_a_worker_that_cannot_restart_fails_its_shards(wal_root):
    """A worker whose recovery refuses (CorruptionPolicy.ERROR) keeps exiting at start: after a
    few tries with back-off its shards are failed, so callers get an error instead of a hang."""
    opts = WalOptions(root_path=wal_root, sync_mode=SyncMode.STRICT, on_corruption=CorruptionPolicy.ERROR)
    with ShardedWal(opts, 2, workers=2, timeout=60) as wal:
        shard0 = [k for k in (b"a%d" % i for i in range(100)) if wal.shard_for(k) == 0]
        for k in shard0[:5]:
            wal.append(k, b"x" * 50)
        seg = os.path.join(wal_root, "shard_00", layout.segment_name(0))
        with open(seg, "ab") as fh:
            fh.write(b"\0" * 100)  # a torn tail the restarted worker refuses to repair
        victim = wal.stats()["shards"][0]["worker_pid"]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        attempts = 0
        while wal.stats()["shards"][0]["state"] != "failed":
            assert time.monotonic() < deadline, "shard 0 was never marked failed"
            # checkpoints meanwhile abort, however many: requests to the dead worker must not
            # pile up in its queue until the coordinator stalls on it (WalClosedError)
            with pytest.raises(CheckpointAbortedError):
                wal.create_checkpoint(b"meanwhile-%d" % attempts)
            attempts += 1
            time.sleep(0.05)
        assert attempts > 0
        with pytest.raises(WorkerFailedError):
            wal.append(shard0[0], b"y")
        with pytest.raises(CheckpointAbortedError):
            wal.create_checkpoint(b"c")
        assert wal.stats()["shards"][1]["state"] == "open"  # the other worker is unaffected


class _Injected(BaseException):
    """Raised where a signal handler could raise (a timeout, KeyboardInterrupt)."""


def _call_boundaries(fn) -> int:
    """How many Python-function entries and C-call returns one ``fn()`` goes through."""
    n = [0]

    def count(frame, event, arg):
        if event in ("call", "c_return"):
            n[0] += 1

    sys.setprofile(count)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return n[0]


def _raise_at(k: int, fn) -> bool:
    """Run ``fn`` raising _Injected at its k-th call boundary; whether it was raised."""
    n = [0]

    def hit(frame, event, arg):
        if event in ("call", "c_return"):
            n[0] += 1
            if n[0] == k:
                sys.setprofile(None)
                raise _Injected(k)

    sys.setprofile(hit)
    try:
        fn()
    except _Injected:
        return True
    finally:
        sys.setprofile(None)
    return False


def test_an_exception_at_any_call_never_leaves_the_ring_lock_held_under_our_pid(wal_root):
    # Review finding: a raising signal handler runs at the next call of the main thread; at
    # the entry of release() (or the return of the list.pop after acquiring) it left the ring
    # lock held with this live pid recorded, which no other process ever repairs. The profiler
    # raises at every call boundary of each client path in turn; a lock left held must carry
    # HOLDER 0 (repaired by the next waiter after STUCK_S), and is mended here to go on.
    from ironwal_mp import connect
    from ironwal_mp.ipc import ring_layout as L

    with ShardedWal(WalOptions(root_path=wal_root, sync_mode=SyncMode.STRICT), 1) as wal, \
            connect(wal_root, sync_mode=SyncMode.ASYNC) as fast:
        ring = wal._rings[0]
        h = ring.header
        paths = {
            "strict append": lambda: wal.append(b"k", b"v"),
            "strict batch": lambda: wal.append_batch_for_key(b"k", [b"a", b"b"]),
            "sync": wal.sync,
            "async append": lambda: fast.append(b"k", b"v"),
            "async batch": lambda: fast.append_batch([(b"k", b"v"), (b"k2", b"w")]),
        }
        held_by_us = []
        for name, fn in paths.items():
            fn()  # warm: the first call takes other branches
            for k in range(1, _call_boundaries(fn) + 1):
                if not _raise_at(k, fn):
                    continue
                if ring.lock.value == 0 and h[L.HOLDER] == os.getpid():
                    held_by_us.append((name, k))
                if ring.lock.value == 0:
                    time.sleep(0.01)  # (the worker may hold it for an instant itself)
                    if ring.lock.value == 0 and h[L.HOLDER] in (0, os.getpid()):
                        h[L.HOLDER] = 0
                        ring.lock.release()
        assert not held_by_us, f"the ring lock was left held under this live pid: {held_by_us}"
        wal.append(b"k", b"still works")


# --- review, session 9: descriptors of pruned segments, a prune the coordinator could not serve --


def _deleted_files_open(root: str) -> list:
    """This process's descriptors of files under ``root`` that have been unlinked."""
    return open_files_under(root, " (deleted)")


def test_a_reader_that_relists_during_a_prune_lets_go_of_the_deleted_segments(wal_root):
    """The worker bumps PRUNES only after its unlinks and syncs. A reader that relists inside that
    window caches the shorter listing under the old count; when the bump then shows, it must
    still close the descriptors of the segments that went (they held the disk space)."""
    from ironwal_mp.ipc import ring_layout as L

    opts = WalOptions(root_path=wal_root, sync_mode=SyncMode.STRICT, max_segment_size=512)
    root = os.path.realpath(wal_root)
    with ShardedWal(opts, 1) as wal:
        for i in range(200):
            wal.append(b"k", b"entry-%03d" % i)
        assert wal.get(0, 3) == b"entry-003"  # opens and caches the first segment
        assert len(list(wal.iter_shard(0, 0))) == 200  # ... and every other one
        wal.create_checkpoint(b"c")
        h = wal._rings[0].header
        prunes = h[L.PRUNES]
        assert wal.prune_before_checkpoint(b"c").segments_deleted > 0
        assert h[L.PRUNES] == prunes + 1
        h[L.PRUNES] = prunes  # as if the reader looked before the worker's bump ...
        first = layout.list_segments(os.path.join(wal_root, "shard_00"))[0]
        assert next(wal.iter_shard(0, 0)) == b"entry-%03d" % first  # (relists)
        h[L.PRUNES] = prunes + 1  # ... and the bump showed afterwards
        assert wal.get(0, 199) == b"entry-199"
        assert wal.get(0, 3) is None
        assert _deleted_files_open(root) == []


def test_a_prune_that_fails_part_way_still_tells_readers_segments_are_gone(wal_root):
    opts = WalOptions(root_path=wal_root, sync_mode=SyncMode.STRICT, max_segment_size=512)
    with ShardedWal(opts, 1) as wal:
        for i in range(200):
            wal.append(b"k", b"entry-%03d" % i)
        assert wal.get(0, 3) == b"entry-003"  # caches the first segment's descriptor
        wal.create_checkpoint(b"c")
        blocker = os.path.join(wal_root, "shard_00", "segments.idx.tmp")
        os.mkdir(blocker)  # segments.idx cannot be rewritten after the unlinks
        try:
            with pytest.raises(WorkerFailedError, match="after deleting"):
                wal.prune_before_checkpoint(b"c")
        finally:
            os.rmdir(blocker)
        first = layout.list_segments(os.path.join(wal_root, "shard_00"))[0]
        assert first > 3, "the segments below the checkpoint were deleted"
        assert wal.get(0, 3) is None, "a deleted entry is still served from a cached descriptor"
        assert next(wal.iter_shard(0, 0)) == b"entry-%03d" % first
        assert _deleted_files_open(os.path.realpath(wal_root)) == []


def test_a_worker_killed_inside_a_prune_does_not_leave_readers_serving_deleted_files(wal_root):
    """SIGKILL between a prune's unlinks and its PRUNES bump (the bump is in a finally, which a
    kill skips): a handle that had read the shard served every pruned entry from descriptors of
    deleted files, and kept them allocated, until something else made it list the files again.
    (The worker's unlinks are made here from outside, then it is killed: the same state.)"""
    opts = WalOptions(root_path=wal_root, sync_mode=SyncMode.STRICT, max_segment_size=512,
                      max_open_segments=1000)
    with ShardedWal(opts, 1, workers=1) as wal:
        for i in range(200):
            wal.append(b"k", b"entry-%03d" % i)
        assert [wal.get(0, i) for i in range(200)] == [b"entry-%03d" % i for i in range(200)]
        shard_dir = os.path.join(wal_root, "shard_00")
        doomed = layout.list_segments(shard_dir)[:-2]
        for start in doomed:
            os.unlink(os.path.join(shard_dir, layout.segment_name(start)))
        first = layout.list_segments(shard_dir)[0]
        old = wal.stats()["shards"][0]
        os.kill(old["worker_pid"], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:  # the coordinator restarts it
            now = wal.stats()["shards"][0]
            if now["worker_pid"] != old["worker_pid"] and now["state"] == "open":
                break
            assert time.monotonic() < deadline, "the worker was not restarted"
            time.sleep(0.05)
        assert wal.get(0, 3) is None and wal.get(0, first - 1) is None, "a deleted entry is still served"
        assert wal.get(0, first) == b"entry-%03d" % first
        assert _deleted_files_open(os.path.realpath(wal_root)) == []


def test_pruning_by_a_record_of_another_shard_count_is_refused_and_the_wal_goes_on(wal_root):
    """A checkpoints.log written elsewhere may hold a record for more shards than this WAL has:
    prune must refuse it clearly (it used to raise IndexError inside the coordinator, which then
    stopped the whole WAL)."""
    from ironwal_mp import ShardCountMismatchError
    from ironwal_mp.engine.checkpoint_log import CheckpointData, encode_record

    opts = WalOptions(root_path=wal_root, sync_mode=SyncMode.STRICT)
    with ShardedWal(opts, 2) as wal:
        wal.append(b"k", b"v")
    with open(os.path.join(wal_root, "checkpoints.log"), "ab") as fh:
        fh.write(encode_record(CheckpointData(b"three", 1, 3, (0, 0, 0))))
    with ShardedWal(opts, 2) as wal:
        assert wal.load_checkpoint(b"three").shard_count == 3
        with pytest.raises(ShardCountMismatchError, match="records 3 shards, this WAL has 2") as info:
            wal.prune_before_checkpoint(b"three")
        assert (info.value.expected, info.value.found) == (2, 3)
        wal.create_checkpoint(b"after")
        assert wal.append(b"k", b"w")[1] == 1


# --- review of the client API (session 10) ---------------------------------------------------------


def _key_for(wal, shard):
    return next(b"k%d" % i for i in range(1000) if wal.shard_for(b"k%d" % i) == shard)


@pytest.mark.parametrize("mode", [SyncMode.STRICT, SyncMode.BATCH_ONLY])
def test_a_batch_whose_durability_wait_fails_reports_every_part_it_published(wal_root, mode):
    """A part published, then not made durable in time (its worker stalled), was reported as
    not published: a caller retrying those positions wrote them twice."""
    from ironwal_mp.errors import WalError

    with ShardedWal(WalOptions(root_path=wal_root, sync_mode=mode), 2, workers=2, timeout=1) as wal:
        k0, k1 = _key_for(wal, 0), _key_for(wal, 1)
        stalled = wal.stats()["shards"][1]["worker_pid"]
        os.kill(stalled, signal.SIGSTOP)
        try:
            with pytest.raises(WalError) as info:
                wal.append_batch([(k1, b"x1"), (k0, b"x0")])
            assert info.value.published == [(1, 0), (0, 0)]
            with pytest.raises(WalError) as info:
                wal.append_batch_for_key(k1, [b"y1", b"z1"])
            assert info.value.published == [(1, 1), (1, 2)]
        finally:
            os.kill(stalled, signal.SIGCONT)
        wal.sync()
        assert list(wal.iter_shard(1)) == [b"x1", b"y1", b"z1"] and list(wal.iter_shard(0)) == [b"x0"]
        # no durable-waiter registration was left behind by the parts not waited for
        from ironwal_mp.ipc import ring_layout as L

        assert [r.header[L.DUR_WAITERS] for r in wal._rings] == [0, 0]


def test_a_batch_that_publishes_nothing_says_so(wal_root):
    """An error before any part was published carried no ``published`` at all (AttributeError
    for a caller reading it); it is now a list of None, one per input position."""
    from ironwal_mp.errors import WalError

    with ShardedWal(WalOptions(root_path=wal_root, sync_mode=SyncMode.ASYNC), 1, ring_size=4096,
                    timeout=0.3) as wal:
        stalled = wal.stats()["shards"][0]["worker_pid"]
        os.kill(stalled, signal.SIGSTOP)
        try:
            with pytest.raises(WalError):  # the ring fills: backpressure, then the timeout
                for _ in range(100):
                    wal.append(b"k", bytes(500))
            with pytest.raises(WalError) as info:
                wal.append_batch([(b"k", b"a"), (b"j", b"b")])
            assert info.value.published == [None, None]
        finally:
            os.kill(stalled, signal.SIGCONT)


def test_a_detach_that_gets_no_answer_does_not_hold_close(wal_root):
    """A non-starter's close sent DETACH and then waited up to 120 s for the answer (a busy or
    stopped coordinator); the answer is now awaited 5 s, as PROTOCOL.md says."""
    with ShardedWal(WalOptions(root_path=wal_root), 2) as wal:
        code = ("import sys; from ironwal_mp import connect; w = connect(sys.argv[1]); w.append(b'k', b'v'); "
                "w.create_checkpoint(b'c'); print('ready', flush=True); sys.stdin.readline(); w.close()")
        child = subprocess.Popen([sys.executable, "-c", code, wal_root], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        coordinator = wal.stats()["coordinator_pid"]
        try:
            assert child.stdout.readline().strip() == "ready"  # (it has a reply queue now)
            os.kill(coordinator, signal.SIGSTOP)
            child.stdin.write("go\n")
            child.stdin.flush()
            assert child.wait(timeout=60) == 0  # (a liveness bound: it waited 120 s before)
        finally:
            os.kill(coordinator, signal.SIGCONT)
            if child.poll() is None:
                child.kill()
                child.wait()
        assert wal.append(b"k", b"w") is not None


def test_a_strict_append_whose_durability_wait_fails_reports_its_id(wal_root):
    from ironwal_mp.errors import WalError

    with ShardedWal(WalOptions(root_path=wal_root, sync_mode=SyncMode.STRICT), 1, timeout=1) as wal:
        wal.append(b"k", b"a")
        stalled = wal.stats()["shards"][0]["worker_pid"]
        os.kill(stalled, signal.SIGSTOP)
        try:
            with pytest.raises(WalError) as info:
                wal.append(b"k", b"b")
            assert info.value.published == [(0, 1)]
        finally:
            os.kill(stalled, signal.SIGCONT)
        wal.sync()
        assert list(wal.iter_shard(0)) == [b"a", b"b"]


@pytest.mark.parametrize("bad", [10 ** 400, 1e300, float("nan"), float("inf"), 0, -1, True, "5"],
                         ids=["10**400", "1e300", "nan", "inf", "0", "-1", "True", "str"])
def test_timeouts_that_no_wait_can_take_are_config_errors(wal_root, bad):
    from ironwal_mp.errors import ConfigError

    with pytest.raises((ConfigError, TypeError)):
        ShardedWal(WalOptions(root_path=wal_root), 1, timeout=bad)
    assert not os.path.exists(os.path.join(wal_root, "MANIFEST"))


def test_a_starter_that_cannot_send_shutdown_still_stops_its_coordinator_cleanly(wal_root):
    """With no message queue to be had for the SHUTDOWN's reply (RLIMIT_MSGQUEUE used up),
    close() waited 120 s for a coordinator that was never told, then SIGKILLed it and left
    its shared memory, semaphores and queues behind."""
    script = (
        "import resource, sys\n"
        "from ironwal_mp import ShardedWal, WalOptions\n"
        "from ironwal_mp.ipc.names import Names\n"
        "w = ShardedWal(WalOptions(root_path=sys.argv[1]), 2, timeout=5)\n"
        "w.append(b'k', b'v')\n"
        "hard = resource.getrlimit(resource.RLIMIT_MSGQUEUE)[1]\n"
        "resource.setrlimit(resource.RLIMIT_MSGQUEUE, (0, hard))  # no reply queue can be made now\n"
        "att = w._att\n"
        "w.close()\n"
        "print(att.started.returncode, len(Names(sys.argv[1]).leftovers()))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, wal_root], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0", "0"], (proc.stdout, proc.stderr)  # exited by itself, nothing left
    with ShardedWal(WalOptions(root_path=wal_root), 2) as wal:
        assert [e for s in range(2) for e in wal.iter_shard(s)] == [b"v"]


def test_a_root_held_by_a_plain_wal_is_refused_at_once(wal_root):
    """A WalLockedError at start was always read as "another process is starting a
    coordinator": the open waited 60 s, three times, whatever `timeout` said."""
    from ironwal_mp import Wal, WalLockedError

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom ironwal_mp import Wal, WalOptions\n"
         "w = Wal(WalOptions(root_path=sys.argv[1]))\nprint('held', flush=True)\ntime.sleep(120)\n", wal_root],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(WalLockedError) as info:
            ShardedWal(WalOptions(root_path=wal_root), 2, timeout=2)
        assert str(holder.pid) in str(info.value) and "plain Wal" in str(info.value)
        # (not a timing test: the old path took 180 s; anything near the 60 s wait is that bug)
        assert time.monotonic() - started < 50
    finally:
        holder.kill()
        holder.wait()
    with Wal(WalOptions(root_path=wal_root)):  # the same process holds it
        with pytest.raises(WalLockedError):
            ShardedWal(WalOptions(root_path=wal_root), 2, timeout=2)
    with ShardedWal(WalOptions(root_path=wal_root), 2) as wal:  # free again: it starts
        wal.append(b"k", b"v")
        with open(os.path.join(wal_root, "LOCK")) as fh:
            assert fh.read().split()[1] == "coordinator"


_FD_SCRIPT = """
import resource, sys
from ironwal_mp import ShardedWal, WalOptions
root, soft, hard, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
try:
    with ShardedWal(WalOptions(root_path=root), n, ring_size=1 << 12, workers=1) as w:
        for i in range(3 * n):
            w.append(b"k%d" % i, b"v%d" % i)
        w.sync()
        print("entries", sum(1 for s in range(n) for _ in w.iter_shard(s)))
except Exception as e:
    print("error", type(e).__name__, e)
"""


def test_more_shards_than_the_soft_descriptor_limit_allows_still_work(wal_root):
    """Every mapped ring keeps a descriptor: 1000 shards (the maximum) under the usual soft
    limit of 1024 failed with EMFILE. Here: 300 shards, one worker, a soft limit of 256."""
    hard = __import__("resource").getrlimit(__import__("resource").RLIMIT_NOFILE)[1]
    if hard != -1 and hard < 1024:
        pytest.skip(f"the hard descriptor limit here is {hard}")
    proc = subprocess.run([sys.executable, "-c", _FD_SCRIPT, wal_root, "256", str(min(hard, 4096) if hard != -1 else 4096), "300"],
                          capture_output=True, text=True, timeout=240)
    assert proc.stdout.split() == ["entries", "900"], (proc.stdout, proc.stderr[-2000:])


def test_a_hard_descriptor_limit_too_low_for_the_shards_is_a_config_error_that_writes_nothing(wal_root):
    proc = subprocess.run([sys.executable, "-c", _FD_SCRIPT, wal_root, "256", "300", "300"],
                          capture_output=True, text=True, timeout=240)
    assert proc.stdout.startswith("error ConfigError") and "RLIMIT_NOFILE" in proc.stdout, (proc.stdout, proc.stderr[-2000:])
    assert not os.path.exists(wal_root)  # no MANIFEST: the same root opens with fewer shards later


def test_a_batch_cut_short_by_close_still_reports_what_it_published(wal_root):
    """A non-starting handle closed while append_batch waited: the clean-up of the parts not
    waited for hit the closed semaphores of another ring and replaced the WalClosedError
    (and its `published`) with posix_ipc.ExistentialError, inviting a retry that duplicates."""
    import threading

    from ironwal_mp.errors import WalClosedError

    starter = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom ironwal_mp import ShardedWal, WalOptions, SyncMode\n"
         "w = ShardedWal(WalOptions(root_path=sys.argv[1], sync_mode=SyncMode.STRICT), 2, workers=2)\n"
         "print('up', flush=True)\nsys.stdin.readline()\nw.close()\n", wal_root],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert starter.stdout.readline().strip() == "up"
        wal = ShardedWal(WalOptions(root_path=wal_root, sync_mode=SyncMode.STRICT), 2)
        k0, k1 = _key_for(wal, 0), _key_for(wal, 1)
        stalled = wal.stats()["shards"][1]["worker_pid"]
        os.kill(stalled, signal.SIGSTOP)
        outcome = {}

        def batch():
            try:
                wal.append_batch([(k1, b"x1"), (k0, b"x0")])
            except BaseException as exc:  # (reported below, in the test's thread)
                outcome["error"] = exc

        t = threading.Thread(target=batch)
        try:
            t.start()
            deadline = time.monotonic() + 10
            while wal._rings[0].header[11] == 0 and "error" not in outcome and time.monotonic() < deadline:
                time.sleep(0.01)  # until both parts are published (shard 0's waiter registered)
            wal.close()
            t.join(30)
        finally:
            os.kill(stalled, signal.SIGCONT)
        exc = outcome.get("error")
        assert isinstance(exc, WalClosedError), repr(exc)
        assert exc.published == [(1, 0), (0, 0)]
    finally:
        starter.stdin.write("\n")
        starter.stdin.flush()
        starter.wait(60)
    with ShardedWal(WalOptions(root_path=wal_root), 2) as wal:
        assert list(wal.iter_shard(0)) == [b"x0"] and list(wal.iter_shard(1)) == [b"x1"]


# --- user review (session 11): a ShardedWal inside another WAL; the shard count a root records --


def test_a_sharded_wal_is_not_created_in_an_engine_wal(tmp_path, wal_root):
    from ironwal_mp import Wal
    from ironwal_mp.errors import ConfigError, WalIOError

    engine = os.path.join(str(tmp_path), "ledger")
    with Wal(WalOptions(root_path=engine)) as wal:
        wal.append("acct-1", b"x")
    listing = sorted(os.listdir(engine)), sorted(os.listdir(os.path.join(engine, "acct-1")))
    with pytest.raises(ConfigError, match=r"is an engine WAL \(streams acct-1\)"):
        ShardedWal(WalOptions(root_path=engine), 2)
    with pytest.raises(ConfigError, match="is one stream of the WAL at"):
        ShardedWal(WalOptions(root_path=os.path.join(engine, "acct-1")), 2)
    with pytest.raises(ConfigError, match="inside the WAL directory"):
        ShardedWal(WalOptions(root_path=os.path.join(engine, "sub")), 2)
    assert (sorted(os.listdir(engine)), sorted(os.listdir(os.path.join(engine, "acct-1")))) == listing
    # the same for a root the crate wrote, which has no LOCK (review: it was let through)
    os.unlink(os.path.join(engine, "LOCK"))
    with pytest.raises(ConfigError, match="inside the WAL directory"):
        ShardedWal(WalOptions(root_path=os.path.join(engine, "sub")), 2)
    assert not os.path.exists(os.path.join(engine, "sub"))
    afile = os.path.join(str(tmp_path), "afile")
    open(afile, "w").close()
    with pytest.raises(WalIOError, match="is not a directory"):
        ShardedWal(WalOptions(root_path=afile), 2)
    # and a sharded root is never placed inside another one
    with ShardedWal(WalOptions(root_path=wal_root), 2):
        pass
    with pytest.raises(ConfigError, match="inside the WAL directory"):
        ShardedWal(WalOptions(root_path=os.path.join(wal_root, "inner")), 2)


def test_shard_count_none_reopens_with_the_recorded_count(wal_root):
    from ironwal_mp.errors import ConfigError

    with pytest.raises(ConfigError, match="holds no sharded WAL yet"):
        ShardedWal(WalOptions(root_path=wal_root), None)  # started a coordinator that crashed
    assert not os.path.exists(os.path.join(wal_root, "MANIFEST"))
    with ShardedWal(WalOptions(root_path=wal_root, sync_mode=SyncMode.STRICT), 3) as wal:
        acked = wal.append(b"k", b"v")
        with ShardedWal(WalOptions(root_path=wal_root), None) as attached:  # the running one's count
            assert attached.shard_count == 3
    with ShardedWal(WalOptions(root_path=wal_root), None) as wal:  # stopped: MANIFEST's count
        assert wal.shard_count == 3
        assert wal.get(*acked) == b"v"


def test_first_id_says_where_a_pruned_shard_starts(wal_root):
    opts = WalOptions(root_path=wal_root, sync_mode=SyncMode.STRICT, max_segment_size=512)
    with ShardedWal(opts, 1) as wal:
        assert wal.first_id(0) is None
        for i in range(100):
            wal.append(b"k", b"entry-%03d" % i)
        assert wal.first_id(0) == 0
        wal.create_checkpoint(b"c")
        assert wal.prune_before_checkpoint(b"c").segments_deleted > 0
        first = wal.first_id(0)
        assert 0 < first <= 100
        assert next(wal.iter_shard(0, 0)) == b"entry-%03d" % first
        with pytest.raises(Exception, match="out of range"):
            wal.first_id(1)


@pytest.mark.parametrize("mode", [SyncMode.ASYNC, SyncMode.STRICT])
def test_a_shard_out_of_u64_ids_refuses_appends_with_a_clear_error(wal_root, mode):
    """A ring's next id is a u64. A shard whose files reach the last ids (only crafted files
    can) refuses appends with WalIOError(EOVERFLOW) on every path, where the fast path raised
    ValueError and a worker whose files end at id 2**64 - 1 died at start."""
    import errno

    from ironwal_mp import WalIOError
    from ironwal_mp.engine.frame import frame_for_entries

    opts = WalOptions(root_path=wal_root, sync_mode=mode)
    with ShardedWal(opts, 1):
        pass
    shard_dir = os.path.join(wal_root, "shard_00")
    for last in (2**64 - 2, 2**64 - 1):
        os.makedirs(shard_dir, exist_ok=True)
        for name in os.listdir(shard_dir):
            os.unlink(os.path.join(shard_dir, name))
        with open(os.path.join(shard_dir, layout.segment_name(last - 2)), "wb") as f:
            f.write(frame_for_entries(last - 2, [b"a", b"b", b"c"]))
        with ShardedWal(opts, 1, timeout=60) as wal:
            assert wal.stats()["shards"][0]["state"] == "open"
            assert wal.get(0, last - 2) == b"a" and wal.get(0, last - 1) == b"b"
            # (the ring cannot show id 2**64 - 1: reads stop before it)
            assert wal.get(0, last) == (b"c" if last < 2**64 - 1 else None)
            for append in (lambda: wal.append(b"k", b"v"), lambda: wal.append_batch([(b"k", b"v")]),
                           lambda: wal.append_batch_for_key(b"k", [b"v", b"w"])):
                with pytest.raises(WalIOError) as info:
                    append()
                assert info.value.errno == errno.EOVERFLOW and "run out of ids" in str(info.value)
        with ShardedWal(opts, 1, timeout=60) as wal:  # nothing was written by the refusals
            assert list(wal.iter_shard(0, 0)) == [b"a", b"b"] + ([b"c"] if last == 2**64 - 2 else [])
