"""Pure layout and arithmetic of a shard ring (no I/O; see docs/PROTOCOL.md, "Ring").

Positions are monotonic byte counters (u64); a position's place in the data area is
``pos & (capacity - 1)``. Records sit in the ring in the on-disk batch encoding (u32 length +
bytes), so a contiguous run of published records is a frame payload as it stands. A block of
records never straddles the end of the data area: when it does not fit before the end, the
producer publishes a *wrap*, skipping to the next multiple of the capacity, and records where
that skip began (``wrap_pos``) and the id of the record after it (``wrap_seq``). A block that
ends exactly at the end of the area is recorded the same way, as a wrap that skips nothing, so
that every crossing of the end is known to the worker.
"""

from __future__ import annotations

import errno
from typing import NamedTuple, Tuple

RING_MAGIC = 0x49574D5052494E47  # "IWMPRING"
RING_VERSION = 1
HEADER_BYTES = 4096
LENGTH_PREFIX = 4

# u64 field indexes in the header. Fields are grouped by writer, one 64-byte line each.
# line 0: rarely written (at creation, and at state changes): every producer reads it on
# every append without the worker's constant stores moving the line between CPUs
MAGIC, VERSION, CAPACITY, SHARD, WORKER_IDX = 0, 1, 2, 3, 4
#: the epoch (control block EPOCH) of the coordinator under which the ring is OPEN, 0 in any
#: other state. Producers publish only while it equals the epoch they attached under, so that
#: a handle of a coordinator that died never publishes into a ring its successor reopened.
#: Written with STATE (Ring.set_state): set after STATE becomes OPEN, cleared before it leaves.
OPEN_EPOCH = 5
# line 1: producers, under the ring lock
GEN, HOLDER, SPACE_WAITERS, DUR_WAITERS = 8, 9, 10, 11
# LOCKS counts acquisitions outside the publish fast path (which bumps GEN instead); REPAIRS
# counts lock repairs. With GEN they tell a waiter whether anybody made progress.
LOCKS, REPAIRS = 12, 13
# (field 14 held a repairer's pid while repairs were serialised by a semaphore; unused since
# the repair lock became an flock, which the kernel releases when its holder dies)
# lines 2 and 3: the two publish slots (tail, next_seq, wrap_pos, wrap_seq); GEN's parity
# selects the current one, so a producer that dies mid-publish leaves the old state intact
SLOT0, SLOT1 = 16, 24
TAIL, NEXT_SEQ, WRAP_POS, WRAP_SEQ = 0, 1, 2, 3  # offsets inside a slot
# line 4: the worker (single writer)
HEAD, HEAD_SEQ, WRITTEN_SEQ, DURABLE_SEQ, WORKER_PID, STATE, SLEEPING, ERRNO = range(32, 40)
# line 5: the read view, under a single-writer seqlock (odd VIEW_VER = being written)
VIEW_VER, VIEW_SEG, VIEW_SIZE, VIEW_DURABLE = 40, 41, 42, 43
# line 6: worker statistics
FSYNCS, BYTES_WRITTEN, FRAMES, FSYNC_NS, LAST_FSYNC_NS, RESTARTS, ENTRIES = range(48, 55)
#: bumped by the worker after it deleted segments (prune): readers refresh their segment lists
PRUNES = 55
# line 7: the worker's consume position, double-buffered: WGEN's parity selects the slot
# (head, head_seq) that is true; HEAD and HEAD_SEQ above are mirrors written after it, so a
# worker killed between two stores leaves a consistent slot for its successor
WGEN, WSLOT0, WSLOT1 = 56, 57, 59
FIELDS = 64
#: a ring's next id is a u64, so its ids stay below this (the engine's last id, 2**64 - 1,
#: cannot be reached through a ring)
SEQ_LIMIT = (1 << 64) - 1
#: WRAP_POS before any wrap: a position no live range ever contains
WRAP_NONE = (1 << 64) - 1

# ring states (STATE)
ST_NEW, ST_OPEN, ST_CLOSING, ST_CLOSED, ST_FAILED = 0, 1, 2, 3, 4
#: ERRNO of a shard failed at resume because its files lost ids its ring wrote: such a ring is
#: kept across reopens (it alone remembers which ids were handed out)
ERR_CANNOT_RESUME = errno.ENOTRECOVERABLE
#: ERRNO of shards whose worker kept exiting right after starting, so the coordinator gave up
ERR_GAVE_UP = errno.ESRCH
STATE_NAMES = {ST_NEW: "new", ST_OPEN: "open", ST_CLOSING: "closing", ST_CLOSED: "closed", ST_FAILED: "failed"}


