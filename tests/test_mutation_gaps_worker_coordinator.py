"""Tests written from a mutation-testing audit of workers/worker.py and coordinator/coordinator.py:
each one kills a mutant that the worker, supervisor, sharded and earlier mutation-gap tests let
survive. A Worker or a Coordinator is assembled by hand around stubs where the code allows;
rings are small, made and removed here."""

from __future__ import annotations

import errno
import os
import types

import pytest

import ringutil
from coordinator import coordinator as CO
from coordinator.barrier import Barrier
from coordinator.coordinator import Coordinator
from ironwal_mp import errors as E
from ironwal_mp.engine.checkpoint_log import CheckpointLog
from ironwal_mp.errors import WalError, WalIOError
from ironwal_mp.ipc import messages as M
from ironwal_mp.ipc import ring_layout as L
from ironwal_mp.ipc.names import Names
from ironwal_mp.ipc.ring import Ring
from test_mutation_gaps import _Ring, _Stream, _worker
from test_mutation_gaps_sharded import _prune_coordinator
from test_supervisor import _KeptRing, _Replies
from workers import worker as W


# --- workers/worker.py: durable marks ---------------------------------------------------------


class _WakeCountingRing(_Ring):
    def __init__(self, slices=()):
        super().__init__(slices)
        self.wakes = 0

    def wake_durable_waiters(self):
        self.wakes += 1


def test_a_sync_wakes_the_durable_waiters_of_the_shard_it_made_durable():
    """Publishing a durable id posts the shard's durable waiters: a STRICT appender sleeping
    on it must not wait out its semaphore's timeout to see its acknowledgement."""
    w = _worker(_Stream(4))
    st = w.shards[0]
    st.ring = _WakeCountingRing()
    st.h[L.WRITTEN_SEQ] = 4
    w.syncer = types.SimpleNamespace(sync=lambda streams: [None])
    w.sync([st])
    assert st.h[L.DURABLE_SEQ] == 4 and st.ring.views == [(0, 64, 4)]
    assert st.ring.wakes == 1


def test_the_first_frame_written_marks_the_shard_dirty_since_then_and_later_frames_keep_that_time():
    """``dirty_since`` is the time of the oldest written-but-not-durable frame: the flush
    interval is counted from it. Left at zero, every pass would find the interval over."""
    w = _worker(_Stream(0, first=0), slices=[L.Slice(0, 8, 0, 1, 8)])
    st = w.shards[0]
    assert w._drain(st) == 8
    first = st.dirty_since
    assert first > 0
    st.ring.slices.append(L.Slice(8, 8, 1, 1, 16))
    st.stream.first = 1
    assert w._drain(st) == 8
    assert st.dirty_since == first and st.h[L.WRITTEN_SEQ] == 2


def test_a_slice_that_ends_exactly_at_the_end_of_the_ring_is_written():
    """Only a slice running past the ring's end is a torn view; one that fills it to the last
    byte (the run before a wrap) is ordinary and must not fail the shard."""
    s = L.Slice(4096 - 16, 16, 3, 2, 0)
    w = _worker(_Stream(3, first=3), slices=[s])
    st = w.shards[0]
    assert w._drain(st) == 16
    assert st.ring.states == [] and st.ring.consumed == [s] and st.h[L.WRITTEN_SEQ] == 5


class _FailingStream(_Stream):
    def append_payload(self, payload, count, trusted=False):


        raise WalIOError("write failed", errno.ENOSPC, "/x")


def test_a_write_error_fails_the_shard_waking_its_waiters_and_leaves_the_slice_in_the_ring():
    """A frame the engine could not write fails the shard with the write's errno (a full disk
    is told as such) and wakes its durable waiters at once; the slice stays unconsumed."""

    s = L.Slice(0, 8, 0, 1, 8)
    w = _worker(_FailingStream(0), slices=[s])
    st = w.shards[0]
    st.ring = _WakeCountingRing([s])
    assert w._drain(st) == 0
    assert st.ring.states == [L.ST_FAILED] and st.h[L.ERRNO] == errno.ENOSPC
    assert st.ring.wakes == 1 and st.ring.consumed == [] and st.h[L.WRITTEN_SEQ] == 0


