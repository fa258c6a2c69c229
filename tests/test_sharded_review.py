"""Regressions from code review: stale readers after prune, pickling, workers that cannot restart."""

import os
import pickle
import signal
import subprocess
import sys
import time

import pytest

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
