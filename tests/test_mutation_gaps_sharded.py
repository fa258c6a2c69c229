"""Tests written from a mutation-testing audit of the sharded layer: each one kills a mutant that
the ring, sharded, supervisor, manifest and shard-reader tests let survive. Pure logic where the
code allows; rings are small, made and removed here."""

from __future__ import annotations

import json
import os
import signal

import pytest

import crashfs
import ringutil
from conftest import open_files_under
from coordinator.barrier import Barrier, Phase
from coordinator.supervisor import assign_shards
from ironwal_mp import ShardedWal, SyncMode, WalOptions
from ironwal_mp.errors import ConfigError, ManifestError
from ironwal_mp.ipc import messages as M
from ironwal_mp.ipc import ring_layout as L
from ironwal_mp.ipc.names import Names
from ironwal_mp.ipc.ring import Ring
from ironwal_mp.sharded.manifest import (check_shard_count, confirm_manifest, discard_unused_manifest,
                                         open_manifest, read_manifest, recorded_shard_count)


# --- coordinator/barrier.py ----------------------------------------------------------------------


def _barrier() -> Barrier:
    """Request 7: shards 0 and 1 on worker 0 (cuts 10, 20), shard 2 on worker 1 (cut 5)."""
    return Barrier(7, [10, 20, 5], [0, 0, 1])


def test_a_durable_id_one_below_the_cut_aborts_and_one_at_it_is_enough():
    b = _barrier()
    b.on_prepared(0, 7, {0: 10, 1: 20})
    assert b.phase is Phase.PREPARING and b.waiting == {1}
    b.on_prepared(1, 7, {2: 4})
    assert b.phase is Phase.ABORTED and "below the cut 5" in b.error


def test_an_answer_that_leaves_out_one_of_its_shards_aborts():
    b = _barrier()
    b.on_prepared(0, 7, {0: 10})
    assert b.phase is Phase.ABORTED and "shard 1" in b.error


def test_answers_to_an_earlier_request_are_ignored():
    b = _barrier()
    b.on_prepared(0, 6, {0: 10, 1: 20})
    b.on_prepared(1, 6, {2: 5})
    b.on_failed(1, 6, "late failure of an aborted checkpoint")
    assert b.phase is Phase.PREPARING and b.waiting == {0, 1} and b.error is None


def test_an_answer_from_a_worker_outside_the_barrier_is_ignored():
    b = _barrier()
    b.on_prepared(9, 7, {0: 10})
    assert b.phase is Phase.PREPARING and b.waiting == {0, 1}


def test_the_death_of_a_worker_still_waited_for_aborts_and_of_one_that_answered_does_not():
    b = _barrier()
    b.on_prepared(0, 7, {0: 10, 1: 20})
    b.on_worker_died(0)
    assert b.phase is Phase.PREPARING
    b.on_worker_died(1)
    assert b.phase is Phase.ABORTED and "worker 1 died" in b.error


def test_offsets_are_the_cuts_not_the_durable_ids_reported():
    b = _barrier()
    b.on_prepared(0, 7, {0: 15, 1: 25})
    b.on_prepared(1, 7, {2: 9})
    assert b.phase is Phase.PREPARED and b.done
    assert b.offsets == [10, 20, 5]


def test_a_prepared_barrier_stays_prepared_whatever_comes_after():
    b = _barrier()
    b.on_prepared(0, 7, {0: 10, 1: 20})
    b.on_prepared(1, 7, {2: 5})
    b.on_failed(1, 7, "too late")
    b.on_worker_died(0)
    b.on_timeout()
    assert b.phase is Phase.PREPARED and b.error is None and b.offsets == [10, 20, 5]


def test_a_timeout_while_preparing_aborts_naming_who_did_not_answer():
    b = _barrier()
    b.on_prepared(0, 7, {0: 10, 1: 20})
    b.on_timeout()
    assert b.phase is Phase.ABORTED and b.done and "[1]" in b.error
    with pytest.raises(RuntimeError):
        b.offsets


# --- coordinator/supervisor.py ---------------------------------------------------------------------