def test_stop_writes_what_was_published_before_it_and_syncs_it():
    """Records published before the ring closed were acknowledged (ASYNC): stop() drains them
    into the files and makes them durable before the worker exits."""
    s = L.Slice(0, 8, 5, 1, 8)
    w = _worker(_Stream(6, first=5), slices=[s])
    st = w.shards[0]
    st.h[L.WRITTEN_SEQ] = st.h[L.DURABLE_SEQ] = 5
    w.synced = []
    w.sync = lambda due: w.synced.append([(x.shard, x.h[L.WRITTEN_SEQ]) for x in due])
    w.stop()
    assert st.ring.consumed == [s] and w.synced == [[(0, 6)]]


# --- workers/worker.py: PREPARE ------------------------------------------------------------------


def _preparing(written, durable, state=L.ST_OPEN, stopping=False):
    w = _worker(_Stream(written))
    st = w.shards[0]
    st.h[L.STATE], st.h[L.WRITTEN_SEQ], st.h[L.DURABLE_SEQ] = state, written, durable
    w.stopping, w.parent = stopping, os.getppid()
    w.synced = []
    return w, st


@pytest.mark.parametrize("state, durable_after", [(L.ST_OPEN, 4), (L.ST_FAILED, 5)])
def test_prepare_refuses_a_shard_durable_below_the_cut_or_failed(state, durable_after):
    """PREPARED promises every id below the cut is durable on a live shard: a sync that left
    the durable id short, or a shard that failed (whatever id it shows), is a refusal."""
    w, st = _preparing(5, 3, state)

    def sync(states):
        for s in states:
            s.h[L.DURABLE_SEQ] = durable_after
    w.sync = sync
    with pytest.raises(WalError, match="could not be made durable up to id 5"):
        w.prepare({0: 5})


def test_prepare_gives_up_at_once_when_the_worker_is_stopping():
    """Ids below the cut that never reach the ring's head (a producer died publishing them)
    cannot be drained by a stopping worker: the prepare fails now, not only when the
    coordinator is gone and the drain deadline is over as well."""
    w, st = _preparing(3, 3, stopping=True)
    calls = []

    def drain(state):
        calls.append(1)
        if len(calls) > 50:
            raise AssertionError("prepare kept draining a stopping worker")
        return 0
    w._drain = drain
    with pytest.raises(WalError, match="never reached the ring's head"):
        w.prepare({0: 5})
    assert calls == []


def test_prepare_does_not_fsync_a_shard_already_durable_up_to_the_cut():
    """(Speed: a checkpoint of quiet shards costs no fsync.)"""
    w, st = _preparing(5, 5)
    w.sync = lambda states: w.synced.append([s.shard for s in states])
    assert w.prepare({0: 5}) == {0: 5}
    assert w.synced == []


# --- workers/worker.py: TRUNCATE ------------------------------------------------------------------


class _PruningStream(_Stream):
    def __init__(self, segments, deletes):
        super().__init__(0)
        self.segment_count, self.deletes = segments, deletes

    def truncate(self, below):
        self.segment_count -= self.deletes
        return self.deletes


@pytest.mark.parametrize("deletes, bumps", [(2, 1), (0, 0)])
def test_a_truncate_bumps_the_prune_count_only_when_segments_were_deleted(deletes, bumps):
    """Readers elsewhere drop their descriptors of a shard's files when its prune count
    moves: a prune that deleted segments must move it (or they serve deleted entries), one that
    deleted nothing must not (or every reader lists the files again for nothing)."""
    w = _worker(_PruningStream(5, deletes))
    st = w.shards[0]
    st.h[L.PRUNES] = 7
    w.replies_sent = []
    w._reply = lambda kind, req_id, body: w.replies_sent.append((kind, req_id, body))
    w._handle(M.Message(M.TRUNCATE, 0, 9, {"offsets": {"0": 100}}))
    assert w.replies_sent == [(M.TRUNCATED, 9, {"deleted": {0: deletes}})]
    assert st.h[L.PRUNES] == 7 + bumps


