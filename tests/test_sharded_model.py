"""A stateful model test of ShardedWal: random operation sequences against an in-memory model.

The model holds every shard's values (index = id), the first id still kept on each shard
(pruning moves it), and the checkpoint log (id -> CheckpointData, in log order). Processes are
also killed with SIGKILL: one worker (restarted by the coordinator), or every process of the
WAL at once (reopened). Neither may change the model, in any sync mode: an acknowledged record
is in a segment file or in a ring the next run keeps and writes. Each example
runs one WAL in a fresh temporary directory and checks in teardown that no process and no IPC
object is left behind (the ``wal_root`` fixture cannot serve hypothesis examples, which share
one test function call).

Starting a WAL costs a few hundred milliseconds (a coordinator and its workers are fresh
interpreters), so examples are few and short.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
import zlib

import pytest
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import _sharded_procs as P
from ironwal_mp import (
    CheckpointAbortedError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CompressionType,
    NoCheckpointsError,
    ShardedWal,
    SyncMode,
    WalOptions,
)
from ironwal_mp.engine import layout
from ironwal_mp.ipc.names import Names

IDS = [b"a", b"b", b"c", b"d", b"e", b"f"]
keys = st.binary(max_size=6)
values = st.binary(max_size=48)


class ShardedWalModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = None
        self.root = None
        self.wal = None

    # --- set-up ---------------------------------------------------------------------------------

    @initialize(
        n=st.integers(2, 4),
        mode=st.sampled_from([SyncMode.STRICT, SyncMode.BATCH_ONLY, SyncMode.ASYNC]),
        workers=st.integers(1, 2),
    )
    def start(self, n, mode, workers):
        self.dir = tempfile.mkdtemp(prefix="ironwal-model-")
        self.root = os.path.join(self.dir, "wal")
        self.n = n
        self.mode = mode
        self.workers = workers
        # tiny segments: almost every frame starts a new one, so pruning has work to do
        self.opts = WalOptions(
            root_path=self.root, sync_mode=mode, max_segment_size=96, compression=CompressionType.NONE
        )
        self.wal = self._open()
        self.shards = [[] for _ in range(n)]
        self.first = [0] * n
        self.ckpts = {}  # id -> CheckpointData, in log order

    def _open(self) -> ShardedWal:
        self.worker_kills = 0  # (a new coordinator, a new supervisor)
        return ShardedWal(self.opts, self.n, workers=self.workers, ring_size=1 << 12)

    def teardown(self):
        try:
            if self.wal is not None:
                self.wal.close()
        finally:
            if self.root is not None:
                procs, leftovers = P.cleanup_root(self.root)
                shutil.rmtree(self.dir, ignore_errors=True)
                assert not procs, f"processes left running: {procs}"
                assert not leftovers, f"IPC objects left behind: {leftovers}"

    # --- appends ----------------------------------------------------------------------------------

    def _take(self, acks, pairs):
        assert len(acks) == len(pairs)
        for (shard, seq), (key, value) in zip(acks, pairs):
            assert shard == zlib.crc32(key) % self.n
            assert seq == len(self.shards[shard]), "ids per shard are contiguous"
            self.shards[shard].append(value)

    @rule(key=keys, value=values)
    def append(self, key, value):
        self._take([self.wal.append(key, value)], [(key, value)])

    @rule(items=st.lists(st.tuples(keys, values), max_size=8))
    def append_batch(self, items):
        self._take(self.wal.append_batch(items), items)

    @rule(count=st.integers(1, 40), size=st.integers(0, 60), every=st.integers(1, 10))
    def append_many(self, count, size, every):
        """Many appends, synced every few so that they make several frames (and segments)."""
        for i in range(count):
            key, value = b"m%d" % i, bytes([i % 256]) * size
            self._take([self.wal.append(key, value)], [(key, value)])
            if i % every == every - 1:
                self.wal.sync()

    @rule(key=keys, vals=st.lists(values, max_size=6))
    def append_batch_for_key(self, key, vals):
        acks = self.wal.append_batch_for_key(key, vals)
        if vals:
            assert len({s for s, _ in acks}) == 1
        self._take(acks, [(key, v) for v in vals])

    # --- checkpoints ------------------------------------------------------------------------------

    @rule(cid=st.sampled_from(IDS))
    def create_checkpoint(self, cid):
        if cid in self.ckpts:
            with pytest.raises(CheckpointExistsError):
                self.wal.create_checkpoint(cid)
            event("checkpoint id reused")
            return
        data = self.wal.create_checkpoint(cid)
        # one process appends: the cut is exactly what it was acknowledged
        assert data.offsets == tuple(len(v) for v in self.shards)
        assert data.user_id == cid and data.shard_count == self.n
        self.ckpts[cid] = data
        if self.mode is SyncMode.ASYNC:  # durable when the call returns
            for s in range(self.n):
                got = list(self.wal.iter_shard(s, self.first[s]))
                assert got[: data.offsets[s] - self.first[s]] == self.shards[s][self.first[s] : data.offsets[s]]

    @precondition(lambda self: self.ckpts)
    @rule(data=st.data())
    def prune(self, data):
        self._prune(data.draw(st.sampled_from(list(self.ckpts) + [b"unknown"]), label="cid"))

    def _prune(self, cid):
        if cid not in self.ckpts:
            with pytest.raises(CheckpointNotFoundError):
                self.wal.prune_before_checkpoint(cid)
            return
        self.wal.sync()  # nothing in flight: no segment appears while we look
        before = [self._segments(s) for s in range(self.n)]
        stats = self.wal.prune_before_checkpoint(cid)
        after = [self._segments(s) for s in range(self.n)]
        offsets = self.ckpts[cid].offsets
        deleted = 0
        for s in range(self.n):
            if not before[s]:
                assert after[s] == [] and offsets[s] == 0
                continue
            below = [x for x in before[s] if x <= offsets[s]]
            expect_first = max(below) if below else before[s][0]
            assert after[s] == [x for x in before[s] if x >= expect_first], (s, offsets[s], before[s], after[s])
            deleted += len(before[s]) - len(after[s])
            assert expect_first >= self.first[s]
            self.first[s] = expect_first
        assert stats.segments_deleted == deleted
        event("prune deleted segments" if deleted else "prune deleted nothing")
        assert stats.shards_pruned == sum(1 for s in range(self.n) if len(before[s]) != len(after[s]))

    @precondition(lambda self: len(self.ckpts) < len(IDS))
    @rule()
    def checkpoint_then_prune(self):
        """The usual pairing: take a checkpoint, then drop what it no longer needs."""
        cid = next(c for c in IDS if c not in self.ckpts)
        self.create_checkpoint(cid)
        self._prune(cid)

    def _segments(self, s):
        try:
            return layout.list_segments(os.path.join(self.root, f"shard_{s:02d}"))
        except FileNotFoundError:  # a shard's stream directory appears with its first entry
            return []

    @rule(keep=st.integers(1, 4))
    def compact(self, keep):
        stats = self.wal.compact_checkpoints(keep)
        assert stats.checkpoints_before == len(self.ckpts)
        kept = list(self.ckpts)[-keep:] if self.ckpts else []
        assert stats.checkpoints_after == len(kept)
        assert stats.bytes_reclaimed >= 0
        self.ckpts = {cid: self.ckpts[cid] for cid in kept}

    # --- reads -----------------------------------------------------------------------------------

    @rule()
    def sync_and_compare(self):
        self.wal.sync()
        for s in range(self.n):
            assert list(self.wal.iter_shard(s, 0)) == self.shards[s][self.first[s] :]
            st_ = self.wal.stats()["shards"][s]
            assert st_["next_id"] == st_["durable_id"] == len(self.shards[s])

    @rule(s=st.integers(0, 3), seq=st.integers(0, 60), start=st.integers(0, 60))
    def get_and_iter(self, s, seq, start):
        s %= self.n
        self.wal.sync()
        model = self.shards[s]
        expect = model[seq] if self.first[s] <= seq < len(model) else None
        assert self.wal.get(s, seq) == expect
        assert list(self.wal.iter_shard(s, start)) == model[max(start, self.first[s]) :]

    # at most two per run: a worker killed again and again within seconds of its start is a
    # crash loop, whose shards the coordinator fails after a few rounds (test_supervisor.py)
    @precondition(lambda self: self.worker_kills < 2)
    @rule(data=st.data())
    def kill_a_worker(self, data):
        """SIGKILL one worker: the coordinator restarts it and it resumes from its rings.

        A checkpoint asked for at once is taken once the worker is back, or aborts (it died
        under its PREPARE): then nothing is recorded, and the same id succeeds after the
        restart. (Either way the model ends the same: hypothesis needs the steps that follow
        to be chosen the same when it replays this one.)"""
        pids = self.wal.stats()["worker_pids"]
        pid = pids[data.draw(st.integers(0, 1), label="worker") % len(pids)]
        at_once = data.draw(st.booleans(), label="checkpoint at once")
        os.kill(pid, signal.SIGKILL)
        self.worker_kills += 1
        event("killed a worker")
        free = [c for c in IDS if c not in self.ckpts]
        aborted = None
        if free and at_once:
            try:
                self.create_checkpoint(free[0])
                event("checkpoint right after a worker kill: committed")
            except CheckpointAbortedError:
                event("checkpoint right after a worker kill: aborted")
                assert free[0] not in [cid for cid, _ in self.wal.list_checkpoints()]
                aborted = free[0]
        deadline = time.monotonic() + 60
        while True:  # (the invariants' reads do not need the worker; the next rule may)
            pids = self.wal.stats()["worker_pids"]
            if pid not in pids and all(P.alive(p) for p in pids):
                break
            assert time.monotonic() < deadline, f"worker {pid} was not replaced: {pids}"
            time.sleep(0.02)
        if aborted is not None:
            self.create_checkpoint(aborted)

    @rule()
    def kill_everything_and_reopen(self):
        """SIGKILL the coordinator and every worker, then open again: nothing acknowledged is
        lost or written twice (ASYNC records still in a ring are written by the next run)."""
        stats = self.wal.stats()
        for pid in [stats["coordinator_pid"], *stats["worker_pids"]]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # (a worker the coordinator was restarting)
                pass
        assert P.wait_gone(self.root) == [], "killed processes still running"
        self.wal.close()  # the dead run's handle only detaches
        self.wal = None
        self.wal = self._open()
        event("killed everything")
        self.wal.sync()
        for s in range(self.n):
            assert list(self.wal.iter_shard(s, 0)) == self.shards[s][self.first[s] :]

    @rule()
    def close_and_reopen(self):
        self.wal.close()
        assert P.processes_mentioning(self.root) == [], "close() of the starter stops every process"
        assert Names(self.root).leftovers() == []
        self.wal = None
        self.wal = self._open()
        event("reopened")
        for s in range(self.n):  # close drained everything, in every sync mode
            assert list(self.wal.iter_shard(s, 0)) == self.shards[s][self.first[s] :]

    # --- invariants ---------------------------------------------------------------------------

    @invariant()
    def checkpoint_log_matches(self):
        if self.wal is None:
            return
        assert self.wal.list_checkpoints() == [(cid, d.timestamp) for cid, d in self.ckpts.items()]
        assert self.wal.checkpoint_count == len(self.ckpts)
        if self.ckpts:
            last = list(self.ckpts)[-1]
            assert self.wal.load_latest_checkpoint() == (last, self.ckpts[last])
            for cid, data in self.ckpts.items():
                assert self.wal.load_checkpoint(cid) == data
        else:
            with pytest.raises(NoCheckpointsError):
                self.wal.load_latest_checkpoint()
        for cid in IDS:
            if cid not in self.ckpts:
                with pytest.raises(CheckpointNotFoundError):
                    self.wal.load_checkpoint(cid)

    @invariant()
    def durable_prefix(self):
        """What is readable is always a prefix of the model (all of it, in STRICT)."""
        if self.wal is None:
            return
        for s in range(self.n):
            got = list(self.wal.iter_shard(s, 0))
            want = self.shards[s][self.first[s] :]
            assert got == want[: len(got)]
            if self.mode is SyncMode.STRICT:
                assert len(got) == len(want)


ShardedWalModel.TestCase.settings = settings(
    max_examples=int(os.environ.get("IRONWAL_MODEL_EXAMPLES", "10")),
    stateful_step_count=15,
    deadline=None,
    # no shrinking: every step starts or talks to processes, and shrinking a 15-step failure
    # takes many minutes; the failing sequence is printed as it was found
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestShardedWalModel = ShardedWalModel.TestCase