@pytest.mark.parametrize("shards, workers", [(1, 1), (3, 2), (4, 2), (5, 3), (7, 7), (2, 5), (10, 4)])
def test_assign_shards_gives_every_shard_to_one_worker_in_even_contiguous_runs(shards, workers):
    runs = assign_shards(shards, workers)
    assert len(runs) == min(shards, workers)
    assert [s for run in runs for s in run] == list(range(shards))
    sizes = [len(run) for run in runs]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


# --- ironwal_mp/ipc/messages.py --------------------------------------------------------------------


def test_parts_of_two_requests_of_one_sender_may_interleave():
    """Partial messages are keyed by sender and request id: keyed by sender alone, the parts of
    a second request would be taken for the first's."""
    one = M.Message(M.CHECKPOINT, 42, 1, {"id": b"a" * 3000})
    two = M.Message(M.CHECKPOINT, 42, 2, {"id": b"b" * 3000})
    a, b = M.encode(one), M.encode(two)
    assert len(a) == len(b) > 1
    asm = M.Assembler()
    out = [m for pa, pb in zip(a, b) for m in (asm.feed(pa), asm.feed(pb)) if m is not None]
    assert out == [one, two]


# --- ironwal_mp/ipc/ring.py -------------------------------------------------------------------------


@pytest.fixture
def ring(tmp_path):
    """A 4 KiB ring open at id 1, removed (with its semaphores) at teardown."""
    names = Names(str(tmp_path))
    r = Ring(names, 0, capacity=4096, create=True)
    ringutil.open_ring(r, 1)
    yield r
    assert ringutil.dispose(names, r) == []


def test_consume_posts_space_once_for_a_waiter_and_never_past_the_count(ring):
    ring.publish(ringutil.encode([b"a", b"b"]), 2)
    ring.header[L.SPACE_WAITERS] = 1
    ring.consume(ring.next_slice())
    assert ring.space_free.value == 1  # the waiter is woken now, not at its next poll
    ring.publish(ringutil.encode([b"c"]), 1)
    ring.consume(ring.next_slice())
    assert ring.space_free.value == 1  # its post is still unclaimed: no second one


def test_durable_wakes_post_once_per_waiter_less_those_unclaimed(ring):
    ring.header[L.DUR_WAITERS] = 2
    ring.wake_durable_waiters()
    assert ring.durable_sem.value == 2
    ring.wake_durable_waiters()
    assert ring.durable_sem.value == 2


def test_a_stale_space_waiter_count_is_cleared_only_after_staying_so_for_stale_s(ring, monkeypatch):
    from ironwal_mp.ipc import ring as ring_mod

    now = [1000.0]
    monkeypatch.setattr(ring_mod.time, "monotonic", lambda: now[0])
    ring.header[L.SPACE_WAITERS] = 1  # a waiter killed while waiting; the ring is empty
    for _ in range(8):
        assert not ring.clear_stale_waiters()
        now[0] += ring_mod.STALE_S / 8 + 0.001
    assert ring.header[L.SPACE_WAITERS] == 1
    now[0] += ring_mod.STALE_S
    assert ring.clear_stale_waiters() and ring.header[L.SPACE_WAITERS] == 0


class _TornHeader:
    """A ring header as a reader saw it while a writer moved on: until the reader's second load
    of ``version`` (its re-check), the fields in ``stale`` (``version`` among them) read as
    their old values; every load after that reads the real header."""

    def __init__(self, real, version: int, stale: dict) -> None:
        self.real, self.version, self.stale = real, version, dict(stale)
        self.version_loads = 0

    def __getitem__(self, i):
        if i == self.version:
            self.version_loads += 1
            if self.version_loads == 1:
                return self.stale[i]
        elif self.version_loads < 2 and i in self.stale:
            return self.stale[i]
        return self.real[i]


def test_snapshot_rereads_when_gen_moved_while_it_read(ring):
    ring.publish(ringutil.encode([b"x"]), 1)  # GEN 1: slot 1 current, slot 0 the old state
    want = ring.snapshot()
    real = ring._h
    ring._h = _TornHeader(real, L.GEN, {L.GEN: 0})  # GEN loaded just before that publish
    try:
        assert ring.snapshot() == want
    finally:
        ring._h = real


