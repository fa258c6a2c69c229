"""The worker's flush policy (idle flush, flush interval, failed shards), without processes.

A Worker is assembled by hand around stub rings and a stub wake semaphore, so that what its
idle step waits for and what it fsyncs can be observed directly.
"""

from __future__ import annotations

import time

import posix_ipc
import pytest

from ironwal_mp.ipc import ring_layout as L
from workers import worker as W


class StubRing:
    def __init__(self, events: list) -> None:
        self.events = events

    def next_slice(self):
        self.events.append("check")
        return None


class StubWake:
    """A counting semaphore that logs what is done to it."""

    def __init__(self, posted: bool, events: list) -> None:
        self.count = 1 if posted else 0
        self.waits: list = []
        self.events = events

    def release(self):
        self.events.append("post")
        self.count += 1

    def acquire(self, timeout):
        self.events.append(f"wait {timeout}")
        self.waits.append(timeout)
        if not self.count:
            raise posix_ipc.BusyError("timed out")
        self.count -= 1


def make_worker(states, *, idle_flush=True, flush_interval=0.1, posted=False):
    w = W.Worker.__new__(W.Worker)
    w.shards = {}
    w.events = []
    for i, (written, durable, state, dirty_age) in enumerate(states):
        st = W.ShardState.__new__(W.ShardState)
        st.shard, st.ring = i, StubRing(w.events)
        st.h = [0] * (L.HEADER_BYTES // 8)
        st.h[L.WRITTEN_SEQ], st.h[L.DURABLE_SEQ], st.h[L.STATE] = written, durable, state
        st.dirty_since = time.monotonic() - dirty_age if written > durable else 0.0
        w.shards[i] = st
    w.idle_flush = idle_flush
    w.flush_interval = flush_interval
    w.wake = StubWake(posted, w.events)
    w.synced = []
    w.sync = lambda due: w.synced.append(sorted(st.shard for st in due))
    return w


def test_idle_flush_syncs_every_dirty_shard_once_the_rings_are_quiet():
    w = make_worker([(5, 3, L.ST_OPEN, 0.0), (2, 2, L.ST_OPEN, 0.0), (9, 1, L.ST_OPEN, 0.0)])
    w._sleep()
    assert w.wake.waits == [0, W.IDLE_FLUSH_S]  # (0: the fence's try-wait)
    assert w.synced == [[0, 2]]
    assert all(st.h[L.SLEEPING] == 0 for st in w.shards.values())


def test_sleep_fences_between_raising_the_flag_and_checking_the_rings():
    """A post and a try-wait (each a locked instruction) come before the rings are re-checked,
    and the try-wait takes back the worker's own post."""
    w = make_worker([(5, 3, L.ST_OPEN, 0.0), (1, 1, L.ST_OPEN, 0.0)])
    w._sleep()
    assert w.events == ["post", "wait 0", "check", "check", f"wait {W.IDLE_FLUSH_S}"]
    assert w.wake.count == 0


def test_idle_flush_waits_out_a_post():
    w = make_worker([(5, 3, L.ST_OPEN, 0.0)], posted=True)
    w._sleep()
    assert w.wake.waits == [0, W.IDLE_FLUSH_S]  # (0: the fence's try-wait)
    assert w.synced == []  # something was published or a command came: the next pass decides


def test_a_failed_dirty_shard_is_not_dirty_for_the_idle_step():
    # it is never synced again: counting it would wake the worker every IDLE_FLUSH_S for nothing
    w = make_worker([(5, 3, L.ST_FAILED, 10.0), (4, 4, L.ST_OPEN, 0.0)])
    w._sleep()
    assert w.wake.waits == [0, W.IDLE_WAIT_S]
    assert w.synced == []


@pytest.mark.parametrize("age, synced", [(0.0, []), (0.2, [[0]])])
def test_without_idle_flush_the_interval_decides(age, synced):
    w = make_worker([(5, 3, L.ST_OPEN, age)], idle_flush=False, flush_interval=0.1)
    w._sleep()
    _, wait = w.wake.waits
    assert wait <= 0.1 and (wait == 0.0) == (age >= 0.1)  # never sleeps past the interval
    assert w.synced == synced


@pytest.mark.parametrize("interval, age, waiters, synced", [
    (0.1, 0.05, 0, []),        # written recently, nobody waits
    (0.1, 0.15, 0, [[0]]),     # older than the interval
    (3600, 0.15, 0, []),       # a long interval is honoured
    (3600, 0.0, 1, [[0]]),     # a durable waiter needs it now
])
def test_sync_if_needed_uses_the_configured_interval(interval, age, waiters, synced):
    w = make_worker([(5, 3, L.ST_OPEN, age)], flush_interval=interval)
    w.shards[0].h[L.DUR_WAITERS] = waiters
    w._sync_if_needed()
    assert w.synced == synced


def test_a_reply_the_coordinator_never_takes_is_dropped_and_serving_goes_on():
    from ironwal_mp.errors import WalClosedError
    from ironwal_mp.ipc import messages as M

    class FullQueue:
        def send(self, msg, timeout=10.0, alive=None):
            raise WalClosedError("control queue /x stayed full for 10s")

    w = make_worker([(5, 5, L.ST_OPEN, 0.0)])
    w.replies, w.index = FullQueue(), 0
    w._reply(M.PREPARED, 7, {"durable": {}})  # no exception escapes into the worker's loop