def error_errno(code: object) -> int:
    """The ERRNO an error's errno gives a failed ring: 0 (the caller picks its own code) when it
    is no positive int, or when it is ERR_CANNOT_RESUME or ERR_GAVE_UP, which mean more than the
    errno they borrow (a ring failed at resume is kept across opens)."""
    if isinstance(code, bool) or not isinstance(code, int) or code <= 0:
        return 0
    return 0 if code in (ERR_CANNOT_RESUME, ERR_GAVE_UP) else code


def slot_base(gen: int) -> int:
    return SLOT1 if gen & 1 else SLOT0


#: the largest ring (2 GiB): a run of records taken from a ring is written as one frame, whose
#: payload length is a u32 (engine/frame.py MAX_PAYLOAD, 2**32 - 1), and ring sizes are powers
#: of two
MIN_CAPACITY, MAX_CAPACITY = 4096, 1 << 31


def check_capacity(capacity: int) -> None:
    """ValueError unless ``capacity`` is a power of two in MIN_CAPACITY..MAX_CAPACITY (the one
    check of ``ring_size``: the client, the CLI and ring creation all call it)."""
    if isinstance(capacity, bool) or not isinstance(capacity, int):
        raise ValueError(f"ring capacity must be an int, not {type(capacity).__name__}")
    if not MIN_CAPACITY <= capacity <= MAX_CAPACITY or capacity & (capacity - 1):
        raise ValueError(f"ring capacity must be a power of two from {MIN_CAPACITY} to 2**31 "
                         f"({MAX_CAPACITY}), got {capacity}")


def max_block(capacity: int) -> int:
    """The largest block of encoded records one publish can carry."""
    return capacity


def wrap_end(pos: int, capacity: int) -> int:
    """The next multiple of ``capacity`` at or after ``pos`` (where a wrap skip ends)."""
    return (pos + capacity - 1) & ~(capacity - 1)


class Placement(NamedTuple):
    """Where a block of ``need`` bytes goes: ``offset`` in the data area after ``skip`` bytes
    of wrap (0 if none), or ``fits=False`` when the ring lacks the free space now."""

    fits: bool
    skip: int
    offset: int


def place(tail: int, head: int, capacity: int, need: int) -> Placement:
    """Decide where a block of ``need`` bytes is written (``need <= capacity``)."""
    off = tail & (capacity - 1)
    room_to_end = capacity - off
    free = capacity - (tail - head)
    if need <= room_to_end:
        return Placement(need <= free, 0, off)
    # wrap: skip the rest of the area, then write at offset 0
    return Placement(room_to_end + need <= free, room_to_end, 0)


class Slice(NamedTuple):
    """A run of published records the worker takes: data area [offset, offset+length)
    holding ids [first_seq, first_seq+count); afterwards head becomes ``new_head``."""

    offset: int
    length: int
    first_seq: int
    count: int
    new_head: int


def next_slice(
    head: int, head_seq: int, tail: int, next_seq: int, wrap_pos: int, wrap_seq: int, capacity: int
) -> Slice | None:
    """The next contiguous run of records between ``head`` and ``tail`` (None if empty).

    A wrap inside [head, tail) splits the pending records in two: the run before it is taken
    first; the head then jumps over the skip. A run may have no records (only a skip).
    """
    if head >= tail:
        return None
    if head <= wrap_pos < tail:
        end = wrap_end(wrap_pos, capacity)  # == wrap_pos for a wrap that skips nothing
        if not (head == wrap_pos == end):  # (such a wrap at head is already behind us)
            return Slice(head & (capacity - 1), wrap_pos - head, head_seq, wrap_seq - head_seq, end)
    return Slice(head & (capacity - 1), tail - head, head_seq, next_seq - head_seq, tail)


def resume_action(state: int, head_seq: int, next_seq: int, unwritten: bool, on_disk: int) -> Tuple[str, str]:
    """What a starting worker does with a ring, given the shard's next id on disk.

    ``"resume"``: the disk ends inside the ring's ids, so skip what it holds and write the rest.
    ``"fresh"``: a new ring, or one whose ids the disk has passed with nothing left unwritten;
    start it at ``on_disk``. ``"fail"``: resuming would give two entries one id, or drop
    acknowledged records; the second item says why (PROTOCOL.md, "Resume").
    """
    if state == ST_NEW:
        return "fresh", ""
    if head_seq <= on_disk <= next_seq:
        return "resume", ""
    if on_disk < head_seq:
        return "fail", (f"the shard's files end at id {on_disk}, but ids up to {head_seq} were written "
                        "from its ring: files were lost or replaced outside ironwal_mp (restore them; "
                        "reusing those ids would give two entries one id)")
    if unwritten:
        return "fail", (f"the ring holds unwritten ids {head_seq}..{next_seq}, but the shard's files "
                        f"already reach id {on_disk}: they were written to by something else")
    return "fresh", ""