def test_read_view_rereads_when_the_writer_moved_while_it_read(ring):
    ring.set_view(100, 200, 300)
    real = ring._h
    old_ver = real[L.VIEW_VER]
    ring.set_view(100, 999, 300)
    ring._h = _TornHeader(real, L.VIEW_VER, {L.VIEW_VER: old_ver, L.VIEW_SIZE: 200})
    try:
        assert ring.read_view() == (100, 999, 300)
    finally:
        ring._h = real


def test_reset_view_lock_evens_an_odd_version_and_leaves_an_even_one(ring):
    h = ring.header
    h[L.VIEW_VER] = 5
    ring.reset_view_lock()
    assert h[L.VIEW_VER] == 6
    ring.reset_view_lock()
    assert h[L.VIEW_VER] == 6


def test_dropping_dead_durable_waiters_never_takes_the_count_below_zero(ring):
    """Unclaimed posts can outnumber the waiters counted (a waiter that saw its id durable on
    a poll timeout leaves without taking the post made for it): dropping them must stop at 0."""
    ring.header[L.DUR_WAITERS] = 1
    ring.durable_sem.release()
    ring.durable_sem.release()
    ring._drop_dead_durable_waiters(2)
    assert ring.header[L.DUR_WAITERS] == 0


def test_taking_a_waiter_back_out_of_a_count_the_worker_reset_leaves_it_at_zero(ring):
    ring.header[L.DUR_WAITERS] = 0  # the worker cleared it as stale meanwhile
    ring.unregister_durable()
    assert ring.header[L.DUR_WAITERS] == 0


def test_a_waiter_whose_id_is_durable_on_arrival_takes_the_post_made_for_it(ring):
    """A registered waiter that finds its id durable already (exactly at it) still claims the
    post the worker made for it: left in the semaphore, it would read as a dead waiter's."""
    h = ring.header
    h[L.DUR_WAITERS] = 1  # counted by publish(strict=True)
    h[L.DURABLE_SEQ] = 5
    ring.durable_sem.release()  # the worker's wake for that waiter
    ring.wait_durable(5, registered=True)
    assert ring.durable_sem.value == 0 and h[L.DUR_WAITERS] == 0


def test_a_lock_taken_again_since_it_was_seen_stuck_is_not_repaired(ring):
    """A repair of a lock held with no pid recorded goes ahead only if nothing moved since it
    was seen: here another producer took the lock since (LOCKS moved) and is, for an instant,
    between the semaphore and its pid store. Releasing for it would let two in at once."""
    h = ring.header
    seen = ring._progress()
    ring.lock.acquire(0)
    h[L.LOCKS] += 1  # (its pid store comes next)
    try:
        assert not ring._repair_if(seen, dead=0)
        assert ring.lock.value == 0 and h[L.REPAIRS] == 0
    finally:
        ring.release()


def test_the_last_u64_id_is_refused_with_eoverflow_and_the_one_before_it_is_given(tmp_path):
    """Ids are u64 in the header: a publish may take the next id up to SEQ_LIMIT (2**64 - 1)
    and no further; past it the producer gets WalIOError(EOVERFLOW), not a ValueError from
    the header store."""
    import errno

    from ironwal_mp.errors import WalIOError

    names = Names(str(tmp_path))
    r = Ring(names, 0, capacity=4096, create=True)
    try:
        ringutil.open_ring(r, L.SEQ_LIMIT - 2)
        assert r.publish(ringutil.encode([b"a", b"b"]), 2) == L.SEQ_LIMIT - 2
        with pytest.raises(WalIOError) as info:
            r.publish(ringutil.encode([b"c"]), 1)
        assert info.value.errno == errno.EOVERFLOW and r.next_seq() == L.SEQ_LIMIT
    finally:
        assert ringutil.dispose(names, r) == []


class _InterruptAfterPublish:
    """A ring header whose first GEN store after ``arm()`` raises KeyboardInterrupt once the
    store is done: a signal handler that raised just after a publish, before the rest ran."""

    def __init__(self, real) -> None:
        self.real, self.armed = real, False

    def __getitem__(self, i):
        return self.real[i]

    def __setitem__(self, i, value):
        self.real[i] = value
        if i == L.GEN and self.armed:
            self.armed = False
            raise KeyboardInterrupt


