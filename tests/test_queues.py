"""Control-message queues (ipc/queues.py) against real POSIX queues."""

from __future__ import annotations

import os

from ironwal_mp.ipc import messages as M
from ironwal_mp.ipc.queues import Queue


def _name(tag: str) -> str:
    return f"/iwmp-test-{os.getpid()}-{tag}"


def test_a_poll_still_reads_a_queue_whose_name_was_removed():
    """A clean-up may unlink a queue's name while a process holds it open (a client waiting for
    its coordinator's start-up answer): the queue and its messages live on, so a poll must
    still deliver them rather than fail to open the name."""
    q = Queue(_name("swept"), create=True)
    try:
        q.send(M.Message(M.ERROR, 0, 7, {"type": "ConfigError", "message": "x" * 5000}))
        Queue.unlink_name(q.name)
        msg = q.receive(0)
        assert msg is not None and msg.kind == M.ERROR and msg.req_id == 7
        assert msg.body["message"] == "x" * 5000  # (several parts, all read)
        assert q.receive(0) is None
    finally:
        q.unlink()
        q.close()


def test_polls_and_timed_receives_share_one_reassembly():
    q = Queue(_name("mixed"), create=True)
    try:
        assert q.receive(0) is None
        q.send(M.Message(M.OK, 1, 2, {"a": b"y" * 3000}))
        q.send(M.Message(M.OK, 1, 3, {}))
        first = q.receive(0)
        second = q.receive(0.5)
        assert (first.req_id, second.req_id) == (2, 3) and first.body["a"] == b"y" * 3000
        assert q.receive(0.01) is None
    finally:
        q.unlink()
        q.close()


def test_a_long_start_error_of_a_worker_fits_the_unread_reply_queue(tmp_path):
    """Nobody reads P_wrep until the worker is seen dead, and the worker waits to send before
    it exits: an error over the queue's ten parts (~9.6 KB, a long path or a corruption list)
    timed out and was lost. Its strings are cut, and the start gets the error's type."""
    from ironwal_mp.errors import CorruptionError
    from ironwal_mp.ipc.names import Names
    from workers.worker import _report_start_error

    root = str(tmp_path / "wal")
    replies = Queue(Names(root).worker_replies, create=True)
    try:
        _report_start_error(root, 3, CorruptionError("/r/" + "d" * 30000, 12, "bad magic"))
        msg = replies.receive(0)
        assert msg is not None and (msg.kind, msg.sender, msg.req_id) == (M.ERROR, 3, 0)
        got = M.error_from_body(msg.body)
        assert type(got) is CorruptionError and got.offset == 12 and "bytes cut]" in str(got)
        assert replies.receive(0) is None
    finally:
        replies.unlink()
        replies.close()


def test_a_poll_never_reads_a_new_queue_that_took_the_name():
    """A queue's name may be removed and given to a new queue (a later run's) before the first
    poll of a handle opened earlier: that handle's polls must not take the new queue's messages,
    and must still deliver its own."""
    name = _name("replaced")
    old = Queue(name, create=True)
    new = None
    try:
        old.send(M.Message(M.OK, 1, 1, {}))
        new = Queue(name, create=True)  # (unlinks the old name first)
        new.send(M.Message(M.OK, 1, 2, {}))
        got = old.receive(0)
        assert got is not None and got.req_id == 1
        assert old.receive(0) is None
        got = new.receive(0)
        assert got is not None and got.req_id == 2, "the old handle's poll took the new queue's message"
    finally:
        old.close()
        if new is not None:
            new.close()
        Queue.unlink_name(name)
