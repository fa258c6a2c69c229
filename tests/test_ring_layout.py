"""The ring's pure arithmetic (ring_layout): place(), next_slice(), wrap_end(), on plain ints.

A model producer and worker share a bytearray as the data area and use nothing but the layout
functions, the way ipc/ring.py does: the producer asks place() where a block goes (publishing a
wrap on its own when the block does not fit before the end, then retrying; a block that ends
exactly at the end of the area is recorded as a wrap that skips nothing, per the module's
docstring); the worker takes next_slice() runs and parses them. No shared memory here.
"""

from __future__ import annotations

import struct
from collections import deque

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from ironwal_mp.ipc import ring_layout as L

CAP = 4096
_LEN = struct.Struct("<I")


def payload(tag: int, size: int) -> bytes:
    unit = tag.to_bytes(8, "little")
    return (unit * (size // 8 + 1))[:size]


def encode(records) -> bytes:
    return b"".join(_LEN.pack(len(r)) + r for r in records)


class Sim:
    """Producer + worker over the layout functions, checking every step."""

    def __init__(self, cap: int, pos: int, first_seq: int) -> None:
        self.cap = cap
        self.area = bytearray(b"\xee" * cap)
        self.head = self.tail = pos
        self.head_seq = self.next_seq = first_seq
        self.wrap_pos, self.wrap_seq = L.WRAP_NONE, 0
        self.pending = deque()  # (id, record) published, not yet taken by the worker
        self.wraps = 0
        self.exact_fills = 0

    # --- producer ---------------------------------------------------------------------------

    def free(self) -> int:
        return self.cap - (self.tail - self.head)

    def check_place(self, need: int):
        """place() for a block of ``need`` bytes, checked against what it must mean."""
        cap = self.cap
        pl = L.place(self.tail, self.head, cap, need)
        off = self.tail % cap
        straddles = off + need > cap
        if straddles:
            # skip exactly to the next multiple of the capacity, write at offset 0
            assert pl.skip == cap - off and pl.offset == 0, (pl, off, need)
            assert (self.tail + pl.skip) % cap == 0
            assert L.wrap_end(self.tail, cap) == self.tail + pl.skip
        else:
            assert pl.skip == 0 and pl.offset == off, (pl, off, need)
        # fits iff the bytes it would cover (skip + block) are all free
        assert pl.fits == (pl.skip + need <= self.free()), (pl, need, self.free())
        if pl.fits:
            assert pl.offset + need <= cap, "a block never straddles the end"
        return pl

    def produce(self, records, combined: bool = False) -> bool:
        """Publish a block of records if there is room (after a wrap of its own if needed).

        ``combined``: when place() says the block fits after a skip, publish skip and block
        together (one publish); otherwise, like Ring.publish, publish the wrap alone first.
        Returns False (nothing of the block published) when the ring lacks room now."""
        block = encode(records)
        need = len(block)
        cap = self.cap
        assert 4 <= need <= L.max_block(cap)
        for _attempt in range(2):
            pl = self.check_place(need)
            if pl.skip and not (combined and pl.fits):
                if pl.skip > self.free():
                    return False
                self.publish_wrap(pl.skip)
                continue
            if not pl.fits:
                return False
            if pl.skip:
                self.wrap_pos, self.wrap_seq = self.tail, self.next_seq
                self.wraps += 1
            self.area[pl.offset : pl.offset + need] = block
            for i, rec in enumerate(records):
                self.pending.append((self.next_seq + i, rec))
            self.tail += pl.skip + need
            self.next_seq += len(records)
            if self.tail % cap == 0:
                # ends exactly at the end of the area: recorded as a wrap that skips nothing
                assert not pl.skip
                self.wrap_pos, self.wrap_seq = self.tail, self.next_seq
                self.exact_fills += 1
            assert self.tail - self.head <= self.cap
            return True
        raise AssertionError("a block still needs a wrap right after its wrap was published")

    def publish_wrap(self, skip: int) -> None:
        assert 0 < skip < self.cap
        self.wrap_pos, self.wrap_seq = self.tail, self.next_seq
        self.tail += skip
        self.wraps += 1
        assert self.tail % self.cap == 0
        assert self.tail - self.head <= self.cap

    # --- worker -----------------------------------------------------------------------------

    def take(self):
        """One next_slice() + consume; returns the (id, record)s, or None when nothing is pending."""
        cap = self.cap
        s = L.next_slice(self.head, self.head_seq, self.tail, self.next_seq, self.wrap_pos,
                         self.wrap_seq, cap)
        if s is None:
            assert self.head == self.tail, "next_slice says empty while bytes are pending"
            assert not self.pending
            return None
        assert s.offset == self.head % cap and s.first_seq == self.head_seq, s
        assert 0 <= s.length and s.offset + s.length <= cap, f"slice straddles the end: {s}"
        assert self.head < s.new_head <= self.tail, f"no progress or past the tail: {s}"
        assert s.new_head - self.head >= s.length
        if s.new_head - self.head > s.length:
            # the run ends at a wrap: the head jumps to the next multiple of the capacity
            assert s.new_head % cap == 0 and s.offset + s.length < cap, s
        buf = bytes(self.area[s.offset : s.offset + s.length])
        got = []
        pos = 0
        while pos < len(buf):
            (n,) = _LEN.unpack_from(buf, pos)
            assert pos + 4 + n <= len(buf), f"record runs past the slice end: {s}"
            got.append(buf[pos + 4 : pos + 4 + n])
            pos += 4 + n
        assert len(got) == s.count, (s, len(got))
        out = []
        for i, rec in enumerate(got):
            seq, want = self.pending.popleft()
            assert seq == s.first_seq + i, (seq, s)
            assert rec == want, f"record {seq} differs"
            out.append((seq, rec))
        self.head = s.new_head
        self.head_seq = s.first_seq + s.count
        if self.pending:
            assert self.pending[0][0] == self.head_seq
        else:
            assert self.head_seq == self.next_seq
        return out

    def drain(self, limit: int = 1 << 30) -> int:
        n = 0
        for _ in range(limit):
            if self.take() is None:
                break
            n += 1
        return n

    def check(self) -> None:
        assert 0 <= self.tail - self.head <= self.cap
        assert self.next_seq - self.head_seq == len(self.pending)
        assert sum(4 + len(r) for _, r in self.pending) <= self.tail - self.head


# --- stateful model ---------------------------------------------------------------------------


class RingModel(RuleBasedStateMachine):
    @initialize(
        lap=st.one_of(st.just(0), st.integers(0, 1 << 40)),
        off=st.integers(0, CAP - 1),
        first_seq=st.one_of(st.just(0), st.integers(0, 1 << 50)),
    )
    def init(self, lap, off, first_seq):
        self.sim = Sim(CAP, lap * CAP + off, first_seq)
        self.blocked = None  # a block place() refused: it is retried, never dropped
        self.tag = 0

    def _draw_block(self, data):
        sim = self.sim
        off = sim.tail % CAP
        room = CAP - off
        special = sorted({v for v in (4, 5, 8, CAP, CAP - 1, room, room - 1, room + 1, room + 4,
                                      sim.free(), sim.free() + 1) if 4 <= v <= CAP})
        need = data.draw(st.one_of(st.sampled_from(special), st.integers(4, CAP),
                                   st.integers(4, 300)), label="need")
        k = data.draw(st.integers(1, min(8, need // 4)), label="records")
        extra = need - 4 * k
        cuts = sorted(data.draw(st.lists(st.integers(0, extra), min_size=k - 1, max_size=k - 1),
                                label="cuts"))
        sizes = [b - a for a, b in zip([0] + cuts, cuts + [extra])]
        records = []
        for size in sizes:
            self.tag += 1
            records.append(payload(self.tag, size))
        combined = data.draw(st.booleans(), label="combined")
        assert len(encode(records)) == need
        return records, combined

    @rule(data=st.data())
    def produce(self, data):
        if self.blocked is None:
            self.blocked = self._draw_block(data)
        records, combined = self.blocked
        if self.sim.produce(records, combined):
            self.blocked = None

    @rule(data=st.data())
    def take_some(self, data):
        self.sim.drain(data.draw(st.integers(1, 4), label="slices"))

    @rule()
    def drain_then_retry(self):
        """Once the worker has freed everything, a refused block goes in (at most one more
        drain is needed when it had to wrap first): a block of `capacity` bytes always fits."""
        if self.blocked is None:
            self.sim.drain()
            return
        records, combined = self.blocked
        for _round in range(2):
            self.sim.drain()
            assert self.sim.head == self.sim.tail
            if self.sim.produce(records, combined):
                self.blocked = None
                return
        raise AssertionError(f"a block of {len(encode(records))} bytes never fits")

    @invariant()
    def consistent(self):
        if hasattr(self, "sim"):
            self.sim.check()


RingModel.TestCase.settings = settings(
    max_examples=150, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRingModel = RingModel.TestCase


# --- explicit cases ---------------------------------------------------------------------------


@pytest.mark.parametrize("lap", [0, 1, 12345678])
def test_wrap_at_every_offset(lap):
    """From every offset, a block that does not fit before the end wraps and comes back intact;
    so does a block of exactly the capacity."""
    for off in range(1, CAP):
        for need in {CAP - off + 1, CAP - off + 4, CAP}:
            if need < 4 or need > CAP:
                continue
            sim = Sim(CAP, lap * CAP + off, 77)
            records = [payload(off, need - 4)]
            if not sim.produce(records):
                # only the wrap went in (published on its own); the block waits for the skip
                # to be freed
                assert sim.wraps == 1 and sim.tail == (lap + 1) * CAP
                assert sim.take() == []  # a run of no records: the skip
                assert sim.produce(records)
            assert sim.wraps == 1
            got = []
            while (run := sim.take()) is not None:
                got += [r for _, r in run]
            assert got == records
            assert sim.head_seq == 78


def test_exact_fill_to_the_end_needs_no_wrap():
    sim = Sim(CAP, 5 * CAP + 100, 1)
    assert sim.produce([payload(1, CAP - 100 - 4)])
    assert sim.wraps == 0 and sim.tail == 6 * CAP
    # 100 bytes are free, at the start of the area
    assert L.place(sim.tail, sim.head, CAP, 100) == L.Placement(True, 0, 0)
    assert L.place(sim.tail, sim.head, CAP, 101).fits is False
    assert [s for s, _ in sim.take()] == [1]
    assert L.place(sim.tail, sim.head, CAP, CAP) == L.Placement(True, 0, 0)


def test_place_refuses_when_full_and_accepts_once_freed():
    sim = Sim(CAP, 0, 1)
    assert sim.produce([payload(1, 1000 - 4)])
    assert sim.produce([payload(2, 3000 - 4)])
    # 96 bytes are free, at the end of the area
    assert L.place(sim.tail, sim.head, CAP, 96) == L.Placement(True, 0, 4000)
    assert L.place(sim.tail, sim.head, CAP, 97).fits is False
    assert sim.produce([payload(3, 92)])
    assert L.place(sim.tail, sim.head, CAP, 4).fits is False
    sim.take()  # frees everything (one run of three records)
    assert sim.head == sim.tail == CAP
    assert L.place(sim.tail, sim.head, CAP, CAP) == L.Placement(True, 0, 0)


def test_stale_wrap_is_ignored():
    sim = Sim(CAP, 4000, 10)
    assert sim.produce([payload(1, 200)])  # wraps at 4000
    assert sim.produce([payload(2, 10)])
    sim.drain()
    assert sim.wrap_pos == 4000 and sim.head > sim.wrap_pos
    assert sim.produce([payload(3, 10)])
    s = L.next_slice(sim.head, sim.head_seq, sim.tail, sim.next_seq, sim.wrap_pos, sim.wrap_seq, CAP)
    assert s.first_seq == 12 and s.count == 1 and s.new_head == sim.tail


def test_next_slice_empty_and_wrap_end():
    assert L.next_slice(10, 3, 10, 3, L.WRAP_NONE, 0, CAP) is None
    for k in (0, 1, 1 << 40):
        assert L.wrap_end(k * CAP, CAP) == k * CAP
        assert L.wrap_end(k * CAP + 1, CAP) == (k + 1) * CAP
        assert L.wrap_end(k * CAP + CAP - 1, CAP) == (k + 1) * CAP
    assert L.max_block(CAP) == CAP


def test_check_capacity():
    for ok in (4096, 8192, 1 << 20, 1 << 31):
        L.check_capacity(ok)
    for bad in (0, 2048, 4095, 4097, 6144, (1 << 31) + 4096, 1 << 32, 1 << 63, 1 << 64):
        with pytest.raises(ValueError):
            L.check_capacity(bad)


def test_the_largest_ring_drains_as_one_frame():
    """A worker writes a run of records from its ring as one frame: the largest ring's whole
    contents must fit a frame payload (a u32 length)."""
    from ironwal_mp.engine.frame import MAX_PAYLOAD

    assert L.max_block(L.MAX_CAPACITY) <= MAX_PAYLOAD < 2 * L.MAX_CAPACITY


def test_run_never_crosses_the_end_after_an_exact_fill():
    """A block that fills the area exactly to its end, then a block at offset 0 published before
    the worker takes the first: two runs, never one across the end.

    (Found by RingModel on the first version of the layout: with no record of that crossing,
    next_slice returned Slice(offset=4, length=4096, first_seq=2, count=2). The producer now
    records it as a wrap that skips nothing.)

    head=4 (a 4-byte record already taken); id 2 is a 4092-byte block filling [4, 4096); id 3 is
    a 4-byte block at [4096, 4100) = offset 0."""
    sim = Sim(CAP, 0, 1)
    assert sim.produce([b""])
    sim.drain()
    assert sim.produce([payload(2, CAP - 4 - 4)])
    assert sim.tail == CAP and sim.wraps == 0 and sim.exact_fills == 1
    assert sim.produce([b""])  # id 3 at offset 0
    s = L.next_slice(sim.head, sim.head_seq, sim.tail, sim.next_seq, sim.wrap_pos, sim.wrap_seq, CAP)
    assert s == L.Slice(4, CAP - 4, 2, 1, CAP), s
    assert [i for i, _ in sim.take()] == [2]
    s = L.next_slice(sim.head, sim.head_seq, sim.tail, sim.next_seq, sim.wrap_pos, sim.wrap_seq, CAP)
    assert s == L.Slice(0, 4, 3, 1, CAP + 4), s  # the marker at head is behind us
    assert [i for i, _ in sim.take()] == [3]
    assert sim.take() is None


def test_exact_fill_marker_taken_alone():
    """The worker took everything up to the boundary before anything followed it."""
    sim = Sim(CAP, 3 * CAP + 96, 50)
    assert sim.produce([payload(1, CAP - 96 - 4)])
    assert [i for i, _ in sim.take()] == [50]
    assert sim.head == sim.tail == sim.wrap_pos == 4 * CAP
    assert sim.take() is None
    assert sim.produce([payload(2, 10)])
    assert [i for i, _ in sim.take()] == [51]


def test_resume_action_decides_from_the_ring_and_the_disk():
    from ironwal_mp.ipc.ring_layout import ST_CLOSED, ST_FAILED, ST_NEW, ST_OPEN, resume_action

    assert resume_action(ST_NEW, 0, 0, False, 7) == ("fresh", "")
    for state in (ST_OPEN, ST_CLOSED, ST_FAILED):
        # the disk ends inside the ring's ids, at either end or between: resume
        for disk in (10, 12, 15):
            assert resume_action(state, 10, 15, True, disk) == ("resume", "")
        # ids written from the ring are missing on disk: fail, with or without unwritten records
        for unwritten in (False, True):
            action, why = resume_action(state, 10, 15, unwritten, 9)
            assert action == "fail" and "end at id 9" in why and "up to 10" in why
        # the disk is past the ring: harmless if it holds nothing unwritten, else fail
        assert resume_action(state, 15, 15, False, 20) == ("fresh", "")
        action, why = resume_action(state, 10, 15, True, 20)
        assert action == "fail" and "10..15" in why