def test_a_publish_interrupted_right_after_its_wrap_leaves_both_slots_with_the_wrap(ring):
    """_publish_wrap copies the wrap into the old slot after the GEN store; the fast path
    relies on that copy (it never writes the wrap fields). Interrupted between the two, the
    publish's own ``finally`` must restore it, or the next fast append republishes the old
    wrap and the worker reads a run past the end of the area."""
    drainer = ringutil.Drainer(ring)
    ring.publish(ringutil.encode([b"x" * 3996]), 1)  # tail at 4000 of 4096
    drainer.drain()
    real = ring._h
    ring._h = _InterruptAfterPublish(real)
    ring._h.armed = True
    try:
        with pytest.raises(KeyboardInterrupt):
            ring.publish(ringutil.encode([b"y" * 196]), 1)  # 200 bytes: wraps to offset 0
    finally:
        ring._h = real
    assert real[L.SLOT0 + L.WRAP_POS] == real[L.SLOT1 + L.WRAP_POS] == 4000
    assert real[L.SLOT0 + L.WRAP_SEQ] == real[L.SLOT1 + L.WRAP_SEQ]
    assert ring.make_appender()(b"z") == 2
    assert drainer.drain() == [(2, b"z")]


# --- workers/worker.py ----------------------------------------------------------------------------


