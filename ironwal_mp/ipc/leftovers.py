"""What a run that did not shut down cleanly left of a root's IPC objects, and their clean-up.

Run by whoever holds the root's ``LOCK`` before anything new is created there: the coordinator
at start-up, and the client whose coordinator it killed for not starting in time. Rings that
still hold acknowledged records the disk lacks (or that alone remember which ids a shard handed
out) are kept for the next run's workers; every other object of the root is removed.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Dict, Iterable, Optional

import posix_ipc

from .. import errors as E
from . import control as C
from . import ring_layout as L
from .names import Names, processes_of
from .queues import Queue
from .ring import Ring, pid_alive

log = logging.getLogger("ironwal_mp.leftovers")

#: how long the clean-up waits for an earlier run's workers to finish draining before killing them
LEFTOVER_WAIT_S = 15.0


def stop_leftover_workers(root: str, wait_s: Optional[float] = None) -> None:
    """Wait for every live worker of ``root`` to exit, killing those still there after ``wait_s``.

    Every one is a leftover when the caller holds LOCK, also one whose coordinator died before
    publishing its pid: none may write beside the next run's workers.
    """
    deadline = time.monotonic() + (LEFTOVER_WAIT_S if wait_s is None else wait_s)
    for pid, _ in processes_of(root, roles=("workers",)):
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if pid_alive(pid):
            log.warning("killing leftover worker %d", pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            gone_by = time.monotonic() + 5.0
            while pid_alive(pid) and time.monotonic() < gone_by:  # (its files close as it goes)
                time.sleep(0.005)


def keep_or_drop_ring(names: Names, shard: int) -> Optional[Ring]:
    """The shard's ring if it must outlive this clean-up (closed to producers), else None.

    The ring is closed to producers still holding its mapping, under its lock (repaired if a
    dead process holds it), so nothing is published after the decision.
    """
    try:
        ring = Ring(names, shard, wake=False)
    except (posix_ipc.ExistentialError, E.WalError, ValueError):
        return None  # no (usable) ring of that shard
    h = ring.header
    ring.acquire()
    try:
        tail = ring.published()[0]
        head, _ = ring.restore_head()
        state = h[L.STATE]
        unresumable = state == L.ST_FAILED and h[L.ERRNO] == L.ERR_CANNOT_RESUME
        if state != L.ST_NEW:
            ring.set_state(L.ST_CLOSED)
    finally:
        ring.release()
    if state != L.ST_NEW and (head < tail or unresumable):
        log.warning("shard %d: keeping a ring from an earlier run (%d unwritten bytes%s)", shard,
                    tail - head, ", failed at resume" if unresumable else "")
        return ring
    ring.close()
    return None


def clear_leftovers(root: str, names: Names, shard_count: int, keep: Iterable[str] = (),
                    wait_s: Optional[float] = None) -> Dict[int, Ring]:
    """Stop an earlier run's workers and remove its IPC objects but the rings worth keeping.

    The caller holds ``root``'s LOCK. Returns the kept rings, open, by shard; ``keep`` names
    further objects to leave alone (the starting client's queue). Rings beyond ``shard_count``
    are looked at too, so that a wrong count can never remove records.
    """
    stop_leftover_workers(root, wait_s)
    old = C.ControlBlock.try_open(names)
    if old is not None:
        for _pid, token in old.clients():
            Queue.unlink_name(names.client_queue(token))
        old.close()
    kept: Dict[int, Ring] = {}
    for shard in sorted(set(range(shard_count)) | set(names.ring_shards())):
        ring = keep_or_drop_ring(names, shard)
        if ring is not None:
            kept[shard] = ring
        else:
            Ring.unlink_names(names, shard)
    spared = [r for s in kept for r in Ring.object_names(names, s)] + list(keep)
    removed = names.remove_all(keep=spared)
    if removed:
        log.info("removed %d stale IPC objects of %s", removed, names.prefix)
    return kept