def _replying(stream):
    w = _worker(stream)
    w.replies_sent = []
    w._reply = lambda kind, req_id, body: w.replies_sent.append((kind, req_id, body))
    return w


class _TruncateFails(_Stream):
    segment_count = 3

    def truncate(self, below):
        raise OSError(5, "Input/output error")


def test_a_prepare_or_truncate_that_fails_is_answered_failed():
    """The coordinator waits for an answer: a PREPARE or TRUNCATE that failed is answered
    FAILED with the error, so the checkpoint aborts or the prune fails now, not after 30 s."""
    w = _replying(_TruncateFails(0))
    w.shards[0].h[L.STATE] = L.ST_FAILED
    w.parent = os.getppid()
    w._handle(M.Message(M.PREPARE, 0, 3, {"cuts": {"0": 5}}))
    w._handle(M.Message(M.TRUNCATE, 0, 4, {"offsets": {"0": 5}}))
    assert w.replies_sent == [(M.FAILED, 3, {"error": "shard 0 has failed"}),
                              (M.FAILED, 4, {"error": "[Errno 5] Input/output error"})]


# --- workers/worker.py: resume ---------------------------------------------------------------------


@pytest.fixture
def new_ring(tmp_path):
    """A 4 KiB ring as the coordinator makes it (state NEW), removed at teardown."""
    names = Names(str(tmp_path))
    r = Ring(names, 0, capacity=4096, create=True)
    r.epoch = ringutil.TEST_EPOCH
    yield r
    assert ringutil.dispose(names, r) == []


def _resuming(ring, on_disk):
    w = W.Worker.__new__(W.Worker)
    st = W.ShardState.__new__(W.ShardState)
    st.shard, st.ring, st.h, st.dirty_since = 0, ring, ring.header, 0.0
    st.stream = _Stream(on_disk)
    w.shards = {0: st}
    return w, st


def test_a_fresh_ring_resumes_at_the_disks_end_with_its_durable_id_published(new_ring):
    """A new ring starts at the shard's next id on disk, and what the files hold is durable
    and readable at once: an open that writes nothing must still show the earlier entries."""
    w, st = _resuming(new_ring, 7)
    w.resume()
    h = new_ring.header
    assert h[L.STATE] == L.ST_OPEN and h[L.RESTARTS] == 0
    assert h[L.WRITTEN_SEQ] == 7 and h[L.DURABLE_SEQ] == 7
    assert new_ring.read_view() == (0, 64, 7)
    assert new_ring.publish(ringutil.encode([b"x"]), 1) == 7


def test_a_ring_holding_records_resumes_after_what_the_disk_has_and_counts_the_restart(new_ring):
    """A worker killed after writing ids 1..2 of the 4 its ring holds: its successor skips
    those two (writing them again would give two entries one id) and writes 3 and 4."""
    ringutil.open_ring(new_ring, 1)
    assert new_ring.publish(ringutil.encode([b"a", b"b", b"c", b"d"]), 4) == 1
    w, st = _resuming(new_ring, 3)
    w.resume()
    h = new_ring.header
    assert h[L.STATE] == L.ST_OPEN and h[L.RESTARTS] == 1
    assert h[L.WRITTEN_SEQ] == 3 and h[L.DURABLE_SEQ] == 3
    s = new_ring.next_slice()
    assert (s.first_seq, s.count) == (3, 2)


# --- coordinator/coordinator.py: the barrier's abort and commit ------------------------------------


class _Sink:
    """A worker's command queue and wake semaphore: keeps what it is given, in one log."""

    def __init__(self, w: int, log: list) -> None:
        self.w, self.log = w, log

    def send(self, msg, timeout=10.0) -> None:
        self.log.append((self.w, msg.kind))

    def release(self) -> None:
        pass