def test_prepare_drains_the_last_id_below_the_cut_before_it_syncs():
    """The cut is the next id: every id below it, the last one too, must be written before the
    sync that makes them durable (one left in the ring aborts the checkpoint for nothing)."""
    import os

    from workers import worker as W

    w = W.Worker.__new__(W.Worker)
    st = W.ShardState.__new__(W.ShardState)
    st.shard, st.h = 0, [0] * (L.HEADER_BYTES // 8)
    st.h[L.STATE], st.h[L.WRITTEN_SEQ] = L.ST_OPEN, 4  # id 4 is published, not yet written
    w.shards, w.stopping, w.parent = {0: st}, False, os.getppid()

    def drain(state):  # the worker writes what was published: up to the cut, 5
        written = 5 - state.h[L.WRITTEN_SEQ]
        state.h[L.WRITTEN_SEQ] = 5
        return written

    def sync(states):
        for s in states:
            s.h[L.DURABLE_SEQ] = s.h[L.WRITTEN_SEQ]

    w._drain, w.sync = drain, sync
    assert w.prepare({0: 5}) == {0: 5}


# --- coordinator/coordinator.py -------------------------------------------------------------------


class _CutRing:
    """A ring that records, at each read of its next id, which rings' locks were held."""

    def __init__(self, held: set, seq: int) -> None:
        self.held, self.seq, self.seen = held, seq, []

    def acquire(self, timeout: float = 30.0) -> None:
        self.held.add(id(self))

    def release(self) -> None:
        self.held.discard(id(self))

    def next_seq_locked(self) -> int:
        self.seen.append(set(self.held))
        return self.seq

    def next_seq(self, timeout: float = 30.0) -> int:
        self.acquire()
        try:
            return self.next_seq_locked()
        finally:
            self.release()


def test_the_cut_reads_every_shard_with_all_ring_locks_held():
    """One instant for all shards: no append can land in one shard between two reads."""
    from coordinator.coordinator import Coordinator

    held: set = set()
    coord = Coordinator.__new__(Coordinator)
    coord.rings = [_CutRing(held, 10), _CutRing(held, 20), _CutRing(held, 30)]
    assert coord.cut() == [10, 20, 30]
    every = {id(r) for r in coord.rings}
    assert all(r.seen == [every] for r in coord.rings) and not held


class _Sink:
    """A worker's command queue and wake semaphore: takes what it is given."""

    def __init__(self) -> None:
        self.sent = []

    def send(self, msg) -> None:
        self.sent.append(msg)

    def release(self) -> None:
        pass


def test_a_prepared_answer_to_an_earlier_checkpoint_does_not_count_for_this_one():
    """Worker 0 answers PREPARED late to request 6 (an aborted checkpoint), then fails request
    7: this checkpoint aborts; the old answer must not have prepared it."""
    from coordinator.coordinator import Coordinator
    from ironwal_mp import errors as E
    from test_supervisor import _Replies

    class _NoneDead:
        def dead(self):
            return []

    coord = Coordinator.__new__(Coordinator)
    coord._req, coord.shard_count, coord.start_errors = 7, 1, {}
    coord.supervisor, coord.worker_queues, coord.wakes = _NoneDead(), {0: _Sink()}, {0: _Sink()}
    coord.worker_replies = _Replies([M.Message(M.PREPARED, 0, 6, {"durable": {"0": 10}}),
                                     M.Message(M.FAILED, 0, 7, {"error": "disk gone"})])
    with pytest.raises(E.CheckpointAbortedError, match="disk gone"):
        coord._finish_barrier(b"c1", Barrier(7, [10], [0]))


class _HeaderRing:
    """A ring seen only through its shard number and header."""

    def __init__(self, shard: int, state: int) -> None:
        self.shard, self.header = shard, [0] * (L.HEADER_BYTES // 8)
        self.header[L.STATE] = state


def test_a_checkpoint_with_a_failed_shard_is_refused_before_any_prepare_is_sent():
    """A failed shard's worker may be one given up on (no process, not in dead()): a PREPARE
    to it is never answered, so the checkpoint would wait PREPARE_TIMEOUT_S, and such PREPAREs
    fill its queue, after which every send stalls the coordinator for its 10 s timeout."""
    from coordinator.coordinator import Coordinator
    from ironwal_mp import errors as E

    coord = Coordinator.__new__(Coordinator)
    coord._restart_dead = lambda wait_s=0.0: []
    coord.rings = [_HeaderRing(0, L.ST_OPEN), _HeaderRing(1, L.ST_FAILED)]
    coord.worker_of, coord._req = [0, 1], 3
    coord.worker_queues, coord.wakes = {0: _Sink(), 1: _Sink()}, {0: _Sink(), 1: _Sink()}
    with pytest.raises(E.CheckpointAbortedError, match=r"shards \[1\] have failed"):
        coord._start_barrier(b"c1", [5, 5])
    assert not coord.worker_queues[0].sent and not coord.worker_queues[1].sent


class _OneCheckpoint:
    """The checkpoint log, holding one record for two shards."""

    def get(self, user_id: bytes):
        from ironwal_mp.engine.checkpoint_log import CheckpointData
        return CheckpointData(user_id, 1, 2, (5, 7))


def _prune_coordinator(states, restart_dead):
    from coordinator.coordinator import Coordinator

    coord = Coordinator.__new__(Coordinator)
    coord._restart_dead = restart_dead
    coord.rings = [_HeaderRing(s, state) for s, state in enumerate(states)]
    coord.worker_of, coord._req, coord.shard_count, coord.start_errors = [0, 1], 3, 2, {}
    coord.worker_queues, coord.wakes = {0: _Sink(), 1: _Sink()}, {0: _Sink(), 1: _Sink()}
    coord.ckpt_log = _OneCheckpoint()
    return coord


@pytest.mark.parametrize("states, down, why", [
    ((L.ST_OPEN, L.ST_FAILED), [], r"shards \[1\] have failed"),
    ((L.ST_OPEN, L.ST_OPEN), [1], r"workers \[1\] are down and being restarted; try again"),
])
def test_a_prune_that_a_worker_could_not_answer_is_refused_before_any_truncate_is_sent(states, down, why):
    """As for a checkpoint: a TRUNCATE to a worker given up on, or still backing off, would
    wait in its queue for PREPARE_TIMEOUT_S, and nothing says whether it ran."""
    from ironwal_mp import errors as E

    coord = _prune_coordinator(states, lambda wait_s=0.0: list(down))
    with pytest.raises(E.WorkerFailedError, match="nothing was pruned: " + why):
        coord.prune(b"c1")
    assert not coord.worker_queues[0].sent and not coord.worker_queues[1].sent


def test_a_prune_right_after_a_worker_died_restarts_it_first():
    """A worker killed just before a prune was not yet replaced: the TRUNCATEs go out after
    the restart (which drops what was queued for the dead one), and the prune is served."""
    from test_supervisor import _Replies

    class _NoneDead:
        restarts = [0, 0]

        def dead(self):
            return []

    order = []
    coord = _prune_coordinator((L.ST_OPEN, L.ST_OPEN), lambda wait_s=0.0: order.append("restart") or [])
    coord.supervisor = _NoneDead()
    coord.worker_replies = _Replies([M.Message(M.TRUNCATED, 0, 4, {"deleted": {"0": 1}}),
                                     M.Message(M.TRUNCATED, 1, 4, {"deleted": {"1": 2}})])
    original_send = coord.worker_queues[0].send
    coord.worker_queues[0].send = lambda msg: (order.append("send"), original_send(msg))
    assert coord.prune(b"c1") == {"shards_pruned": 2, "segments_deleted": 3}
    assert order == ["restart", "send"]
    assert coord.worker_queues[0].sent[0].body == {"offsets": {0: 5}}


class _PruneCluster:
    """Two workers for a prune, as the coordinator sees them: a supervisor, their command
    queues and the reply queue in one. A worker's process answers a TRUNCATE by deleting one
    segment per shard, unless ``deaths`` says it dies on receiving it; ``given_up`` workers are
    not restarted."""

    def __init__(self, deaths, given_up=()) -> None:
        self.deaths, self.given_up = dict(deaths), set(given_up)
        self.procs = ["alive", "alive"]
        self.restarts, self.down, self.replies, self.asked = [0, 0], set(), [], []

    def dead(self):
        return sorted(self.down)

    def exit_status(self, w):
        return "killed by SIGKILL"

    def restart_dead(self, wait_s=0.0):
        for w in sorted(self.down):
            if w in self.given_up:
                self.procs[w] = None
            else:
                self.restarts[w] += 1
        self.down.clear()
        return []

    def queue(self, w):
        cluster = self

        class _Queue:
            def send(self, msg):
                cluster.asked.append((w, msg.kind, msg.req_id))
                if cluster.deaths.get(w):
                    cluster.deaths[w] -= 1
                    cluster.down.add(w)
                else:
                    deleted = {str(s): 1 for s in msg.body["offsets"]}
                    cluster.replies.append(M.Message(M.TRUNCATED, w, msg.req_id, {"deleted": deleted}))

            def release(self):
                pass

        return _Queue()

    def receive(self, timeout):
        return self.replies.pop(0) if self.replies else None


def _pruning(cluster):
    coord = _prune_coordinator((L.ST_OPEN, L.ST_OPEN), cluster.restart_dead)
    coord.supervisor, coord.worker_replies = cluster, cluster
    coord.worker_queues = {0: cluster.queue(0), 1: cluster.queue(1)}
    return coord


@pytest.mark.parametrize("deaths", [{1: 1}, {0: 1, 1: 1}])
def test_a_worker_that_dies_during_a_prune_is_restarted_and_asked_again(deaths):
    """Truncation is idempotent and the restart drops the TRUNCATE queued for the dead process:
    its successor is asked again and the prune is served (it used to fail with "worker 1
    died"). With both dead, the second's death notice comes after the restart that replaced
    it, and is not taken for a second death."""
    cluster = _PruneCluster(deaths)
    assert _pruning(cluster).prune(b"c1") == {"shards_pruned": 2, "segments_deleted": 2}
    for w in (0, 1):
        assert [a for a in cluster.asked if a[0] == w] == [(w, M.TRUNCATE, 4)] * (1 + deaths.get(w, 0))


@pytest.mark.parametrize("deaths, given_up, asks, why", [
    ({1: 2}, (), 2, "worker 1 died again after a restart"),
    ({1: 1}, (1,), 1, r"worker 1 died and was given up on \(its shards are failed\)"),
])
def test_a_prune_whose_worker_cannot_be_asked_again_fails_naming_it(deaths, given_up, asks, why):
    from ironwal_mp import errors as E

    cluster = _PruneCluster(deaths, given_up)
    with pytest.raises(E.WorkerFailedError, match="prune failed: " + why):
        _pruning(cluster).prune(b"c1")
    assert len([a for a in cluster.asked if a[0] == 1]) == asks


# --- ironwal_mp/sharded/manifest.py ----------------------------------------------------------------


def _write_manifest(root, **fields):
    doc = {"format": "ironwal_mp.sharded", "version": 1, "shard_count": 4, "router": "crc32-v1"}
    doc.update(fields)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "MANIFEST"), "w") as fh:
        json.dump(doc, fh)


