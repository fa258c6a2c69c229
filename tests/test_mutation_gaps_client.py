"""Tests written from a mutation-testing audit of ironwal_mp/sharded/client.py (the ShardedWal
client: attaching to and starting the coordinator, appends, STRICT waits, control requests,
reads, pickling and close). Each one kills a mutant of the client that the sharded tests let
survive. Shard counts and rings are small; one WAL per test."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest

from ironwal_mp import InvalidIdError, ShardedWal, SyncMode, WalClosedError, WalOptions, connect
from ironwal_mp.errors import WalLockedError
from ironwal_mp.ipc import control as C
from ironwal_mp.ipc import messages as M
from ironwal_mp.ipc.names import Names
from ironwal_mp.sharded import client


HERE = os.path.dirname(os.path.abspath(__file__))
CHILD_ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.path.dirname(HERE)]))

SERVE = """
import sys
from ironwal_mp import ShardedWal, SyncMode, WalOptions
with ShardedWal(WalOptions(root_path=sys.argv[1], sync_mode=SyncMode.STRICT), 1, workers=1, ring_size=1 << 14):
    print("ready", flush=True)
    sys.stdin.readline()
"""


@contextlib.contextmanager
def _served_by_a_child(root: str):
    """A WAL started (and, at the end, shut down) by another process: handles here attach."""
    child = subprocess.Popen([sys.executable, "-c", SERVE, root], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env=CHILD_ENV)
    try:
        assert child.stdout.readline().strip() == "ready"
        yield child
    finally:
        if child.poll() is None:
            child.stdin.write("\n")
            child.stdin.flush()
        try:
            assert child.wait(60) == 0
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()


def _reply_queues(root: str) -> list:
    return [path for path in Names(root).leftovers() if "_cli" in os.path.basename(path)]


def _open(root: str, n: int = 1, mode: SyncMode = SyncMode.STRICT, **kw) -> ShardedWal:
    return ShardedWal(WalOptions(root_path=root, sync_mode=mode), n, workers=1, ring_size=1 << 14, **kw)


# --- control requests ------------------------------------------------------------------------------


def test_a_control_request_after_the_attachment_was_released_raises_closed_and_makes_no_queue(wal_root):
    """A thread past the handle's closed-check when another thread closes it: its request is
    refused with WalClosedError before a reply queue is made or anything is sent."""
    wal = _open(wal_root)
    att = wal._att
    wal.close()
    with pytest.raises(WalClosedError):
        att.request(M.CHECKPOINT, {"id": b"late"})
    assert Names(wal_root).leftovers() == []


def test_closing_an_attached_process_detaches_it_and_removes_its_reply_queue(wal_root):
    """A process that made a control request is in the coordinator's client table and owns a
    reply queue. Releasing its last handle (it did not start the WAL, which serves on) sends
    DETACH, which takes it out of the table, and unlinks the queue, both before close() returns
    (the coordinator's reaping of dead clients would not: this process lives on)."""
    with _served_by_a_child(wal_root):
        ctl = C.ControlBlock.try_open(Names(wal_root))
        try:
            wal = connect(wal_root)
            assert _reply_queues(wal_root) == []
            wal.create_checkpoint(b"c")
            me = (os.getpid(), wal._att.token)
            assert me in ctl.clients() and len(_reply_queues(wal_root)) == 1
            wal.close()
            assert me not in ctl.clients()
            assert _reply_queues(wal_root) == []
        finally:
            ctl.close()


# --- starting the coordinator ---------------------------------------------------------------------


class _HeldLock:
    """A root LOCK that is never free (stands in for RootLock)."""

    def __init__(self, root: str, role: str) -> None:
        pass

    def acquire(self):
        raise WalLockedError("held")

    def release(self) -> None:
        raise AssertionError("a lock never taken is never released")


@pytest.mark.parametrize("holder", ["another-process", "dead-coordinator-past-the-wait"])
def test_the_clean_up_after_a_killed_start_gives_up_at_once_when_it_cannot_be_its_own(tmp_path, monkeypatch,
                                                                                       holder):
    """LOCK held in another process's name ends the pass at once (that process's start-up runs
    it), and LOCK still held in the dead coordinator's name is waited for only until
    KILLED_LOCK_WAIT_S has passed; in neither case is anything cleared."""
    dead = 4_000_000
    owner = (dead + 1, "coordinator") if holder == "another-process" else (dead, "coordinator")
    looks = []

    def lock_owner(root):
        looks.append(root)
        if len(looks) > 50:
            raise AssertionError("the clean-up kept waiting for LOCK")
        return owner

    def clear_leftovers(*args, **kwargs):
        raise AssertionError("nothing may be cleared without LOCK")

    monkeypatch.setattr(client, "RootLock", _HeldLock)
    monkeypatch.setattr(client, "lock_owner", lock_owner)
    monkeypatch.setattr(client, "clear_leftovers", clear_leftovers)
    if owner[0] == dead:
        monkeypatch.setattr(client, "KILLED_LOCK_WAIT_S", -1.0)  # (the wait is over before it starts)
    root = str(tmp_path / "wal")
    client._clear_after_killed_start(root, Names(root), [], dead)
    assert len(looks) == 1


# --- appends and reads -----------------------------------------------------------------------------


def test_append_and_read_arguments_are_converted_or_refused_with_the_clients_own_messages(wal_root):
    """The append closure turns a key that is not ``bytes`` into bytes before hashing it: a
    non-contiguous memoryview (which crc32 itself refuses) routes and appends like its bytes, and
    a str is refused with the client's own TypeError naming the key. A shard id out of range is
    refused naming the valid range."""
    with _open(wal_root, 3, SyncMode.STRICT) as wal:
        key = memoryview(b"k-e-y-")[::2]
        assert bytes(key) == b"key"
        shard, seq = wal.append(key, b"v")
        assert shard == wal.shard_for(b"key") and wal.get(shard, seq) == b"v"
        with pytest.raises(TypeError, match="^key must be bytes, not str$"):
            wal.append("key", b"v")
        with pytest.raises(InvalidIdError, match=r"shard_id 3 is out of range \(0\.\.2\)"):
            wal.get(3, 0)