def _barrier_coordinator(replies, dead=()):

    class _Sup:
        def dead(self):
            return list(dead)

    coord = Coordinator.__new__(Coordinator)
    coord._req, coord.shard_count, coord.start_errors = 7, 3, {}
    coord.worker_of = [0, 1, 2]
    coord.sent = []
    coord.supervisor = _Sup()
    coord.worker_queues = {w: _Sink(w, coord.sent) for w in range(3)}
    coord.wakes = {w: _Sink(w, []) for w in range(3)}
    coord.worker_replies = _Replies(replies)
    return coord


def test_an_aborted_checkpoint_sends_abort_to_the_workers_that_live():
    """PROTOCOL: an abort sends ABORT to the workers that live (a dead one's successor starts
    with an empty queue), and the caller gets CheckpointAbortedError."""

    coord = _barrier_coordinator([M.Message(M.FAILED, 0, 7, {"error": "disk gone"})], dead=[2])
    with pytest.raises(E.CheckpointAbortedError, match="disk gone"):
        coord._finish_barrier(b"c1", Barrier(7, [10, 20, 30], [0, 1, 2]))
    assert sorted(coord.sent) == [(0, M.ABORT), (1, M.ABORT)]


def test_a_worker_that_dies_while_preparing_aborts_the_checkpoint_at_once(monkeypatch):
    """A dead worker never answers: its death aborts the checkpoint, naming it, rather than
    the prepare timeout (shortened here, so that waiting it out shows as the wrong error)."""

    monkeypatch.setattr(CO, "PREPARE_TIMEOUT_S", 0.2)
    coord = _barrier_coordinator([], dead=[1])
    coord.supervisor.exit_status = lambda w: "killed by SIGKILL"
    with pytest.raises(E.CheckpointAbortedError, match=r"worker 1 died \(killed by SIGKILL\) during the checkpoint"):
        coord._finish_barrier(b"c1", Barrier(7, [10, 20, 30], [0, 1, 2]))


def test_a_committed_checkpoint_is_answered_first_then_told_to_every_worker():
    """PROTOCOL: the coordinator answers the caller, and only after that sends COMMIT (to
    each worker once)."""

    coord = Coordinator.__new__(Coordinator)
    coord.sent, coord.clients = [], {5: 1234}
    coord.worker_of = [0, 0, 1]
    coord.worker_queues = {w: _Sink(w, coord.sent) for w in range(2)}
    coord.wakes = {w: _Sink(w, []) for w in range(2)}
    coord._req = 0
    coord.checkpoint = lambda raw: {"id": raw, "timestamp": 1, "offsets": [1, 2, 3]}
    coord._reply = lambda msg, kind, body: coord.sent.append(("caller", kind))
    coord._handle(M.Message(M.CHECKPOINT, 0, 3, {"reply": 5, "pid": 1234, "id": b"c1"}))
    assert coord.sent[0] == ("caller", M.OK)
    assert sorted(coord.sent[1:]) == [(0, M.COMMIT), (1, M.COMMIT)]


class _FailingLog:
    """The checkpoint log, failing to write HEAD's replacement."""

    def __contains__(self, user_id):
        return False

    def prepare_head(self, user_id):
        raise OSError(5, "Input/output error")