def test_a_manifest_as_docs_describe_it_is_read_and_a_new_one_is_written_so(tmp_path):
    """PROTOCOL.md §13: `version` = 1. A MANIFEST written as documented opens, and one this
    library writes says version 1 (a version bump would refuse every existing directory)."""
    old = str(tmp_path / "old")
    _write_manifest(old)
    manifest = read_manifest(old)
    assert manifest is not None and manifest.shard_count == 4 and manifest.version == 1
    new = str(tmp_path / "new")
    open_manifest(new, 3)
    with open(str(tmp_path / "new" / "MANIFEST")) as fh:
        doc = json.load(fh)
    assert doc["format"] == "ironwal_mp.sharded" and doc["version"] == 1 and doc["shard_count"] == 3


def test_shard_counts_1_and_1000_are_taken_and_only_true_ints_are():
    """PROTOCOL.md §13: shard_count is 1..1000, both ends included; a bool or a float is no
    shard count (True would pass as 1, 4.0 as 4)."""
    assert check_shard_count(1) == 1 and check_shard_count(1000) == 1000
    for bad in (0, 1001):
        with pytest.raises(ConfigError, match="shard_count"):
            check_shard_count(bad)
    for bad in (True, 4.0, "4", None):
        with pytest.raises(TypeError, match="shard_count must be an int"):
            check_shard_count(bad)


