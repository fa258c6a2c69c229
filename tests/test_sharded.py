"""Functional tests of the multiprocess sharded WAL (``ironwal_mp.ShardedWal``).

Every test uses the ``wal_root`` fixture, which fails the test if a coordinator or worker
process, or a shared-memory object or semaphore, is left behind. Child processes are started
with multiprocessing's 'spawn' context or as fresh interpreters (never fork).

No assertion depends on wall-clock time. Waits that could hang (a dead child) are bounded.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import zlib

import pytest

import _sharded_procs as P
from ironwal_mp import (
    CheckpointData,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CompactionStats,
    CompressionType,
    ConfigError,
    InvalidCheckpointIdError,
    InvalidIdError,
    NoCheckpointsError,
    PruneStats,
    RecordTooLargeError,
    ShardCountMismatchError,
    ShardedWal,
    SyncMode,
    WalClosedError,
    WalOptions,
    WorkerFailedError,
    connect,
)
from ironwal_mp.engine import layout
from ironwal_mp.engine.scanner import scan_frames
from ironwal_mp.ipc.names import Names

SPAWN = multiprocessing.get_context("spawn")
MODES = [SyncMode.STRICT, SyncMode.BATCH_ONLY, SyncMode.ASYNC]
MODE_IDS = [m.name for m in MODES]
CHILD_TIMEOUT = 180  # bound on waiting for a child's answer (a hang guard, not a time check)


def open_wal(root, n=4, mode=SyncMode.STRICT, *, workers=None, ring_size=1 << 16, flush_interval=0.1,
             idle_flush=True, **opts):
    return ShardedWal(WalOptions(root_path=root, sync_mode=mode, **opts), n, workers=workers, ring_size=ring_size,
                      flush_interval=flush_interval, idle_flush=idle_flush)


def shard_dir(root, s):
    return os.path.join(root, f"shard_{s:02d}")


def frame_bounds(stream_dir):
    """(start_id, end_id) of every frame of a stream, in order."""
    out = []
    for start in layout.list_segments(stream_dir):
        with open(os.path.join(stream_dir, layout.segment_name(start)), "rb") as fh:
            data = fh.read()
        for _off, header, _payload in scan_frames(lambda o, n: data[o : o + n], 0, start, end=len(data)):
            out.append((header.start_id, header.end_id))
    return out


def check_contiguous_and_readable(wal, expected):
    """``expected[s]`` is shard s's full list of values (ids 0..): compare every read path."""
    for s, values in expected.items():
        assert list(wal.iter_shard(s)) == values, f"shard {s}"
        assert list(wal.iter_shard(s, 0)) == values
        for i in (0, len(values) // 2, len(values) - 1):
            if 0 <= i < len(values):
                assert wal.get(s, i) == values[i]
                assert list(wal.iter_shard(s, i)) == values[i:]
        assert wal.get(s, len(values)) is None
        assert list(wal.iter_shard(s, len(values))) == []
        assert list(wal.iter_shard(s, len(values) + 10)) == []


def join_children(procs, out_q, count):
    results = [out_q.get(timeout=CHILD_TIMEOUT) for _ in range(count)]
    for p in procs:
        p.join(CHILD_TIMEOUT)
        assert p.exitcode == 0, f"child {p.pid} exited with {p.exitcode}"
    return results


# --- basic API, per sync mode ------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_api_basics(wal_root, mode):
    n = 4
    expected = {s: [] for s in range(n)}
    with open_wal(wal_root, n, mode) as wal:
        assert wal.shard_count == n and not wal.closed
        for i in range(60):
            key, value = b"user-%d" % i, b"value-%05d" % i
            shard, seq = wal.append(key, value)
            assert shard == zlib.crc32(key) % n == wal.shard_for(key)
            assert seq == len(expected[shard]), "ids per shard start at 0 and are contiguous"
            expected[shard].append(value)
            if mode is SyncMode.STRICT:  # STRICT: durable (so readable) when append returns
                assert wal.get(shard, seq) == value

        items = [(b"batch-%d" % i, b"b%03d" % i) for i in range(25)]
        acks = wal.append_batch(items)
        assert len(acks) == len(items)
        for (key, value), (shard, seq) in zip(items, acks):  # input order
            assert shard == zlib.crc32(key) % n
            assert seq == len(expected[shard])
            expected[shard].append(value)
            if mode is not SyncMode.ASYNC:  # batches are fsynced in STRICT and BATCH_ONLY
                assert wal.get(shard, seq) == value

        values = [b"txn-%d" % i for i in range(7)]
        home = zlib.crc32(b"txn-key") % n
        acks = wal.append_batch_for_key(b"txn-key", values)
        assert acks == [(home, len(expected[home]) + i) for i in range(7)]
        expected[home].extend(values)

        assert wal.append_batch([]) == []
        assert wal.append_batch_for_key(b"k", []) == []
        assert wal.append_batch(iter([(b"gen", b"g")])) == [(zlib.crc32(b"gen") % n, len(expected[zlib.crc32(b"gen") % n]))]
        expected[zlib.crc32(b"gen") % n].append(b"g")
        shard, seq = wal.append(bytearray(b"bytes-like"), memoryview(b"mv"))
        assert (shard, seq) == (zlib.crc32(b"bytes-like") % n, len(expected[shard]))
        expected[shard].append(b"mv")
        shard, seq = wal.append(b"", b"")  # empty key and value are valid entries
        expected[shard].append(b"")

        wal.sync()
        check_contiguous_and_readable(wal, expected)
        stats = wal.stats()
        for s in range(n):
            assert stats["shards"][s]["next_id"] == stats["shards"][s]["durable_id"] == len(expected[s])

        # the transaction is one frame: no frame boundary falls inside it
        first = acks[0][1]
        bounds = frame_bounds(shard_dir(wal_root, home))
        assert any(a <= first and first + 7 <= b for a, b in bounds), bounds


def test_routing_is_stable_in_another_process(wal_root):
    keys = [b"alpha", b"beta", b"", b"\x00\xff" * 9] + [b"key-%d" % i for i in range(40)]
    n = 5
    with open_wal(wal_root, n) as wal:
        parent_routes = [wal.shard_for(k) for k in keys]
        assert parent_routes == [zlib.crc32(k) % n for k in keys]
        for k in keys[:10]:
            wal.append(k, b"parent:" + k)
        with SPAWN.Pool(1) as pool:
            child = pool.apply(P.child_routing, (wal_root, keys))
            pool.close()
            pool.join()
        assert child["pid"] != os.getpid()
        assert child["shard_count"] == n
        assert child["shard_for"] == parent_routes
        assert [s for s, _ in child["appends"]] == parent_routes
        assert all(q > 0 for s, q in child["appends"][:10]), "after the parent's entries"
        # the parent sees the child's (STRICT, so durable) entries where it said they went
        for key, (s, q) in zip(keys, child["appends"]):
            assert wal.get(s, q) == b"child:" + key
        # and the child read everything durable, the parent's entries included, straight from disk
        wal.sync()
        assert child["shards"] == [list(wal.iter_shard(s)) for s in range(n)]
        # and continues their ids
        s, q = wal.append(keys[0], b"after")
        assert q == 1 + max(q2 for s2, q2 in child["appends"] if s2 == s)
    with open(os.path.join(wal_root, "MANIFEST")) as fh:
        manifest = json.load(fh)
    assert manifest["shard_count"] == n and manifest["router"] == "crc32-v1"


# --- bad input ---------------------------------------------------------------------------------


def test_bad_input(wal_root):
    with open_wal(wal_root, 3) as wal:
        for bad in ("text", 5, None, [1]):
            with pytest.raises(TypeError):
                wal.append(bad, b"v")
            with pytest.raises(TypeError):
                wal.append(b"k", bad)
            with pytest.raises(TypeError):
                wal.shard_for(bad)
        with pytest.raises(TypeError):
            wal.append_batch([(b"k", "v")])
        with pytest.raises(TypeError):
            wal.append_batch([("k", b"v")])
        with pytest.raises(TypeError):
            wal.append_batch([b"not a pair"])
        with pytest.raises(TypeError):
            wal.append_batch([(b"k", b"v", b"extra")])
        with pytest.raises(TypeError):
            wal.append_batch_for_key("k", [b"v"])
        with pytest.raises(TypeError):
            wal.append_batch_for_key(b"k", [b"ok", "bad"])
        # a refused call wrote nothing: every shard is still empty
        wal.sync()
        assert all(list(wal.iter_shard(s)) == [] for s in range(3))
        assert wal.append(b"k", b"first") == (zlib.crc32(b"k") % 3, 0)

        for shard in (-1, 3, 100):
            with pytest.raises(ValueError):
                wal.get(shard, 0)
            with pytest.raises(ValueError):
                wal.iter_shard(shard, 0)
        for shard in ("0", 1.0, True, None):
            with pytest.raises(TypeError):
                wal.get(shard, 0)
        for bad_seq in (-1, 2**64):
            with pytest.raises(InvalidIdError):
                wal.get(0, bad_seq)
            with pytest.raises(InvalidIdError):
                wal.iter_shard(0, bad_seq)
        with pytest.raises(TypeError):
            wal.get(0, "1")
        with pytest.raises(TypeError):
            wal.iter_shard(0, 1.5)

        for bad_id in (b"", bytearray(), b"x" * 65536):
            with pytest.raises(InvalidCheckpointIdError):
                wal.create_checkpoint(bad_id)
            with pytest.raises(InvalidCheckpointIdError):
                wal.load_checkpoint(bad_id)
            with pytest.raises(InvalidCheckpointIdError):
                wal.prune_before_checkpoint(bad_id)
        for bad_id in ("ckpt", 7, None):
            with pytest.raises(TypeError):
                wal.create_checkpoint(bad_id)
            with pytest.raises(TypeError):
                wal.load_checkpoint(bad_id)
        with pytest.raises(TypeError):
            wal.compact_checkpoints("2")
        with pytest.raises(ConfigError, match="keep_latest_n"):
            wal.compact_checkpoints(0)
        assert wal.checkpoint_count == 0 and wal.list_checkpoints() == []

        # the largest valid id (65535 bytes) travels to the coordinator in several queue parts
        big = bytes(range(256)) * 255 + b"z" * 255
        assert len(big) == 65535
        data = wal.create_checkpoint(big)
        assert data.user_id == big
        assert wal.load_checkpoint(big) == data
        assert wal.load_latest_checkpoint() == (big, data)
        assert wal.list_checkpoints() == [(big, data.timestamp)]
        assert isinstance(wal.create_checkpoint(bytearray(b"ba")), CheckpointData)
        assert wal.load_checkpoint(memoryview(b"ba")).user_id == b"ba"


def test_bad_constructor_arguments(wal_root):
    opts = WalOptions(root_path=wal_root)
    with pytest.raises(TypeError):
        ShardedWal(wal_root, 2)
    with pytest.raises(TypeError):
        ShardedWal(opts, "2")
    for bad in (0, -1, 1001):
        with pytest.raises(ConfigError, match="shard_count"):
            ShardedWal(opts, bad)
    for bad in (0, -2, True, "1", 257):
        with pytest.raises(ConfigError):
            ShardedWal(opts, 2, workers=bad)
    for bad in (1000, 4095, 3 << 12, 1 << 32, 1 << 63, 1 << 64):  # (2**31 at most: one frame)
        with pytest.raises(ConfigError, match="ring_size") as info:
            ShardedWal(opts, 2, ring_size=bad)
        assert info.value.field == "ring_size"
    for bad in (4096.0, True, "65536", None):  # (a float leaked "unsupported operand type(s) for &")
        with pytest.raises(ConfigError, match="'ring_size': ring capacity must be an int"):
            ShardedWal(opts, 2, ring_size=bad)
    for bad in (0, -1, 0.00001, 3601, True, "0.1", None, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="flush_interval"):
            ShardedWal(opts, 2, flush_interval=bad)
    for bad in (1, "yes", None):
        with pytest.raises(ConfigError, match="idle_flush"):
            ShardedWal(opts, 2, idle_flush=bad)
    assert not os.path.exists(wal_root), "a refused constructor started nothing and wrote nothing"


def test_record_too_large(wal_root):
    ring = 1 << 14
    with open_wal(wal_root, 2, SyncMode.ASYNC, ring_size=ring) as wal:
        wal.append(b"a", b"small")  # so the big records below do not start at offset 0
        for value_len in (ring + 1, ring, ring - 3):
            with pytest.raises(RecordTooLargeError) as info:
                wal.append(b"a", b"x" * value_len)
            assert str(ring) in str(info.value), "the message names the limit"
            assert info.value.limit == ring
        with pytest.raises(RecordTooLargeError):
            wal.append_batch_for_key(b"a", [b"y" * (ring // 2), b"y" * (ring // 2)])
        with pytest.raises(RecordTooLargeError):
            wal.append_batch([(b"a", b"z" * (ring + 1))])
        # the largest record that fits (a 4-byte length prefix + value == the ring) goes through,
        # even when it has to wrap to the ring's start
        s, q = wal.append(b"a", b"m" * (ring - 4))
        assert q == 1
        s2, q2 = wal.append(b"a", b"after")
        assert (s2, q2) == (s, 2)
        wal.sync()
        assert list(wal.iter_shard(s)) == [b"small", b"m" * (ring - 4), b"after"]


# --- checkpoint errors and bookkeeping -------------------------------------------------------------


def test_checkpoint_errors_and_round_trips(wal_root):
    with open_wal(wal_root, 3, SyncMode.BATCH_ONLY) as wal:
        with pytest.raises(NoCheckpointsError):
            wal.load_latest_checkpoint()
        with pytest.raises(CheckpointNotFoundError):
            wal.load_checkpoint(b"nope")
        with pytest.raises(CheckpointNotFoundError):
            wal.prune_before_checkpoint(b"nope")
        assert wal.checkpoint_count == 0

        made = []
        for i in range(4):
            wal.append_batch([(b"k%d-%d" % (i, j), b"v") for j in range(5)])
            made.append(wal.create_checkpoint(b"ckpt-%d" % i))
        for i, data in enumerate(made):
            assert data.user_id == b"ckpt-%d" % i and data.shard_count == 3
            assert sum(data.offsets) == 5 * (i + 1)
            assert wal.load_checkpoint(data.user_id) == data
        assert wal.list_checkpoints() == [(d.user_id, d.timestamp) for d in made]
        assert wal.load_latest_checkpoint() == (b"ckpt-3", made[-1])
        assert [d.timestamp for d in made] == sorted(d.timestamp for d in made)
        assert wal.checkpoint_count == 4

        # reuse: refused, and neither the log nor the shards change
        log_before = open(os.path.join(wal_root, "checkpoints.log"), "rb").read()
        wal.sync()
        counts = [len(list(wal.iter_shard(s))) for s in range(3)]
        for reused in (b"ckpt-0", b"ckpt-3"):
            with pytest.raises(CheckpointExistsError):
                wal.create_checkpoint(reused)
        assert open(os.path.join(wal_root, "checkpoints.log"), "rb").read() == log_before
        assert wal.list_checkpoints() == [(d.user_id, d.timestamp) for d in made]
        assert wal.load_checkpoint(b"ckpt-0") == made[0]
        assert wal.load_latest_checkpoint() == (b"ckpt-3", made[-1])
        wal.sync()
        assert [len(list(wal.iter_shard(s))) for s in range(3)] == counts

        # checkpoints of an idle WAL repeat the offsets
        again = wal.create_checkpoint(b"idle")
        assert again.offsets == made[-1].offsets

    with open_wal(wal_root, 3) as wal:  # a reopened WAL reads the same log
        assert wal.list_checkpoints()[:4] == [(d.user_id, d.timestamp) for d in made]
        assert wal.load_latest_checkpoint()[0] == b"idle"
        with pytest.raises(CheckpointExistsError):
            wal.create_checkpoint(b"ckpt-1")


def test_compact_checkpoints_keeps_newest(wal_root):
    with open_wal(wal_root, 2, SyncMode.ASYNC) as wal:
        made = []
        for i in range(6):
            wal.append(b"k%d" % i, b"v%d" % i)
            made.append(wal.create_checkpoint(b"c%d" % i))
        size = os.path.getsize(os.path.join(wal_root, "checkpoints.log"))
        stats = wal.compact_checkpoints(2)
        assert isinstance(stats, CompactionStats)
        assert (stats.checkpoints_before, stats.checkpoints_after) == (6, 2)
        assert stats.bytes_reclaimed == size - os.path.getsize(os.path.join(wal_root, "checkpoints.log")) > 0
        assert wal.list_checkpoints() == [(d.user_id, d.timestamp) for d in made[-2:]]
        assert wal.checkpoint_count == 2
        assert wal.load_latest_checkpoint() == (b"c5", made[-1])
        assert wal.load_checkpoint(b"c4") == made[4]
        for gone in made[:4]:
            with pytest.raises(CheckpointNotFoundError):
                wal.load_checkpoint(gone.user_id)
        # keeping more than there are changes nothing
        stats = wal.compact_checkpoints(10)
        assert (stats.checkpoints_before, stats.checkpoints_after, stats.bytes_reclaimed) == (2, 2, 0)
        assert wal.compact_checkpoints().checkpoints_after == 2  # default keep_latest_n=10
        # new checkpoints go on after compaction
        later = wal.create_checkpoint(b"c6")
        assert [i for i, _ in wal.list_checkpoints()] == [b"c4", b"c5", b"c6"]
        assert wal.load_latest_checkpoint() == (b"c6", later)
    with open_wal(wal_root, 2) as wal:
        assert [i for i, _ in wal.list_checkpoints()] == [b"c4", b"c5", b"c6"]


@pytest.mark.parametrize("mode", [SyncMode.ASYNC, SyncMode.STRICT], ids=["ASYNC", "STRICT"])
def test_prune_before_checkpoint(wal_root, mode):
    n = 3
    expected = {s: [] for s in range(n)}
    small = dict(max_segment_size=4096, compression=CompressionType.NONE)
    with open_wal(wal_root, n, mode, **small) as wal:
        for b in range(150):
            items = [(b"key-%d" % (i % 50), b"prune-%04d-" % i + b"p" * (i % 40)) for i in range(b * 10, b * 10 + 10)]
            for (s, q), (_key, value) in zip(wal.append_batch(items), items):
                assert q == len(expected[s])
                expected[s].append(value)
            if b % 5 == 4:
                wal.sync()  # in ASYNC, a worker writes all it finds as one frame: keep frames small
        ck = wal.create_checkpoint(b"mid")
        assert ck.offsets == tuple(len(expected[s]) for s in range(n))
        for i in range(100):
            s, q = wal.append(b"tail-%d" % i, b"tail-%d" % i)
            expected[s].append(b"tail-%d" % i)
        wal.sync()
        before = {s: layout.list_segments(shard_dir(wal_root, s)) for s in range(n)}
        assert all(len(v) > 2 for v in before.values()), "small segments rotate"

        stats = wal.prune_before_checkpoint(b"mid")
        assert isinstance(stats, PruneStats)
        after = {s: layout.list_segments(shard_dir(wal_root, s)) for s in range(n)}
        deleted = {s: len(before[s]) - len(after[s]) for s in range(n)}
        assert stats.segments_deleted == sum(deleted.values()) > 0
        assert stats.shards_pruned == sum(1 for d in deleted.values() if d)
        for s in range(n):
            off = ck.offsets[s]
            first = after[s][0]
            # whole segments below the offset went; the one holding the offset stays
            assert first == max(x for x in before[s] if x <= off)
            assert after[s] == [x for x in before[s] if x >= first]
            assert list(wal.iter_shard(s, 0)) == expected[s][first:]
            assert list(wal.iter_shard(s, off)) == expected[s][off:]
            # with ids, a consumer knows where an iteration that asked for pruned ids began
            assert list(wal.iter_shard(s, 0, with_ids=True)) == list(enumerate(expected[s]))[first:]
            assert list(wal.iter_shard(s, off + 1, with_ids=True))[:1] == [(off + 1, expected[s][off + 1])]
            if first:
                assert wal.get(s, first - 1) is None
                assert wal.get(s, 0) is None
            assert wal.get(s, first) == expected[s][first]
        # pruning again deletes nothing more
        assert wal.prune_before_checkpoint(b"mid").segments_deleted == 0
        # appends go on after pruning
        s, q = wal.append(b"after-prune", b"ap")
        assert q == len(expected[s])
        expected[s].append(b"ap")
        firsts = {s: after[s][0] for s in range(n)}
    with open_wal(wal_root, n, mode, **small) as wal:  # pruning survives reopening
        for s in range(n):
            assert list(wal.iter_shard(s)) == expected[s][firsts[s]:]


# --- lifecycle -------------------------------------------------------------------------------------


def test_closed_handle_raises(wal_root):
    wal = open_wal(wal_root, 2)
    wal.append(b"k", b"v")
    wal.close()
    assert wal.closed
    wal.close()  # idempotent
    calls = [
        lambda: wal.append(b"k", b"v"),
        lambda: wal.append_batch([(b"k", b"v")]),
        lambda: wal.append_batch_for_key(b"k", [b"v"]),
        lambda: wal.sync(),
        lambda: wal.get(0, 0),
        lambda: wal.iter_shard(0, 0),
        lambda: wal.create_checkpoint(b"c"),
        lambda: wal.load_latest_checkpoint(),
        lambda: wal.load_checkpoint(b"c"),
        lambda: wal.list_checkpoints(),
        lambda: wal.prune_before_checkpoint(b"c"),
        lambda: wal.compact_checkpoints(1),
        lambda: wal.stats(),
        lambda: wal.checkpoint_count,
    ]
    for call in calls:
        with pytest.raises(WalClosedError):
            call()
    assert P.wait_gone(wal_root, 0) == []


def test_connect_without_coordinator(wal_root):
    with pytest.raises(WalClosedError) as info:
        connect(wal_root)
    message = str(info.value)
    assert "no coordinator" in message and os.path.abspath(wal_root) in message
    # the same after a WAL was opened and closed there
    open_wal(wal_root, 2).close()
    with pytest.raises(WalClosedError):
        connect(wal_root)
    with pytest.raises(WalClosedError):
        ShardedWal(WalOptions(root_path=wal_root), None, _start=False)


@pytest.mark.parametrize("started", [SyncMode.ASYNC, SyncMode.BATCH_ONLY])
def test_connect_appends_in_the_mode_the_wal_was_started_with(wal_root, started):
    """`serve --sync async` then connect() gave STRICT appends: the mode the coordinator was
    started with was recorded and never read. A handle may still choose its own."""
    import pickle

    with ShardedWal(WalOptions(root_path=wal_root, sync_mode=started), 2, workers=1):
        with connect(wal_root) as job:
            assert job.options.sync_mode is started
            again = pickle.loads(pickle.dumps(job))
            assert again.options.sync_mode is started
            again.close()
        with connect(wal_root, sync_mode=SyncMode.STRICT) as job:
            assert job.options.sync_mode is SyncMode.STRICT
            shard, seq = job.append(b"k", b"v")
            assert job.stats()["shards"][shard]["durable_id"] >= seq + 1
            assert job.stats()["sync_mode"] == "strict"
        with connect(wal_root) as job:
            assert job.stats()["sync_mode"] == started.value
        for bad in ("", 0, False):  # (not taken for "no choice")
            with pytest.raises(ConfigError, match="sync_mode"):
                connect(wal_root, sync_mode=bad)


def test_reopen_with_another_shard_count(wal_root):
    with open_wal(wal_root, 4) as wal:
        wal.append(b"k", b"v")
        # the same process, while it runs
        with pytest.raises(ShardCountMismatchError) as info:
            open_wal(wal_root, 6)
        assert (info.value.expected, info.value.found) == (6, 4)
        # attaching with the right count (or with connect) shares the running WAL
        with open_wal(wal_root, 4) as second:
            assert second.append(b"k", b"w")[1] == 1
        wal.append(b"k", b"x")  # the first handle still works after the second closed
    with pytest.raises(ShardCountMismatchError) as info:
        open_wal(wal_root, 3)
    assert (info.value.expected, info.value.found) == (3, 4)
    assert "4" in str(info.value) and "3" in str(info.value)
    with open(os.path.join(wal_root, "MANIFEST")) as fh:
        assert json.load(fh)["shard_count"] == 4
    with open_wal(wal_root, 4) as wal:
        wal.sync()
        assert list(wal.iter_shard(zlib.crc32(b"k") % 4)) == [b"v", b"w", b"x"]


def test_second_coordinator_from_another_process_is_refused(wal_root):
    with open_wal(wal_root, 4, workers=2) as wal:
        wal.append(b"k", b"before")
        pids = wal.stats()
        # another process asking for another layout gets a clear error...
        with SPAWN.Pool(1) as pool:
            kind, message, extra = pool.apply(P.child_open, (wal_root, 8, "strict"))
            same = pool.apply(P.child_open, (wal_root, 4, "strict"))
            pool.close()
            pool.join()
        assert kind == "ShardCountMismatchError", message
        assert extra == (8, 4)
        assert same == ("opened", "", (4,))
        # ...and a coordinator started by hand for the same directory exits without touching it
        env = dict(os.environ, IRONWAL_MP_OPTIONS=json.dumps({"root_path": wal_root}))
        project = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = project
        rogue = subprocess.run(
            [sys.executable, "-m", "coordinator", "--root", wal_root, "--shards", "8", "--ring-size", "65536"],
            env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=CHILD_TIMEOUT,
        )
        assert rogue.returncode != 0
        assert b"WalLockedError" in rogue.stderr and wal_root.encode() in rogue.stderr, rogue.stderr
        # the command-line server refuses too, naming the mismatch
        cli = subprocess.run(
            [sys.executable, "-m", "ironwal_mp", "serve", "--root", wal_root, "--shards", "8"],
            env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=CHILD_TIMEOUT,
        )
        assert cli.returncode != 0
        assert b"mismatch" in cli.stderr.lower(), cli.stderr
        # a worker not started by this coordinator (one whose coordinator died while it
        # started finds a successor's control block) refuses before it opens any shard
        shard0 = wal.stats()["shards"][0]
        stray = subprocess.run(
            [sys.executable, "-m", "workers", "--root", wal_root, "--shards", "0,1", "--index", "0"],
            env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=CHILD_TIMEOUT,
        )
        assert stray.returncode != 0
        assert b"refusing to open shards" in stray.stderr, stray.stderr
        after = wal.stats()
        assert (after["shards"][0]["worker_pid"], after["shards"][0]["worker_restarts"]) == \
            (shard0["worker_pid"], shard0["worker_restarts"])
        assert after["coordinator_pid"] == pids["coordinator_pid"]
        assert after["worker_pids"] == pids["worker_pids"] and after["state"] == "ready"
        assert wal.append(b"k", b"after") == (zlib.crc32(b"k") % 4, 1)
        assert wal.create_checkpoint(b"still-fine").offsets[zlib.crc32(b"k") % 4] == 2
        with open(os.path.join(wal_root, "MANIFEST")) as fh:
            assert json.load(fh)["shard_count"] == 4


def test_process_command_lines(wal_root):
    root = os.path.abspath(wal_root)
    n = 6
    with open_wal(wal_root, n, workers=3) as wal:
        stats = wal.stats()
        coord = P.cmdline(stats["coordinator_pid"])
        assert "coordinator" in coord
        i = coord.index("--root")
        assert coord[i + 1] == root
        assert stats["coordinator_pid"] != os.getpid()
        worker_pids = stats["worker_pids"]
        assert len(worker_pids) == 3 and len(set(worker_pids)) == 3
        owned = {}
        for pid in worker_pids:
            args = P.cmdline(pid)
            assert "workers" in args
            assert args[args.index("--root") + 1] == root
            shards = [int(x) for x in args[args.index("--shards") + 1].split(",")]
            for s in shards:
                assert s not in owned, "each shard has one worker"
                owned[s] = pid
        assert sorted(owned) == list(range(n))
        for s in range(n):
            assert stats["shards"][s]["worker_pid"] == owned[s]


@pytest.mark.parametrize("workers,n,expect", [(1, 4, 1), (2, 4, 2), (4, 4, 4), (8, 3, 3)])
def test_workers_option(wal_root, workers, n, expect):
    with open_wal(wal_root, n, SyncMode.STRICT, workers=workers) as wal:
        pids = wal.stats()["worker_pids"]
        assert len(pids) == expect and len(set(pids)) == expect
        assert all(P.alive(p) for p in pids)
        for s in range(n):
            key = P.key_for_shard(s, n)
            assert wal.append(key, b"w") == (s, 0)
        assert sorted({sh["worker_pid"] for sh in wal.stats()["shards"]}) == sorted(pids)


def test_default_workers_is_bounded_by_cpus(wal_root):
    with open_wal(wal_root, 16) as wal:
        assert len(wal.stats()["worker_pids"]) == min(16, os.cpu_count() or 1)


def test_pickled_handle_in_spawn_pool(wal_root):
    with open_wal(wal_root, 4, SyncMode.ASYNC) as wal:
        clone = pickle.loads(pickle.dumps(wal))  # in this process: attaches to the same WAL
        assert clone.shard_count == 4 and clone.options.sync_mode is SyncMode.ASYNC
        clone.append(b"clone", b"c")
        clone.close()
        with SPAWN.Pool(2) as pool:
            results = pool.starmap(P.pool_task, [(wal, tag, 40) for tag in range(4)])
            pool.close()
            pool.join()
        wal.sync()
        seen = set()
        for acks in results:
            for s, q, value in acks:
                assert wal.get(s, q) == value
                seen.add((s, q))
        assert len(seen) == 4 * 80 + 0  # distinct (shard, seq) for every acknowledged entry
        total = sum(len(list(wal.iter_shard(s))) for s in range(4))
        assert total == 4 * 80 + 1


def test_close_of_the_starter_shuts_everything_down(wal_root):
    wal = open_wal(wal_root, 4, workers=2)
    stats = wal.stats()
    pids = [stats["coordinator_pid"], *stats["worker_pids"]]
    assert all(P.alive(p) for p in pids)
    q = SPAWN.Queue()
    ready, go = SPAWN.Event(), SPAWN.Event()
    child = SPAWN.Process(target=P.attached_then_append, args=(wal_root, ready, go, q))
    child.start()
    try:
        assert ready.wait(CHILD_TIMEOUT)
        wal.append(b"k", b"v")
        wal.close()
        assert not any(P.alive(p) for p in pids), "close() returns after the processes exited"
        assert Names(wal_root).leftovers() == []
    finally:
        go.set()
    what, kind, message = q.get(timeout=CHILD_TIMEOUT)
    child.join(CHILD_TIMEOUT)
    assert what == "append"
    assert kind == "WalClosedError", message  # an attached client gets a clear error


def test_detach_of_another_process_keeps_the_wal(wal_root):
    with open_wal(wal_root, 2) as wal:
        with SPAWN.Pool(1) as pool:
            child = pool.apply(P.child_routing, (wal_root, [b"a", b"b"]))
            pool.close()
            pool.join()
        assert wal.stats()["state"] == "ready"
        assert wal.append(b"a", b"parent")[1] == 1 + max(q for s, q in child["appends"] if s == zlib.crc32(b"a") % 2)


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_reopen_recovers_everything(wal_root, mode):
    n = 4
    expected = {s: [] for s in range(n)}
    with open_wal(wal_root, n, mode, max_segment_size=8192) as wal:
        for i in range(400):
            s, q = wal.append(b"r%d" % i, b"reopen-%d" % i)
            expected[s].append(b"reopen-%d" % i)
        for r in range(10):
            items = [(b"rb%d-%d" % (r, j), b"rb-%d-%d" % (r, j)) for j in range(13)]
            for (s, q), (_k, v) in zip(wal.append_batch(items), items):
                expected[s].append(v)
        ck = wal.create_checkpoint(b"before-close")
        for i in range(100):  # not synced: close() must still drain these
            s, q = wal.append(b"late%d" % i, b"late-%d" % i)
            expected[s].append(b"late-%d" % i)
    for _round in range(1):
        with open_wal(wal_root, n, mode, max_segment_size=8192) as wal:
            check_contiguous_and_readable(wal, expected)
            assert wal.load_latest_checkpoint() == (b"before-close", ck)
            st = wal.stats()
            assert [x["next_id"] for x in st["shards"]] == [len(expected[s]) for s in range(n)]
            s, q = wal.append(b"r0", b"next")
            assert q == len(expected[s])
            expected[s].append(b"next")
    with connect_after_start(wal_root, n) as wal:
        check_contiguous_and_readable(wal, expected)


class connect_after_start:
    """Open a WAL, then use a connect()ed handle to it (closing both at the end)."""

    def __init__(self, root, n):
        self.starter = open_wal(root, n)
        self.wal = connect(root)

    def __enter__(self):
        return self.wal

    def __exit__(self, *exc):
        self.wal.close()
        self.starter.close()


def test_starter_exit_without_close_shuts_down(wal_root):
    script = (
        "import sys, os\n"
        "from ironwal_mp import ShardedWal, WalOptions\n"
        "w = ShardedWal(WalOptions(root_path=sys.argv[1], sync_mode='async'), 3)\n"
        "for i in range(300): w.append(b'k%d' % i, b'v%d' % i)\n"
        "print(w.stats()['coordinator_pid'], flush=True)\n"
        "os._exit(0)\n"  # no close(), no finalizers
    )
    out = subprocess.run([sys.executable, "-c", script, wal_root], capture_output=True, timeout=CHILD_TIMEOUT)
    assert out.returncode == 0, out.stderr.decode()
    assert P.wait_gone(wal_root) == [], "the coordinator notices its starter is gone"
    with open_wal(wal_root, 3) as wal:
        assert sum(len(list(wal.iter_shard(s))) for s in range(3)) == 300
        for i in (0, 150, 299):
            s = zlib.crc32(b"k%d" % i) % 3
            assert b"v%d" % i in list(wal.iter_shard(s))


# --- durability of checkpoints and stats -------------------------------------------------------------


@pytest.mark.parametrize("group_sync", ["syncfs", "fdatasync"])
def test_checkpoint_offsets_durable_on_return_async(wal_root, group_sync):
    n = 4
    expected = {s: [] for s in range(n)}
    with open_wal(wal_root, n, SyncMode.ASYNC, ring_size=1 << 20, group_sync=group_sync) as wal:
        for r in range(5):
            for i in range(3000):
                v = b"a%d-%d" % (r, i)
                s, q = wal.append(b"%d" % i, v)
                expected[s].append(v)
            ck = wal.create_checkpoint(b"ck%d" % r)
            assert ck.offsets == tuple(len(expected[s]) for s in range(n))
            for s in range(n):  # no sync(): the checkpoint itself made this durable
                off = ck.offsets[s]
                got = list(itertools.islice(wal.iter_shard(s, 0), off))
                assert got == expected[s][:off]
                if off:
                    assert wal.get(s, off - 1) == expected[s][off - 1]
                assert wal.stats()["shards"][s]["durable_id"] >= off


def test_async_entries_become_durable_once_the_rings_go_quiet(wal_root):
    # the interval flush is an hour away: only the idle flush can make these durable
    with open_wal(wal_root, 4, SyncMode.ASYNC, flush_interval=3600) as wal:
        assert wal.stats()["flush_interval"] == 3600
        acked = [wal.append(b"k%d" % i, b"v%d" % i) for i in range(50)]
        deadline = time.monotonic() + 30  # a bound on waiting, not a measured duration
        while True:
            shards = wal.stats()["shards"]
            if all(sh["durable_id"] == sh["next_id"] for sh in shards):
                break
            assert time.monotonic() < deadline, f"never made durable without sync(): {shards}"
            time.sleep(0.01)
        for s, q in acked:  # durable, so readable from the segment files
            assert wal.get(s, q) is not None


def test_without_idle_flush_async_entries_wait_for_the_interval_or_sync(wal_root):
    with open_wal(wal_root, 4, SyncMode.ASYNC, flush_interval=3600, idle_flush=False) as wal:
        assert wal.stats()["idle_flush"] is False
        for i in range(50):
            wal.append(b"k%d" % i, b"v%d" % i)
        time.sleep(0.3)  # hundreds of times the idle flush's quiet period: it would have run by now
        shards = wal.stats()["shards"]
        assert sum(sh["fsyncs"] for sh in shards) == 0, shards
        assert all(sh["durable_id"] == 0 for sh in shards)
        wal.sync()
        assert all(sh["durable_id"] == sh["next_id"] for sh in wal.stats()["shards"])


def test_stats_fields(wal_root):
    n = 3
    with open_wal(wal_root, n, SyncMode.STRICT, workers=2, ring_size=1 << 14) as wal:
        st = wal.stats()
        assert st["root"] == os.path.abspath(wal_root)
        assert st["shard_count"] == n and st["state"] == "ready"
        assert P.alive(st["coordinator_pid"]) and len(st["worker_pids"]) == 2
        for s, sh in enumerate(st["shards"]):
            assert sh["shard"] == s
            assert sh["next_id"] == sh["written_id"] == sh["durable_id"] == 0
            assert sh["ring_capacity"] == 1 << 14 and sh["ring_used"] == 0
            assert sh["state"] == "open" and sh["worker_restarts"] == 0
            assert sh["worker_pid"] in st["worker_pids"]
        counts = [0] * n
        for i in range(50):
            s, _ = wal.append(b"s%d" % i, b"x" * 10)
            counts[s] += 1
        st = wal.stats()
        for s, sh in enumerate(st["shards"]):
            assert sh["next_id"] == sh["written_id"] == sh["durable_id"] == counts[s]
            assert sh["entries"] == counts[s]
            assert sh["bytes"] == counts[s] * (4 + 10)  # the length-prefixed records
            if counts[s]:
                assert 1 <= sh["frames"] <= counts[s]
                assert 1 <= sh["fsyncs"] <= counts[s]
                assert sh["fsync_avg_us"] > 0 and sh["last_fsync_us"] > 0
            assert 0 <= sh["ring_used"] <= sh["ring_capacity"]
        json.dumps(st)  # plain data


# --- many producer processes ---------------------------------------------------------------------


def test_many_attached_processes(wal_root):
    """More processes than 8 KiB message queues would allow one user (see _sharded_procs) attach
    at once, each with its own reply queue."""
    members = 10
    with open_wal(wal_root, 4, workers=2) as wal:
        q = SPAWN.Queue()
        barrier = SPAWN.Barrier(members)
        procs = [SPAWN.Process(target=P.attached_member, args=(wal_root, i, barrier, q)) for i in range(members)]
        for p in procs:
            p.start()
        results = sorted(join_children(procs, q, members))
        for idx, kind, detail in results:
            assert kind == "ok", f"member {idx}: {kind}: {detail}"
        for idx, _kind, (s, seq, cid, won) in results:
            assert wal.get(s, seq) == b"m%d" % idx
            assert wal.load_checkpoint(cid).user_id == cid
        # all of them raced for one checkpoint id: exactly one got it, the others were refused
        assert sum(won for _i, _k, (_s, _q, _c, won) in results) == 1
        assert wal.checkpoint_count == members + 1


@pytest.mark.parametrize(
    "mode,rounds,ring",
    [(SyncMode.ASYNC, 600, 1 << 16), (SyncMode.STRICT, 150, 1 << 16), (SyncMode.ASYNC, 400, 1 << 12)],
    ids=["ASYNC", "STRICT", "ASYNC-tiny-ring"],  # a 4 KiB ring wraps and fills all the time
)
def test_concurrent_producers_exact(wal_root, mode, rounds, ring):
    n, producers = 16, 4
    with open_wal(wal_root, n, mode, workers=2, ring_size=ring, max_segment_size=1 << 16) as wal:
        q = SPAWN.Queue()
        procs = [SPAWN.Process(target=P.producer, args=(wal_root, mode.value, i, rounds, q)) for i in range(producers)]
        for p in procs:
            p.start()
        results = join_children(procs, q, producers)
        wal.sync()
        acked = {}
        for idx, acks, error in results:
            assert error is None, f"producer {idx}: {error}"
            for s, seq, value in acks:
                assert (s, seq) not in acked, f"({s}, {seq}) acknowledged twice"
                acked[(s, seq)] = value
        total = sum(len(a) for _i, a, _e in results)
        assert len(acked) == total
        stored = 0
        for s in range(n):
            entries = list(wal.iter_shard(s))
            stored += len(entries)
            assert sorted(q2 for s2, q2 in acked if s2 == s) == list(range(len(entries))), "ids 0..durable-1"
            for seq, value in enumerate(entries):
                assert acked[(s, seq)] == value
            assert wal.stats()["shards"][s]["durable_id"] == len(entries)
        assert stored == total
        for (s, seq), value in itertools.islice(acked.items(), 0, None, 97):
            assert wal.get(s, seq) == value


@pytest.mark.parametrize("mode", [SyncMode.ASYNC, SyncMode.STRICT], ids=["ASYNC", "STRICT"])
def test_checkpoints_are_consistent_cuts_under_concurrent_producers(wal_root, mode):
    n, producers, checkpoints = 16, 3, 25
    max_len = 60000 if mode is SyncMode.ASYNC else 20000
    with open_wal(wal_root, n, mode, workers=2, ring_size=1 << 18, max_segment_size=1 << 18) as wal:
        q = SPAWN.Queue()
        stop = SPAWN.Event()
        progress = [SPAWN.Value("q", 0, lock=False) for _ in range(producers)]
        procs = [
            SPAWN.Process(target=P.chain_producer, args=(wal_root, mode.value, i, n, stop, progress[i], q, max_len))
            for i in range(producers)
        ]
        for p in procs:
            p.start()
        try:
            # start checkpointing once every producer is under way (bounded wait on a dead child)
            guard = time.monotonic() + CHILD_TIMEOUT  # a hang guard, not a time check
            while min(v.value for v in progress) < 20:
                assert all(p.exitcode is None for p in procs), "a producer died before starting"
                assert time.monotonic() < guard, "producers made no progress"
                time.sleep(0.01)
            taken = []
            for c in range(checkpoints):
                before = [v.value for v in progress]  # entries acknowledged before the call
                data = wal.create_checkpoint(b"cut-%d" % c)
                after = [v.value for v in progress]  # entries started after the call are > these
                taken.append((data, before, after))
        finally:
            stop.set()
        results = join_children(procs, q, producers)
        chains = {}
        for idx, acks, error in results:
            assert error is None, f"producer {idx}: {error}"
            chains[idx] = acks
        wal.sync()

        # every acknowledged chain entry reads back as itself; ids are contiguous per shard
        per_shard = {s: [] for s in range(n)}
        for idx, acks in chains.items():
            assert len(acks) >= 20
            for i, (s, seq) in enumerate(acks):
                per_shard[s].append(seq)
                if i:
                    assert s != acks[i - 1][0], "consecutive chain entries go to different shards"
        for s in range(n):
            entries = list(wal.iter_shard(s))
            assert sorted(per_shard[s]) == list(range(len(entries)))
        for idx, acks in chains.items():
            for i in range(0, len(acks), max(1, len(acks) // 300)):
                s, seq = acks[i]
                assert wal.get(s, seq) == b"chain:%d:%d" % (idx, i)

        previous = None
        for data, before, after in taken:
            assert data.shard_count == n
            if previous is not None:
                assert all(a >= b for a, b in zip(data.offsets, previous)), "offsets never go back"
            previous = data.offsets
            for idx, acks in chains.items():
                inside = [seq < data.offsets[s] for s, seq in acks]
                k = inside.index(False) if False in inside else len(inside)
                assert not any(inside[k:]), (
                    f"checkpoint {data.user_id!r}: producer {idx}'s entry {k} is outside but a later one is inside"
                )
                # acknowledged before the checkpoint began: inside; begun after it returned: outside
                assert before[idx] <= k <= after[idx] + 1, (data.user_id, idx, before[idx], k, after[idx])
        listed = [i for i, _ in wal.list_checkpoints()]
        assert listed == [d.user_id for d, _b, _a in taken]


# --- the Rust crate's sharded fixture -----------------------------------------------------------------


def test_rust_crate_sharded_fixture(wal_root, fixture_copy, fixtures_dir):
    with open(os.path.join(fixtures_dir, "expected.json")) as fh:
        exp = json.load(fh)["sharded"]
    shutil.copytree(fixture_copy("sharded"), wal_root)
    n = exp["options"]["shard_count"]
    assert not os.path.exists(os.path.join(wal_root, "MANIFEST"))
    opts = dict(max_segment_size=exp["options"]["max_segment_size"], compression=CompressionType.NONE)

    # a wrong shard count is refused before anything is written
    with pytest.raises(ShardCountMismatchError) as info:
        open_wal(wal_root, n + 1, **opts)
    assert (info.value.expected, info.value.found) == (n + 1, n)
    assert not os.path.exists(os.path.join(wal_root, "MANIFEST"))

    entries = [[bytes.fromhex(h) for h in sh["entries_hex"]] for sh in exp["shards"]]
    ckpts = exp["checkpoints"]
    with open_wal(wal_root, n, **opts) as wal:
        with open(os.path.join(wal_root, "MANIFEST")) as fh:
            manifest = json.load(fh)
        assert manifest["shard_count"] == n and "adopted_from" in manifest
        for s, sh in enumerate(exp["shards"]):
            assert sh["first_id"] == 0
            assert list(wal.iter_shard(s)) == entries[s]
            assert len(entries[s]) == sh["next_id"]
            assert wal.stats()["shards"][s]["next_id"] == sh["next_id"]
            assert wal.get(s, sh["next_id"]) is None
        for key, where in itertools.islice(exp["routing"].items(), 0, None, 37):
            i = int(key.split("_")[1])
            assert wal.get(where["shard"], where["id"]) == b"value-%05d" % i

        listed = wal.list_checkpoints()
        assert listed == [(bytes.fromhex(c["user_id_hex"]), c["timestamp_as_stored"]) for c in ckpts]
        for c in ckpts:
            data = wal.load_checkpoint(bytes.fromhex(c["user_id_hex"]))
            assert data.user_id == c["user_id"].encode()
            assert data.timestamp == c["timestamp_as_stored"]
            assert data.shard_count == c["shard_count"] == n
            assert list(data.offsets) == c["offsets"]
            for s in range(n):
                assert list(wal.iter_shard(s, data.offsets[s])) == entries[s][data.offsets[s]:]
        latest_id, latest = wal.load_latest_checkpoint()
        assert latest_id == exp["latest_checkpoint_user_id"].encode()
        assert list(latest.offsets) == next(c["offsets"] for c in ckpts if c["user_id"] == exp["latest_checkpoint_user_id"])
        with pytest.raises(CheckpointExistsError):
            wal.create_checkpoint(b"ckpt-200")

        # the adopted directory takes new entries after the crate's, and new checkpoints
        added = {}
        for s in range(n):
            key = P.key_for_shard(s, n, "new")
            assert wal.append(key, b"new-%d" % s) == (s, len(entries[s]))
            added[s] = b"new-%d" % s
        mine = wal.create_checkpoint(b"python-1")
        assert list(mine.offsets) == [len(entries[s]) + 1 for s in range(n)]
        assert [i for i, _ in wal.list_checkpoints()] == [b"ckpt-200", b"ckpt-400", b"python-1"]
    with open_wal(wal_root, n, **opts) as wal:
        for s in range(n):
            assert list(wal.iter_shard(s)) == entries[s] + [added[s]]
        assert wal.load_latest_checkpoint()[0] == b"python-1"
        assert wal.load_checkpoint(b"ckpt-200").timestamp == ckpts[0]["timestamp_as_stored"]


def _coordinator_client_queues(pid: int) -> set:
    """The client reply queues the coordinator process holds open, by name."""
    names = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if "_cli" in link:
            names.add(link)
    return names


def test_coordinator_keeps_reply_queues_only_while_clients_are_attached(wal_root):
    """A client's reply queue stays open in the coordinator between requests, and is closed
    when the client detaches (a leak would show as descriptors piling up)."""
    code = ("import sys; from ironwal_mp import connect; w = connect(sys.argv[1]); "
            "w.create_checkpoint(sys.argv[2].encode()); print('ok', flush=True); sys.stdin.readline(); w.close()")
    with ShardedWal(WalOptions(root_path=wal_root, sync_mode=SyncMode.ASYNC), 2, workers=1) as wal:
        coordinator = wal.stats()["coordinator_pid"]
        # compared by name: the starter's READY queue may still be open for a moment here
        base = _coordinator_client_queues(coordinator)
        clients = [subprocess.Popen([sys.executable, "-c", code, wal_root, f"c{i}"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True) for i in range(3)]
        try:
            for c in clients:
                assert c.stdout.readline().strip() == "ok"
            assert len(_coordinator_client_queues(coordinator) - base) == 3
            for c in clients:
                c.stdin.write("\n")
                c.stdin.flush()
                assert c.wait(60) == 0
            deadline = time.monotonic() + 30  # (the coordinator closes it just after answering DETACH)
            while _coordinator_client_queues(coordinator) - base and time.monotonic() < deadline:
                time.sleep(0.02)
            assert _coordinator_client_queues(coordinator) - base == set()
        finally:
            for c in clients:
                if c.poll() is None:
                    c.kill()
                c.wait()


def test_a_failure_after_attaching_releases_the_attachment(wal_root, monkeypatch):
    """An error while the new handle binds (after the coordinator was started and attached
    to) must not leave the attachment referenced: the coordinator this open started stops."""
    from ironwal_mp.ipc.names import processes_of
    from ironwal_mp.sharded import client as client_mod

    def broken(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(client_mod.ShardedWal, "_bind", broken)
    with pytest.raises(OSError):
        ShardedWal(WalOptions(root_path=wal_root, sync_mode=SyncMode.ASYNC), 2, workers=1)
    monkeypatch.undo()
    assert not client_mod._attachments
    wait_gone = time.monotonic() + 60
    while processes_of(wal_root) and time.monotonic() < wait_gone:
        time.sleep(0.05)
    assert not processes_of(wal_root)
    with ShardedWal(WalOptions(root_path=wal_root, sync_mode=SyncMode.ASYNC), 2, workers=1) as wal:
        assert wal.append(b"k", b"v")[1] == 0


def test_processes_opening_one_root_at_once_all_attach(wal_root):
    """Several processes call ShardedWal(opts, n) on one root at the same moment: one starts the
    coordinator, the others attach to it (none sees its start-up answer swept away)."""
    go = os.path.join(os.path.dirname(wal_root), "go")
    code = ("import os, sys, time\n"
            "from ironwal_mp import ShardedWal, WalOptions, SyncMode\n"
            "while not os.path.exists(sys.argv[2]): time.sleep(0.001)\n"
            "w = ShardedWal(WalOptions(root_path=sys.argv[1], sync_mode=SyncMode.STRICT), 4, workers=1)\n"
            "print(w.append(sys.argv[3].encode(), b'v')[0], flush=True)\n"
            "sys.stdin.readline()\n"
            "w.close()\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, wal_root, go, f"key-{i}"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    try:
        time.sleep(1.0)  # (all are waiting for the go file by then, or soon after)
        open(go, "w").close()
        shards = [p.stdout.readline().strip() for p in procs]
        errors = [p.stderr.read() for p in procs if p.poll() is not None]
        assert all(s.isdigit() for s in shards), (shards, errors)
        for p in procs:  # the starter last: closing it stops the coordinator
            p.stdin.write("\n")
            p.stdin.flush()
        for p in procs:
            assert p.wait(120) == 0, p.stderr.read()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    with ShardedWal(WalOptions(root_path=wal_root, sync_mode=SyncMode.ASYNC), 4, workers=1) as wal:
        assert sum(s["next_id"] for s in wal.stats()["shards"]) == 4



def test_closing_under_busy_threads_stops_them_cleanly(wal_root):
    # Review finding: closing a process's last handle while its other threads waited on the
    # rings' semaphores closed them under the waiters (SIGSEGV in 2 of 14 runs, else a
    # ValueError from a released view). In a child process, so a crash shows as its status.
    rounds = 4
    script = (
        "import json, sys\n"
        "import _sharded_procs as P\n"
        "print(json.dumps(P.close_under_threads(sys.argv[1], int(sys.argv[2]))))\n"
    )
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([here, os.path.dirname(here)]))
    with open_wal(wal_root, 2, ring_size=1 << 12) as wal:
        try:
            out = subprocess.run([sys.executable, "-c", script, wal_root, str(rounds)], env=env,
                                 capture_output=True, timeout=CHILD_TIMEOUT)
        finally:  # a child that died with the workers stopped must not take them down too
            for pid in wal.stats()["worker_pids"]:
                os.kill(pid, signal.SIGCONT)
        assert out.returncode == 0, (out.returncode, out.stderr.decode()[-3000:])
        outcomes = json.loads(out.stdout)
        assert outcomes == {"waiters left": 0, **{f"{'sa'[i >= 4]}{i}": rounds for i in range(8)}}, outcomes
        # the WAL serves on: every shard takes appends, from this process and a new one
        for s in range(2):
            wal.append(P.key_for_shard(s, 2), b"after")
        assert wal.stats()["worker_pids"]


def test_a_call_past_its_check_when_another_thread_closes_still_reads_the_control_block(wal_root):
    # stats() has passed its closed-check when the last handle closes (here, from inside the
    # call); the control block it goes on to read must still be mapped, not a released view
    import sys

    wal = open_wal(wal_root, 2)
    wal.append(b"k", b"v")
    closed = []

    def close_inside(frame, event, _arg):
        if event == "call" and frame.f_code.co_name == "worker_pids" and not closed:
            sys.setprofile(None)
            closed.append(True)
            wal.close()

    sys.setprofile(close_inside)
    try:
        st = wal.stats()
    finally:
        sys.setprofile(None)
        wal.close()
    assert closed and st["shard_count"] == 2


def test_an_iteration_that_outlives_close_raises_wal_closed(wal_root):
    # (its next read needs a descriptor from the closed handle's cache)
    wal = open_wal(wal_root, 1, SyncMode.ASYNC, ring_size=1 << 20)
    try:
        values = [os.urandom(1000) for _ in range(1000)]  # (incompressible: 1 MB to read)
        for i in range(0, 1000, 50):
            wal.append_batch_for_key(b"k", values[i:i + 50])
            wal.sync()  # (one frame each: a worker that drains a backlog may write it as one
            # frame, which the first next() reads whole, and then nothing is left to read)
        it = wal.iter_shard(0)
        assert next(it) == values[0]
    finally:
        wal.close()
    with pytest.raises(WalClosedError):
        for _ in it:
            pass


@pytest.mark.parametrize("wait", [0.01, 0.1, 0.15])
def test_a_start_that_times_out_leaves_no_ipc_objects(wal_root, monkeypatch, wait):
    # The starter kills a coordinator that is not ready in time, wherever it had got to (a
    # start here takes about 0.25 s), then clears what it left as a start-up would
    from ironwal_mp.sharded import client

    monkeypatch.setattr(client, "START_WAIT_S", 0.0)
    try:
        ShardedWal(WalOptions(root_path=wal_root), 4, timeout=wait).close()
        pytest.skip(f"this machine started a WAL within {wait} s")
    except WorkerFailedError as exc:
        assert "did not start in time" in str(exc)
    assert Names(wal_root).leftovers() == []
    monkeypatch.undo()
    with open_wal(wal_root, 4) as wal:
        sid, seq = wal.append(b"k", b"after")
        assert wal.get(sid, seq) == b"after"


def test_open_waits_for_every_leftover_worker_of_the_root(wal_root, tmp_path):
    # A coordinator killed after starting a worker but before recording its pid leaves a
    # worker nobody listed; the next start-up must still wait for it (it may be draining into
    # the shard files). Stand-ins named like workers: of this root, and of a root that merely
    # begins with its name, which must not be waited for.
    # Ours are named three ways: as given, through a symlink, and relative to their directory.
    os.makedirs(wal_root)
    link = str(tmp_path / "link")
    os.symlink(wal_root, link)
    code = "import sys, time; print(flush=True); time.sleep(float(sys.argv[1]))"

    def stand_in(seconds, root, cwd=None):
        return subprocess.Popen([sys.executable, "-c", code, seconds, "-m", "workers", "--root", root,
                                 "--shards", "0", "--index", "0"], cwd=cwd, stdout=subprocess.PIPE)

    ours = [stand_in("2", wal_root), stand_in("2", link), stand_in("2", "wal", cwd=str(tmp_path))]
    other = stand_in("60", wal_root + "2")
    try:
        # Popen can return inside the child's exec, before /proc/<pid>/cmdline shows its
        # arguments (seen under load): wait until each stand-in runs
        for proc in ours + [other]:
            proc.stdout.readline()
        from ironwal_mp.ipc.names import processes_of

        assert sorted(pid for pid, _ in processes_of(wal_root, roles=("workers",))) == sorted(p.pid for p in ours)
        with open_wal(link, 2) as wal:
            assert all(p.poll() is not None for p in ours), "the WAL started beside a live leftover worker"
            assert other.poll() is None, "a worker of another root was waited for or killed"
            wal.append(b"k", b"v")
    finally:
        for proc in ours + [other]:
            proc.kill()
            proc.wait()
            proc.stdout.close()


def test_a_forked_child_does_not_inherit_the_parents_waits(wal_root):
    # Review finding: the child of a fork() kept the parent's count of threads inside ring waits,
    # so its close() waited CLOSE_WAIT_S per ring for threads it does not have, then left the
    # semaphores open.
    import threading

    with open_wal(wal_root, 1) as wal:
        worker = wal.stats()["worker_pids"][0]
        os.kill(worker, signal.SIGSTOP)
        try:  # a STRICT append waits while the worker is stopped
            waiter = threading.Thread(target=wal.append, args=(b"k", b"v"))
            waiter.start()
            ring = wal._rings[0]
            deadline = time.monotonic() + CHILD_TIMEOUT
            while not ring._busy and time.monotonic() < deadline:
                time.sleep(0.001)
            assert ring._busy, "the thread never waited"
            pid = os.fork()
            if pid == 0:
                os._exit(0 if not ring._busy else 1)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0, "the child inherited the parent's waits"
        finally:
            os.kill(worker, signal.SIGCONT)
        waiter.join(CHILD_TIMEOUT)
