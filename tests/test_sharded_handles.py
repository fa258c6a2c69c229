"""Handles at the edges: bad settings, interrupted starts, fork, GC finalizers, path spellings,
and batches that cannot be published whole (review regressions, session 7)."""

import math
import os
import signal
import subprocess
import sys
import time

import pytest

import _sharded_procs as P
from ironwal_mp import ConfigError, RecordTooLargeError, ShardedWal, SyncMode, WalOptions, WorkerFailedError
from ironwal_mp.ipc.names import Names, processes_of
from ironwal_mp.sharded import client

HERE = os.path.dirname(os.path.abspath(__file__))
CHILD_ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.path.dirname(HERE)]))


def _nothing_left(root: str) -> None:
    deadline = time.monotonic() + 30
    while processes_of(root) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_of(root) == []
    assert Names(root).leftovers() == []


@pytest.mark.parametrize("timeout", [None, "5", -1, 0, math.nan, math.inf, True])
def test_a_bad_timeout_is_refused_before_anything_starts(wal_root, timeout):
    with pytest.raises(ConfigError, match="timeout"):
        ShardedWal(WalOptions(root_path=wal_root), 2, timeout=timeout)
    _nothing_left(wal_root)


@pytest.mark.parametrize("after_receives", [0, 3])
def test_an_interrupt_while_the_coordinator_starts_kills_it(wal_root, monkeypatch, after_receives):
    # Ctrl-C while waiting for READY: the coordinator (its own session) must not run on
    # without the handle that would stop it
    receive = client.Queue.receive
    calls = []

    def interrupted(self, timeout=None):
        calls.append(1)
        if len(calls) > after_receives:
            raise KeyboardInterrupt
        return receive(self, timeout)

    monkeypatch.setattr(client.Queue, "receive", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ShardedWal(WalOptions(root_path=wal_root), 2)
    monkeypatch.undo()
    _nothing_left(wal_root)
    with ShardedWal(WalOptions(root_path=wal_root), 2) as wal:  # and it opens normally after
        assert wal.append(b"k", b"v")[1] == 0


@pytest.mark.parametrize("attached", [False, True], ids=["before-attaching", "after-attaching"])
def test_an_interrupt_right_after_ready_stops_the_coordinator(wal_root, monkeypatch, attached):
    attach = client._attach
    calls = []

    def interrupted(root, timeout):
        calls.append(1)
        if len(calls) == 2:  # the attach after READY (the first found nothing running)
            if attached:
                attach(root, timeout)  # (cached, with no handle yet)
            raise KeyboardInterrupt
        return attach(root, timeout)

    monkeypatch.setattr(client, "_attach", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ShardedWal(WalOptions(root_path=wal_root), 2)
    monkeypatch.undo()
    _nothing_left(wal_root)
    assert os.path.realpath(wal_root) not in client._attachments


def test_an_interrupt_inside_close_before_shutdown_still_stops_the_coordinator(wal_root, monkeypatch):
    """Review: Ctrl-C landing in the starter's close() before SHUTDOWN was sent left the
    coordinator and workers running for the life of the process (the handle was closed, so
    nothing else would stop them; a reopened handle attached as a non-starter)."""
    from ironwal_mp.ipc import messages as M
    from ironwal_mp.ipc import queues

    send = queues.Queue.send

    def interrupted(self, msg, *args, **kw):
        if msg.kind == M.SHUTDOWN:
            raise KeyboardInterrupt  # where a SIGINT handler can raise
        return send(self, msg, *args, **kw)

    wal = ShardedWal(WalOptions(root_path=wal_root, sync_mode=SyncMode.STRICT), 2)
    shard, seq = wal.append(b"k", b"v")
    monkeypatch.setattr(queues.Queue, "send", interrupted)
    with pytest.raises(KeyboardInterrupt):
        wal.close()
    monkeypatch.undo()
    _nothing_left(wal_root)  # stopped cleanly (SIGTERM from its starter): nothing left behind
    with ShardedWal(WalOptions(root_path=wal_root), 2) as wal:
        assert wal.get(shard, seq) == b"v"


def test_two_spellings_of_one_root_share_one_attachment(wal_root, tmp_path):
    link = str(tmp_path / "link")
    a = ShardedWal(WalOptions(root_path=wal_root), 2)
    os.symlink(wal_root, link)
    b = ShardedWal(WalOptions(root_path=link), 2)
    try:
        assert a._att is b._att
        a.close()
        shard, seq = b.append(b"k", b"still served")  # the starter's other handle is open
        b.sync()
        assert b.get(shard, seq) == b"still served"
    finally:
        a.close()
        b.close()


def test_a_root_whose_name_is_not_utf8_is_served(wal_root):
    # a Linux path is bytes: one that is not UTF-8 (os.fsdecode gives it surrogates) names
    # its IPC objects as any other root does, and a reopen finds them by the same name
    root = os.path.join(wal_root, os.fsdecode(b"not-utf8-\xff"))
    with ShardedWal(WalOptions(root_path=root, sync_mode=SyncMode.STRICT), 2) as wal:
        shard, seq = wal.append(b"k", b"v")
    with ShardedWal(WalOptions(root_path=root), 2) as wal:
        assert wal.get(shard, seq) == b"v"
    _nothing_left(root)


def test_a_forked_child_reads_though_a_parent_thread_held_the_reader_locks(wal_root):
    with ShardedWal(WalOptions(root_path=wal_root, sync_mode=SyncMode.STRICT), 2) as wal:
        shard, seq = wal.append(b"k", b"before the fork")
        assert wal.get(shard, seq) == b"before the fork"
        reader = wal._att.reader
        # as if another thread were inside a read at the moment of the fork
        with reader._lock, reader.fdcache._lock:
            pid = os.fork()
            if pid == 0:  # the child: must not wait for locks nobody will release
                code = 1
                try:
                    signal.alarm(20)
                    ok = wal.get(shard, seq) == b"before the fork" and list(wal.iter_shard(shard)) == [b"before the fork"]
                    code = 0 if ok else 2
                finally:
                    os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
        assert wal.get(shard, seq) == b"before the fork"


GC_SCRIPT = r"""
import gc, sys
from ironwal_mp import ShardedWal, WalOptions
from ironwal_mp.sharded import client

gc.disable()
root = sys.argv[1]
first = ShardedWal(WalOptions(root_path=root), 2)
first.cycle = first  # freed only by the collector
del first
attach = client._attach
collected = []

def attach_with_a_collection(root, timeout):
    collected.append(gc.collect())  # (any allocation here could trigger one)
    return attach(root, timeout)

client._attach = attach_with_a_collection
second = ShardedWal(WalOptions(root_path=root), 2)
assert collected and collected[0] > 0, collected
assert second._att.refs == 1, second._att.refs
second.append(b"k", b"v")
second.close()
print("ok")
"""


def test_a_handle_freed_by_the_collector_inside_an_open_does_not_deadlock(wal_root):
    out = subprocess.run([sys.executable, "-c", GC_SCRIPT, wal_root], env=CHILD_ENV,
                         capture_output=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == b"ok", out.stderr.decode()[-2000:]
    _nothing_left(wal_root)


def test_a_batch_part_too_large_for_its_ring_publishes_nothing(wal_root):
    with ShardedWal(WalOptions(root_path=wal_root, sync_mode=SyncMode.STRICT), 2, ring_size=4096) as wal:
        small, big = P.key_for_shard(0, 2), P.key_for_shard(1, 2)
        with pytest.raises(RecordTooLargeError):
            wal.append_batch([(small, b"small"), (big, b"x" * 5000)])
        with pytest.raises(RecordTooLargeError):  # each value fits; shard 1's part does not
            wal.append_batch([(small, b"s" * 40)] * 10 + [(big, b"b" * 40)] * 100)
        assert [s["next_id"] for s in wal.stats()["shards"]] == [0, 0]
        assert wal.append_batch([(small, b"a"), (big, b"b")]) == [(0, 0), (1, 0)]


def test_a_batch_that_fails_part_way_says_what_was_published(wal_root):
    opts = WalOptions(root_path=wal_root, sync_mode=SyncMode.ASYNC)
    with ShardedWal(opts, 2, workers=2, ring_size=4096, timeout=0.5) as wal:
        k0, k1 = P.key_for_shard(0, 2), P.key_for_shard(1, 2)
        worker1 = wal.stats()["shards"][1]["worker_pid"]
        os.kill(worker1, signal.SIGSTOP)
        try:
            with pytest.raises(WorkerFailedError):
                for _ in range(1000):  # fill shard 1's ring: its worker does not drain it
                    wal.append(k1, b"f" * 100)
            with pytest.raises(WorkerFailedError) as info:
                wal.append_batch([(k0, b"a"), (k1, b"b"), (k0, b"c")])
            assert info.value.published == [(0, 0), None, (0, 1)]
        finally:
            os.kill(worker1, signal.SIGCONT)
        wal.sync()
        assert list(wal.iter_shard(0)) == [b"a", b"c"]


def test_argument_edges(wal_root):
    class Key(bytes):
        pass

    with ShardedWal(WalOptions(root_path=wal_root, sync_mode=SyncMode.STRICT), 2) as wal:
        shard, seq = wal.append(Key(b"k"), Key(b"value"))  # a bytes subclass is bytes
        assert wal.get(shard, seq) == b"value"
        with pytest.raises(TypeError, match="pairs"):
            wal.append_batch([b"ab"])
        wal.create_checkpoint(b"c")
        assert wal.compact_checkpoints(2 ** 70).checkpoints_after == 1


def test_a_start_refused_by_lock_is_retried_though_its_message_was_lost(wal_root, monkeypatch):
    # Another process held LOCK (here: this test) and removed the notify queue in its leftover
    # pass, so the coordinator's ERROR never arrived; by the time its exit is seen, LOCK is free.
    # Its exit status says "locked": the opener waits and retries instead of failing.
    from ironwal_mp.engine.rootlock import RootLock

    os.makedirs(wal_root)
    lock = RootLock(wal_root, role="coordinator").acquire()

    def lost(self, timeout=None):
        time.sleep(timeout or 0)
        return None

    def released_meanwhile(root):
        lock.release()
        return None

    monkeypatch.setattr(client.Queue, "receive", lost)
    monkeypatch.setattr(client, "lock_owner", released_meanwhile)
    try:
        with ShardedWal(WalOptions(root_path=wal_root, sync_mode=SyncMode.STRICT), 2) as wal:
            assert wal.append(b"k", b"v")[1] == 0
    finally:
        lock.release()


SHUTDOWN_FROM_ANOTHER = """
import sys
from ironwal_mp import WalError, connect
from ironwal_mp.ipc import messages as M
wal = connect(sys.argv[1])
try:
    wal._att.request(M.SHUTDOWN, {})
except WalError as exc:
    print("refused:", exc)
wal.close()
"""


def test_only_the_starter_shuts_the_wal_down_by_request(wal_root):
    with ShardedWal(WalOptions(root_path=wal_root, sync_mode=SyncMode.ASYNC), 2, workers=1) as wal:
        coordinator = wal.stats()["coordinator_pid"]
        out = subprocess.run([sys.executable, "-c", SHUTDOWN_FROM_ANOTHER, wal_root], capture_output=True,
                             timeout=120, text=True)
        assert out.returncode == 0 and "refused: only the process that started" in out.stdout, out
        time.sleep(0.3)  # (a coordinator told to stop would be on its way out by now)
        assert wal.append(b"k", b"v") and wal.stats()["coordinator_pid"] == coordinator
        wal.sync()


def test_a_second_close_returns_only_once_the_first_has_shut_the_wal_down(wal_root):
    """Two threads close the starter's handle: the one that finds the other already closing
    used to return at once, with the coordinator, its workers and LOCK still there (an engine
    Wal or a repair opened on that return got WalLockedError). Thread A is held inside the
    shutdown until B has returned or half a second has passed."""
    from conftest import close_twice

    wal = ShardedWal(WalOptions(root_path=wal_root, sync_mode=SyncMode.ASYNC), 2, workers=1)
    wal.append(b"k", b"v")
    left_at_b = close_twice(wal, wal, "_finalizer", lambda: (processes_of(wal_root), Names(wal_root).leftovers()))
    assert left_at_b == ([], []), f"close() returned with the WAL still running: {left_at_b}"
    with pytest.raises(client.E.WalClosedError):
        wal.stats()


def test_a_closed_handle_does_not_pickle(wal_root):
    """Unpickling re-attaches: a closed handle would come back open."""
    import pickle

    with ShardedWal(WalOptions(root_path=wal_root), 1) as wal:
        pickle.loads(pickle.dumps(wal)).close()
    with pytest.raises(client.E.WalClosedError):
        pickle.dumps(wal)


def test_a_record_too_large_for_its_ring_names_the_largest_value_that_fits(wal_root):
    with ShardedWal(WalOptions(root_path=wal_root), 1, ring_size=4096) as wal:
        with pytest.raises(RecordTooLargeError, match="a single value can be at most 4092 bytes; raise ring_size"):
            wal.append(b"k", b"x" * 4093)
        assert wal.append(b"k", b"x" * 4092) == (0, 0)


def test_stats_never_show_an_id_past_the_one_it_must_not_pass(wal_root):
    """durable <= written <= next, though the worker moves all three between stats()'s reads:
    each is read no earlier than the ones below it (the reads used to go next, written,
    durable, and a busy shard showed written_id > next_id)."""
    from ironwal_mp.ipc import ring_layout as L

    with ShardedWal(WalOptions(root_path=wal_root), 1) as wal:
        ring = wal._rings[0]
        real = ring._h  # (the memory behind the ``header`` property)
        watched = {L.DURABLE_SEQ: "durable", L.WRITTEN_SEQ: "written"}
        watched.update({L.slot_base(gen) + L.NEXT_SEQ: "next" for gen in (0, 1)})

        class Moving:
            """The header as a busy worker moves it: every read of an id comes a step later."""

            def __init__(self):
                self.next = 0

            def __getitem__(self, i):
                if i not in watched:
                    return real[i]
                self.next += 3  # one step: three more published, all but one written, the last synced
                return {"next": self.next, "written": self.next - 1, "durable": self.next - 2}[watched[i]]

        ring._h = Moving()
        try:
            shard = wal.stats()["shards"][0]
        finally:
            ring._h = real
        assert shard["durable_id"] <= shard["written_id"] <= shard["next_id"], shard