def test_a_manifest_whose_shard_count_is_a_bool_or_float_is_refused(tmp_path):
    for i, bad in enumerate((True, 4.0)):
        root = str(tmp_path / f"r{i}")
        _write_manifest(root, shard_count=bad)
        with pytest.raises(ManifestError, match="unreadable"):
            read_manifest(root)


def test_open_manifest_checks_the_shard_count_and_writes_nothing_for_a_bad_one(tmp_path):
    root = str(tmp_path / "wal")
    for bad in (0, 1001):
        for create in (True, False):
            with pytest.raises(ConfigError, match="shard_count"):
                open_manifest(root, bad, create=create)
    assert not os.path.exists(root)


def test_a_manifest_naming_an_unknown_router_is_refused(tmp_path):
    """Clients route with the router MANIFEST names: one this library does not know is a
    ManifestError when the MANIFEST is read, not a failure at the first append."""
    root = str(tmp_path / "wal")
    _write_manifest(root, router="crc64-v9")
    with pytest.raises(ManifestError, match="unknown router 'crc64-v9'"):
        read_manifest(root)


def test_a_shard_directory_numbered_the_shard_count_is_one_too_many(tmp_path):
    """PROTOCOL.md §13: a MANIFEST whose shard_count is *at most* the highest shard_NN is
    refused; shard_04 beside a count of 4 is the first such (shard_03 is the last that fits)."""
    root = str(tmp_path / "wal")
    _write_manifest(root, shard_count=4)
    os.mkdir(os.path.join(root, "shard_03"))
    assert read_manifest(root).shard_count == 4
    os.mkdir(os.path.join(root, "shard_04"))
    with pytest.raises(ManifestError, match="4 shards.*shard_04"):
        read_manifest(root)


def test_confirm_manifest_without_a_manifest_does_nothing(tmp_path):
    """(A root whose MANIFEST is gone: nothing to confirm, nothing written.)"""
    confirm_manifest(str(tmp_path))
    assert os.listdir(str(tmp_path)) == []


def test_a_discarded_manifest_stays_gone_after_a_power_loss(tmp_path):
    """discard_unused_manifest syncs the directory: a power loss after it returned must not
    bring back a MANIFEST that binds the next start to the failed start's shard count."""
    root = str(tmp_path / "wal")
    open_manifest(root, 4)
    rec = crashfs.Recorder(root)
    with rec.recording():
        assert discard_unused_manifest(root)
        rec.crash_here("returned")
    tree, data = rec.points[-1].power_loss()
    dest = crashfs.scratch(str(tmp_path), "state")
    crashfs.materialize(tree, data, dest)
    assert recorded_shard_count(dest) is None and not os.path.exists(os.path.join(dest, "MANIFEST"))