@pytest.mark.parametrize("fails", ["barrier", "prepare-head"])
def test_a_checkpoint_that_fails_ends_its_prepares_and_its_prepared_head(tmp_path, fails):
    """A barrier that aborts leaves HEAD's prepared replacement behind unless the coordinator
    discards it: the log allows one at a time, so every later checkpoint would fail. A failure
    to prepare HEAD comes before the barrier is awaited: its PREPAREs get an ABORT there."""

    coord = _barrier_coordinator([M.Message(M.FAILED, 1, 8, {"error": "disk gone"})])
    coord.rings = [types.SimpleNamespace(header={L.STATE: L.ST_OPEN}, shard=s) for s in range(3)]
    coord._restart_dead = lambda wait_s=0.0: []
    coord.cut = lambda: [10, 20, 30]
    if fails == "barrier":
        os.mkdir(tmp_path / "wal")
        coord.ckpt_log = CheckpointLog(str(tmp_path / "wal"))
        with pytest.raises(E.CheckpointAbortedError, match="disk gone"):
            coord.checkpoint(b"c1")
        coord.ckpt_log.discard_head(coord.ckpt_log.prepare_head(b"c2"))  # (not refused as outstanding)
        assert not os.path.exists(tmp_path / "wal" / "HEAD.tmp")
    else:
        coord.ckpt_log = _FailingLog()
        with pytest.raises(OSError):
            coord.checkpoint(b"c1")
    kinds = sorted(coord.sent)
    assert kinds == sorted([(w, M.PREPARE) for w in range(3)] + [(w, M.ABORT) for w in range(3)])


# --- coordinator/coordinator.py: prune answers ---------------------------------------------------


def _pruning_with(replies, monkeypatch):

    class _NoneDead:
        restarts = [0, 0]
        procs = ["alive", "alive"]

        def dead(self):
            return []

    monkeypatch.setattr(CO, "PREPARE_TIMEOUT_S", 0.2)  # (a prune left waiting ends soon, as not answered)
    coord = _prune_coordinator((L.ST_OPEN, L.ST_OPEN), lambda wait_s=0.0: [])
    coord.supervisor, coord.worker_replies = _NoneDead(), _Replies(replies)
    return coord


def test_answers_to_an_earlier_prune_do_not_count_for_this_one(monkeypatch):
    """A late TRUNCATED or FAILED of an earlier prune (request 2) from a worker this one waits
    for neither answers nor fails it: only request 4's answers do."""
    coord = _pruning_with([M.Message(M.TRUNCATED, 0, 2, {"deleted": {"0": 9}}),
                           M.Message(M.FAILED, 1, 2, {"error": "old trouble"}),
                           M.Message(M.TRUNCATED, 0, 4, {"deleted": {"0": 1}}),
                           M.Message(M.TRUNCATED, 1, 4, {"deleted": {"1": 2}})], monkeypatch)
    assert coord.prune(b"c1") == {"shards_pruned": 2, "segments_deleted": 3}


def test_a_worker_that_answers_its_truncate_failed_fails_the_prune_with_its_error(monkeypatch):

    coord = _pruning_with([M.Message(M.TRUNCATED, 0, 4, {"deleted": {"0": 1}}),
                           M.Message(M.FAILED, 1, 4, {"error": "disk gone"})], monkeypatch)
    with pytest.raises(E.WorkerFailedError, match="^prune failed: disk gone$"):
        coord.prune(b"c1")


# --- coordinator/coordinator.py: restarts -----------------------------------------------------------


class _RestartingSupervisor:
    """Worker 0 dead and due for a restart; the order of what is done is logged."""

    def __init__(self, log: list, dead=(0,)) -> None:
        self.log, self.down = log, list(dead)
        self.procs = ["proc"]

    def dead(self):
        return list(self.down)

    def due(self, w):
        return True

    def gave_up(self, w):
        return False

    def restart(self, w):
        self.log.append(("restart", w))
        self.down.remove(w)

    def pids(self):
        return [4321]


class _Commands:
    """A dead worker's command queue, still holding requests for it."""

    def __init__(self, log: list, held) -> None:
        self.log, self.held = log, list(held)

    def receive(self, timeout):
        msg = self.held.pop(0) if self.held else None
        if msg is not None:
            self.log.append(("dropped", msg.kind))
        return msg


def _restarting_coordinator(dead=(0,), held=()):

    coord = Coordinator.__new__(Coordinator)
    coord.log = []
    coord.stopping, coord.start_errors = False, {}
    coord.supervisor = _RestartingSupervisor(coord.log, dead)
    coord.worker_queues = [_Commands(coord.log, held)]
    coord.worker_replies = _Replies([])
    coord.ctl = types.SimpleNamespace(f={})
    return coord


