"""A Wal against an in-memory model, under random writes, truncations, reopens and crashes.

The model knows, per stream, every entry ever written, the first kept id, and the exact
segment layout: which frames each segment holds and at which byte offset each frame ends
(one frame per call: append, non-empty batch, committed transaction). That is enough to
predict what a crash that tears the active segment at any byte must keep: exactly the frames
that end at or before the tear. Segment rotation is modelled as documented: a frame that would
take a non-empty segment past ``max_segment_size`` starts a new segment named after its first id.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from ironwal_mp import CompressionType, ReadStrategy, SyncMode, Wal, WalOptions
from ironwal_mp.engine.frame import choose_payload

STREAMS = ("a", "b", "c")
HDR_SIZE = 32


class Boom(Exception):
    """Raised inside a transaction to abort it."""


@dataclass
class SegModel:
    start: int
    size: int = 0
    #: (first id, entry count, offset just past the frame), in file order
    frames: List[tuple] = field(default_factory=list)


@dataclass
class StreamModel:
    entries: List[bytes] = field(default_factory=list)  # by id, including truncated ones
    segments: List[SegModel] = field(default_factory=list)

    @property
    def next_id(self) -> int:
        return len(self.entries)

    @property
    def first(self) -> int:
        return self.segments[0].start if self.segments else 0

    @property
    def kept(self) -> List[bytes]:
        return self.entries[self.first :]


def encode(entries: List[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in entries)


entry_st = st.one_of(
    st.binary(max_size=100),  # mostly incompressible
    st.builds(lambda unit, n: unit * n, st.binary(min_size=1, max_size=3), st.integers(1, 150)),
)
batch_st = st.lists(entry_st, max_size=6)
stream_st = st.sampled_from(STREAMS)


class WalModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = tempfile.mkdtemp(prefix="walmodel-")
        self.wal: Optional[Wal] = None
        self.follower: Optional[Wal] = None
        self.model: Dict[str, StreamModel] = {s: StreamModel() for s in STREAMS}

    # --- set-up --------------------------------------------------------------------------------

    @initialize(
        max_segment_size=st.sampled_from([256, 300, 512, 1024, 4096]),
        compression=st.sampled_from([CompressionType.NONE, CompressionType.LZ4]),
        min_compression_size=st.sampled_from([0, 16, 128]),
        sync_mode=st.sampled_from([SyncMode.ASYNC, SyncMode.BATCH_ONLY, SyncMode.STRICT]),
        read_strategy=st.sampled_from([ReadStrategy.STANDARD_IO, ReadStrategy.MMAP]),
        block_cache_size=st.sampled_from([None, 4096]),
    )
    def open_wal(self, **kw) -> None:
        self.opts = WalOptions(root_path=self.root, **kw)
        self.compress = kw["compression"] is CompressionType.LZ4
        self.wal = Wal(self.opts)
        self.follower = Wal(self.opts, read_only=True)  # a reader beside the writer

    def teardown(self) -> None:
        if self.wal is not None:
            self.wal.close()
        if self.follower is not None:
            self.follower.close()
        shutil.rmtree(self.root, ignore_errors=True)

    # --- the model's idea of one write -----------------------------------------------------------

    def model_write(self, stream: str, items: List[bytes]) -> range:
        m = self.model[stream]
        start = m.next_id
        if not items:
            return range(start, start)
        _ftype, stored = choose_payload(encode(items), self.compress, self.opts.min_compression_size)
        size = HDR_SIZE + len(stored)
        if not m.segments:
            m.segments.append(SegModel(start))
        elif m.segments[-1].size and m.segments[-1].size + size > self.opts.max_segment_size:
            m.segments.append(SegModel(start))
        seg = m.segments[-1]
        seg.size += size
        seg.frames.append((start, len(items), seg.size))
        m.entries.extend(items)
        return range(start, start + len(items))

    def stream_dir(self, stream: str) -> str:
        return os.path.join(self.root, stream)

    def seg_path(self, stream: str, start: int) -> str:
        return os.path.join(self.stream_dir(stream), f"{start:020d}.wal")

    # --- writes --------------------------------------------------------------------------------

    @rule(stream=stream_st, data=entry_st)
    def append(self, stream, data):
        expected = self.model_write(stream, [data])
        assert self.wal.append(stream, data) == expected.start

    @rule(stream=stream_st, items=batch_st)
    def append_batch(self, stream, items):
        expected = self.model_write(stream, items)
        assert self.wal.append_batch(stream, items) == expected

    @rule(
        stream=stream_st,
        writes=st.lists(st.tuples(st.sampled_from(["one", "batch", "txn"]), batch_st), min_size=1, max_size=10),
    )
    def burst(self, stream, writes):
        """Several writes in one step, so that segments fill up within a short run."""
        for kind, items in writes:
            if kind == "one":
                self.append(stream, items[0] if items else b"")
            elif kind == "batch":
                self.append_batch(stream, items)
            else:
                self.commit_transaction(stream, items)

    @rule(stream=stream_st, items=batch_st)
    def commit_transaction(self, stream, items):
        expected = self.model_write(stream, items)
        with self.wal.writer(stream) as txn:
            for item in items:
                txn.add(item)
            assert len(txn) == len(items)
        assert self.wal.next_id(stream) == expected.stop

    @rule(stream=stream_st, items=batch_st)
    def abort_transaction(self, stream, items):
        before = self.wal.next_id(stream)
        with pytest.raises(Boom):
            with self.wal.writer(stream) as txn:
                for item in items:
                    txn.add(item)
                raise Boom()
        assert self.wal.next_id(stream) == before

    @rule(stream=stream_st, ahead=st.integers(-2, 3), pick=st.integers(0, 10**6))
    def truncate(self, stream, ahead, pick):
        m = self.model[stream]
        if len(m.segments) > 1 and ahead > -2:  # aim at a later segment's start, give or take
            safe = max(0, m.segments[1 + pick % (len(m.segments) - 1)].start + ahead)
        else:
            safe = pick % (m.next_id + 3)
        doomed = 0
        while doomed < len(m.segments) - 1 and m.segments[doomed + 1].start <= safe:
            doomed += 1
        del m.segments[:doomed]
        event(f"truncate deleted segments: {bool(doomed)}")
        assert self.wal.truncate(stream, safe) == doomed

    # --- lifecycle -----------------------------------------------------------------------------

    @rule()
    def reopen(self):
        self.wal.close()
        self.wal = Wal(self.opts)
        assert self.wal.recover_all() == [], "a clean close must leave nothing to repair"

    @rule(stream=stream_st, cut=st.integers(1, 10**6), garbage=st.binary(min_size=1, max_size=80))
    def crash_with_torn_tail(self, stream, cut, garbage):
        """Close, then tear the active segment: cut bytes off its end or leave garbage after it."""
        self.wal.close()
        self.wal = None
        self.follower.close()  # (a power loss ends the reader too)
        self.follower = None
        m = self.model[stream]
        expect_cut = None  # (offset, bytes kept aside)
        if m.segments:
            seg = m.segments[-1]
            path = self.seg_path(stream, seg.start)
            with open(path, "rb") as fh:
                data = fh.read()
            assert len(data) == seg.size
            if seg.size and cut % 4:
                if cut % 4 == 1:  # lose whole frames only (the tear falls on a boundary)
                    ends = [0] + [f[2] for f in seg.frames[:-1]]
                    new_size = ends[(cut // 4) % len(ends)]
                else:  # cut 1..size bytes off the end
                    new_size = seg.size - (1 + (cut // 4) % seg.size)
                os.truncate(path, new_size)
                kept = [f for f in seg.frames if f[2] <= new_size]
                boundary = kept[-1][2] if kept else 0
                if boundary < new_size:
                    expect_cut = (boundary, data[boundary:new_size])
                lost = len(seg.frames) - len(kept)
                event(f"crash cut frames: {min(lost, 2)}{'+' if lost > 2 else ''}")
                event(f"crash cut on a frame boundary: {boundary == new_size}")
                seg.frames = kept
                seg.size = boundary
                del m.entries[(kept[-1][0] + kept[-1][1]) if kept else seg.start :]
            else:  # garbage that cannot start a frame (the magic begins with b"L")
                if garbage[0] == 0x4C:
                    garbage = b"\x00" + garbage
                with open(path, "ab") as fh:
                    fh.write(garbage)
                expect_cut = (seg.size, garbage)
        self.wal = Wal(self.opts)
        reports = self.wal.recover_all()
        cuts = [r for r in reports if r.cut_offset is not None]
        if expect_cut is None:
            assert cuts == []
        else:
            assert len(cuts) == 1
            report = cuts[0]
            assert report.stream_dir == self.stream_dir(stream)
            assert (report.cut_offset, report.cut_bytes) == (expect_cut[0], len(expect_cut[1]))
            with open(report.side_file, "rb") as fh:
                assert fh.read() == expect_cut[1]
        # and nothing else needed repair
        assert all(r.stream_dir == self.stream_dir(stream) for r in reports)
        self.follower = Wal(self.opts, read_only=True)

    @rule(stream=st.one_of(st.none(), stream_st))
    def follower_catches_up(self, stream):
        """A read-only handle shows, after refresh, everything the writer wrote (it is all in
        the OS's hands in this process); streams it never used are read at first use."""
        self.follower.refresh(stream)
        for name in STREAMS if stream is None else (stream,):
            m = self.model[name]
            assert list(self.follower.iter(name, 0)) == m.kept, name
            assert self.follower.next_id(name) == m.next_id
            assert self.follower.first_id(name) == (m.first if m.next_id > m.first else None)
            if m.next_id > m.first:
                assert self.follower.get(name, m.next_id - 1) == m.entries[-1]
            assert self.follower.durable_id(name) == (m.segments[-1].start if m.segments else 0)

    # --- reads ---------------------------------------------------------------------------------

    @rule(stream=stream_st, pick=st.integers(0, 10**6))
    def get_some_id(self, stream, pick):
        m = self.model[stream]
        seq = pick % (m.next_id + 2)
        expected = m.entries[seq] if m.first <= seq < m.next_id else None
        assert self.wal.get(stream, seq) == expected

    @rule(stream=stream_st, pick=st.integers(0, 10**6))
    def iter_from(self, stream, pick):
        m = self.model[stream]
        start = pick % (m.next_id + 2)
        assert list(self.wal.iter(stream, start)) == m.entries[max(start, m.first) :]

    # --- invariants ----------------------------------------------------------------------------

    @invariant()
    def matches_the_model(self):
        if self.wal is None:
            return
        event(f"most segments in a stream: {min(max(len(m.segments) for m in self.model.values()), 5)}")
        for stream in STREAMS:
            m = self.model[stream]
            got = list(self.wal.iter(stream, 0))
            assert got == m.kept, stream
            assert self.wal.next_id(stream) == m.next_id
            assert len(got) == m.next_id - m.first  # contiguous ids, no holes
            assert self.wal.first_id(stream) == (m.first if m.next_id > m.first else None)
            if not m.segments:
                assert self.wal.current_segment_start_id(stream) is None
                continue
            assert self.wal.current_segment_start_id(stream) == m.segments[-1].start
            for seq in {m.first, m.next_id - 1, (m.first + m.next_id) // 2}:
                if m.first <= seq < m.next_id:
                    assert self.wal.get(stream, seq) == m.entries[seq]
            assert self.wal.get(stream, m.next_id) is None
            if m.first:
                assert self.wal.get(stream, m.first - 1) is None
            # the files are exactly the modelled segments, frame boundaries and all
            on_disk = sorted(
                n for n in os.listdir(self.stream_dir(stream)) if n.endswith(".wal") and len(n) == 24
            )
            assert on_disk == [f"{seg.start:020d}.wal" for seg in m.segments]
            for seg in m.segments:
                assert os.path.getsize(self.seg_path(stream, seg.start)) == seg.size


WalModel.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestWalModel = WalModel.TestCase