# --- ironwal_mp/sharded/reads.py -------------------------------------------------------------------


def _segment_fds(root):
    """Descriptors of this process open on segment files under ``root``."""
    return open_files_under(root, ".wal")


def test_a_get_in_the_active_segment_starts_from_its_index_not_from_the_segment_start(wal_root):
    """The reader keeps a sparse index of each shard's active segment, extended as the segment
    grows: a get in a large active segment reads from the index point before its entry, not
    gave the right entries but rescanned the segment at every get). Counted in bytes read, not
    timed."""
    written = {}

    def frame(wal):  # one frame of four incompressible 1000-byte entries
        values = [os.urandom(1000) for _ in range(4)]
        ids = wal.append_batch_for_key(b"k", values)
        written.update(zip(ids, values))
        return ids[-1]

    # (reads go in read_buffer_size chunks: a small one makes the bytes read follow the index)
    opts = WalOptions(root_path=wal_root, sync_mode=SyncMode.STRICT, read_buffer_size=4096)
    with ShardedWal(opts, 1) as wal:
        first = [frame(wal) for _ in range(16)]
        assert wal.get(*first[-1]) == written[first[-1]]  # (indexes the first 16 frames)
        second = [frame(wal) for _ in range(32)]
        assert wal.get(*second[-1]) == written[second[-1]]  # (extends the index over the next 32)
        assert os.path.getsize(os.path.join(wal_root, "shard_00", "0" * 20 + ".wal")) > 190_000
        segments = wal._att.reader.reader
        read_fn, read = segments.read_fn, []

        def counting(path):
            inner = read_fn(path)

            def counted(offset, size):
                data = inner(offset, size)
                read.append(len(data))
                return data

            return counted

        segments.read_fn = counting
        try:
            for at in (second[-1], second[len(second) // 2], first[-1]):
                read.clear()
                assert wal.get(*at) == written[at]
                assert sum(read) < 32 * 1024, (at, read)
        finally:
            del segments.read_fn


def test_close_lets_go_of_the_segment_files_it_read(wal_root):
    wal = ShardedWal(WalOptions(root_path=wal_root, sync_mode=SyncMode.STRICT), 2)
    try:
        ids = [wal.append(b"k%d" % i, b"v") for i in range(8)]
        assert all(wal.get(shard, seq) == b"v" for shard, seq in ids)
        assert _segment_fds(wal_root)  # (the reads opened them)
    finally:
        wal.close()
    assert _segment_fds(wal_root) == []


def test_a_forked_child_does_not_keep_the_parents_segment_descriptors(wal_root):
    """After a fork the child's reader starts afresh and closes the descriptors it inherited
    (O_CLOEXEC only covers an exec): a child that never reads holds no segment file open."""
    with ShardedWal(WalOptions(root_path=wal_root, sync_mode=SyncMode.STRICT), 2) as wal:
        shard, seq = wal.append(b"k", b"v")
        assert wal.get(shard, seq) == b"v" and _segment_fds(wal_root)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.alarm(20)
                code = 0 if _segment_fds(wal_root) == [] else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
        assert wal.get(shard, seq) == b"v"


def test_gets_alone_follow_the_shard_into_each_new_segment(wal_root):
    """A get (which, unlike an iteration, relists a shard's segments only when it has to) reads
    an entry in a segment the worker rotated to since the last get: the reader relists when the
    published active segment is not the last one it knows."""
    opts = WalOptions(root_path=wal_root, sync_mode=SyncMode.STRICT, max_segment_size=4096)
    with ShardedWal(opts, 1) as wal:
        written = []
        for _ in range(6):
            value = os.urandom(3000)  # (incompressible: about one segment each)
            at = wal.append(b"k", value)
            assert wal.get(*at) == value
            written.append((at, value))
        assert all(wal.get(*at) == value for at, value in written)
        assert len([n for n in os.listdir(os.path.join(wal_root, "shard_00")) if n.endswith(".wal")]) >= 3