def test_a_dead_workers_queued_requests_are_dropped_before_its_successor_starts():
    """The requests queued for a dead worker were answered on its behalf (a checkpoint
    aborted, a prune failed): its successor must not carry them out afterwards."""
    held = [M.Message(M.TRUNCATE, 0, 4, {"offsets": {"0": 9}}), M.Message(M.PREPARE, 0, 5, {"cuts": {"0": 3}})]
    coord = _restarting_coordinator(held=held)
    assert coord._restart_dead() == []
    assert coord.log == [("dropped", M.TRUNCATE), ("dropped", M.PREPARE), ("restart", 0)]


def test_restart_dead_with_nobody_down_returns_without_waiting(monkeypatch):
    """A checkpoint or prune first restarts dead workers, waiting up to the longest back-off
    for those backing off; with nobody down it must not wait at all."""

    def no_sleep(seconds):
        raise AssertionError(f"slept {seconds} s with no worker down")

    monkeypatch.setattr(CO.time, "sleep", no_sleep)
    coord = _restarting_coordinator(dead=())
    assert coord._restart_dead(wait_s=CO.MAX_BACKOFF_S + 0.1) == []
    coord = _restarting_coordinator(dead=(0,))
    assert coord._restart_dead(wait_s=CO.MAX_BACKOFF_S + 0.1) == []
    assert coord.log == [("restart", 0)]


# --- coordinator/coordinator.py: start-up ------------------------------------------------------------


def test_a_ring_kept_beyond_the_shard_count_is_not_waited_for():
    """A ring kept from an open with more shards (numbered shard_count or above) is no
    worker's: waiting for its records to be durable would hold the start for KEPT_WAIT_S."""

    coord = Coordinator.__new__(Coordinator)
    coord.shard_count = 1
    coord.supervisor = types.SimpleNamespace(dead=lambda: [], procs={})
    mine, beyond = _KeptRing(0, L.ST_OPEN, None), _KeptRing(1, L.ST_OPEN, None)
    coord.kept = {0: mine, 1: beyond}
    coord._wait_kept_durable()
    assert mine.waited and not beyond.waited


# --- coordinator/coordinator.py: shut-down -------------------------------------------------------------


class _ClosingRing:
    """A drained ring at shut-down, in the given state and errno."""

    def __init__(self, shard: int, state: int, err: int) -> None:
        self.shard, self.header, self.states = shard, {L.STATE: state, L.ERRNO: err}, []

    def acquire(self, timeout=30.0):
        pass

    def release(self):
        pass

    def set_state(self, state):
        self.states.append(state)

    def published(self):
        return (64, 9, 0, 0)

    def restore_head(self):
        return (64, 9)

    def wake_durable_waiters(self):
        pass


def test_shutdown_keeps_only_the_rings_of_shards_that_could_not_resume():
    """A drained ring is removed at shut-down, also that of a shard failed by a disk error;
    only one whose worker refused to resume it (ERR_CANNOT_RESUME) is kept: it alone remembers
    which ids were handed out."""


    coord = Coordinator.__new__(Coordinator)
    coord.lock = types.SimpleNamespace(held=True, release=lambda: None)
    coord.ctl = types.SimpleNamespace(f={})
    coord.supervisor, coord.kept = None, {}
    coord.rings = [_ClosingRing(0, L.ST_OPEN, 0), _ClosingRing(1, L.ST_FAILED, errno.EIO),
                   _ClosingRing(2, L.ST_FAILED, L.ERR_CANNOT_RESUME)]
    coord._remove_ipc = lambda: None
    coord._new_manifest = False
    coord.shutdown()
    assert sorted(coord.kept) == [2]
    assert [r.states for r in coord.rings] == [[L.ST_CLOSED], [], []]
