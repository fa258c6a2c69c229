"""Power-plug simulations: write a known history, damage the files the way a crash (or the disk)
would, reopen, and check exactly what survives.

Every test works on real files. The expected survivors are computed from the frame boundaries,
which this file finds with its own small header walker (not the engine's scanner), so a wrong
boundary in the engine cannot hide behind the same wrong boundary in the test.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import zlib
from dataclasses import dataclass
from typing import Dict, List

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ironwal_mp import (
    CompressionType,
    CorruptionError,
    CorruptionPolicy,
    CrcMismatchError,
    ReadStrategy,
    SyncMode,
    Wal,
    WalOptions,
)

STREAM = "events"

# --- the on-disk format, as this test file understands it ----------------------------------------

HDR = struct.Struct("<IIQIBII3x")
HDR_SIZE = 32
MAGIC_BYTES = b"LAWL"
#: byte ranges inside a frame header
F_MAGIC = range(0, 4)
F_CRC = range(4, 8)
F_START = range(8, 16)
F_COUNT = range(16, 20)
F_TYPE = range(20, 21)
F_DISK = range(21, 25)
F_UNCOMPRESSED = range(25, 29)
F_PADDING = range(29, 32)


@dataclass(frozen=True)
class Frame:
    offset: int
    end: int  # offset just past the frame
    start_id: int
    count: int
    type: int

    @property
    def end_id(self) -> int:
        return self.start_id + self.count


def walk_frames(data: bytes) -> List[Frame]:
    """Frames of an undamaged segment image (asserts it is one)."""
    out = []
    pos = 0
    while pos < len(data):
        magic, _crc, start, count, ftype, disk, _unc = HDR.unpack_from(data, pos)
        assert magic == 0x4C57414C
        end = pos + HDR_SIZE + disk
        assert end <= len(data)
        out.append(Frame(pos, end, start, count, ftype))
        pos = end
    return out


def seg_name(start: int) -> str:
    return f"{start:020d}.wal"


def segment_starts(stream_dir: str) -> List[int]:
    return sorted(int(n[:20]) for n in os.listdir(stream_dir) if len(n) == 24 and n.endswith(".wal"))


def raw_frame(start_id: int, entries: List[bytes]) -> bytes:
    """A valid raw frame, encoded independently of the engine."""
    payload = b"".join(struct.pack("<I", len(e)) + e for e in entries)
    crc = zlib.crc32(struct.pack("<QIBI", start_id, len(entries), 0, len(payload)) + payload)
    return HDR.pack(0x4C57414C, crc, start_id, len(entries), 0, len(payload), len(payload)) + payload


def read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def write(path: str, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)


def snapshot(root: str) -> Dict[str, bytes]:
    """Every file under ``root`` (but the lock file), by relative path."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if name == "LOCK":
                continue
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = read(path)
    return out


# --- a known history -------------------------------------------------------------------------------


def make_opts(root, **kw) -> WalOptions:
    base = dict(
        root_path=str(root),
        max_segment_size=2048,
        compression=CompressionType.LZ4,
        min_compression_size=32,
        sync_mode=SyncMode.ASYNC,
    )
    base.update(kw)
    return WalOptions(**base)


def entry(rng: random.Random, n: int) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 150))  # does not compress
    if kind == 1:
        return (b"entry %d;" % n) * rng.randrange(1, 30)  # compresses well
    if kind == 2:
        return b""
    return b"#%d" % n


def write_history(wal: Wal, stream: str, rng: random.Random, writes: int = 70) -> List[bytes]:
    """Single appends, batches and transactions; returns every entry by id."""
    expected: List[bytes] = []
    for _ in range(writes):
        kind = rng.randrange(3)
        if kind == 0:
            data = entry(rng, len(expected))
            assert wal.append(stream, data) == len(expected)
            expected.append(data)
        elif kind == 1:
            items = [entry(rng, len(expected) + k) for k in range(rng.randrange(2, 7))]
            assert wal.append_batch(stream, items) == range(len(expected), len(expected) + len(items))
            expected += items
        else:
            items = [entry(rng, len(expected) + k) for k in range(rng.randrange(1, 6))]
            with wal.writer(stream) as txn:
                for item in items:
                    txn.add(item)
            expected += items
    return expected


@dataclass
class History:
    root: str
    opts: WalOptions
    expected: List[bytes]

    @property
    def stream_dir(self) -> str:
        return os.path.join(self.root, STREAM)

    def segments(self) -> List[int]:
        return segment_starts(self.stream_dir)

    def seg_path(self, start: int) -> str:
        return os.path.join(self.stream_dir, seg_name(start))

    @property
    def active_path(self) -> str:
        return self.seg_path(self.segments()[-1])

    def frames(self, start: int) -> List[Frame]:
        return walk_frames(read(self.seg_path(start)))

    def open(self, **kw) -> Wal:
        return Wal(self.opts.replace(**kw) if kw else self.opts)


def build(root, seed: int = 7, *, writes: int = 90, min_active_frames: int = 4, **kw) -> History:
    """Write a seeded history (several segments), close, and return what was written."""
    rng = random.Random(seed)
    opts = make_opts(root, **kw)
    with Wal(opts) as wal:
        expected = write_history(wal, STREAM, rng, writes)
        active = wal.current_segment_start_id(STREAM)
        while True:  # make sure the active segment holds a few frames to cut into
            data = read(os.path.join(str(root), STREAM, seg_name(active)))
            if len(walk_frames(data)) >= min_active_frames:
                break
            expected.append(b"pad %d" % len(expected))
            assert wal.append(STREAM, expected[-1]) == len(expected) - 1
            active = wal.current_segment_start_id(STREAM)
    hist = History(str(root), opts, expected)
    assert len(hist.segments()) >= 3, "the history should span several segments"
    return hist


# --- checks ----------------------------------------------------------------------------------------


def assert_holds(wal: Wal, stream: str, expected: List[bytes], first: int = 0) -> None:
    """The stream holds exactly ``expected[first:]`` at ids first..len-1, and nothing more."""
    assert wal.next_id(stream) == len(expected)
    assert list(wal.iter(stream, 0)) == expected[first:]
    for i in range(first, len(expected)):
        assert wal.get(stream, i) == expected[i], f"id {i}"
    assert wal.get(stream, len(expected)) is None
    assert wal.get(stream, len(expected) + 100) is None
    mid = (first + len(expected)) // 2
    assert list(wal.iter(stream, mid)) == expected[mid:]


def assert_continues(wal: Wal, stream: str, expected: List[bytes]) -> List[bytes]:
    """New writes get the ids right after the survivors; returns the grown expectation."""
    n = len(expected)
    more = [b"after crash %d" % k for k in range(6)]
    assert wal.append(stream, more[0]) == n
    assert wal.append_batch(stream, more[1:4]) == range(n + 1, n + 4)
    with wal.writer(stream) as txn:
        txn.add(more[4])
        txn.add(more[5])
    expected = expected + more
    assert_holds(wal, stream, expected)
    return expected


def assert_single_cut(wal: Wal, seg_path: str, boundary: int, cut: bytes) -> None:
    """Recovery reported one cut at ``boundary`` and kept exactly ``cut`` in the side file."""
    reports = [r for r in wal.recovery_reports if r.cut_offset is not None]
    assert len(reports) == 1, wal.recovery_reports
    report = reports[0]
    assert report.cut_offset == boundary
    assert report.cut_bytes == len(cut)
    assert report.side_file == seg_path + ".broken"
    assert read(report.side_file) == cut
    assert os.path.getsize(seg_path) == boundary


def survivors_after_cut(hist: History, active: int, frames: List[Frame], cut_at: int):
    """(boundary, surviving entries) when the active segment is cut to ``cut_at`` bytes."""
    kept = [f for f in frames if f.end <= cut_at]
    boundary = kept[-1].end if kept else 0
    next_id = kept[-1].end_id if kept else active
    return boundary, hist.expected[:next_id]


def reopen_and_check_cut(hist: History, cut_at: int, frames: List[Frame], **kw):
    """Reopen after the active segment was damaged so that bytes from ``cut_at`` are invalid;
    check survivors, the report, the side file, continued appends and a clean second reopen."""
    active = hist.segments()[-1]
    path = hist.seg_path(active)
    boundary, survivors = survivors_after_cut(hist, active, frames, cut_at)
    damaged = read(path)
    with hist.open(**kw) as wal:
        wal.recover_all()
        if boundary == len(damaged):
            assert wal.recovery_reports == []
            assert not os.path.exists(path + ".broken")
        else:
            assert_single_cut(wal, path, boundary, damaged[boundary:])
        assert_holds(wal, STREAM, survivors)
        assert wal.current_segment_start_id(STREAM) == active
        grown = assert_continues(wal, STREAM, survivors)
    with hist.open(**kw) as wal:
        assert wal.recover_all() == []
        assert_holds(wal, STREAM, grown)
    return boundary, survivors


# --- torn tails ------------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", [CompressionType.NONE, CompressionType.LZ4])
@pytest.mark.parametrize("strategy", [ReadStrategy.STANDARD_IO, ReadStrategy.MMAP])
@pytest.mark.parametrize("keep", ["first byte", "half", "all but one byte"])
def test_cut_inside_the_last_frames_payload(tmp_path, compression, strategy, keep):
    hist = build(tmp_path, compression=compression, read_strategy=strategy)
    with hist.open() as wal:  # end on a frame of the kind under test
        if compression is CompressionType.LZ4:
            last = [b"compressible %d " % i * 20 for i in range(3)]
        else:
            last = [random.Random(5).randbytes(100)]
        wal.append_batch(STREAM, last)
        hist.expected += last
    path = hist.active_path
    original = read(path)
    frames = walk_frames(original)
    tail = frames[-1]
    assert tail.type == (1 if compression is CompressionType.LZ4 else 0)
    payload_len = tail.end - tail.offset - HDR_SIZE
    kept = {"first byte": 1, "half": payload_len // 2, "all but one byte": payload_len - 1}[keep]
    cut_at = tail.offset + HDR_SIZE + kept
    os.truncate(path, cut_at)
    boundary, survivors = reopen_and_check_cut(hist, cut_at, frames)
    assert boundary == tail.offset
    assert survivors == hist.expected[: tail.start_id]


@pytest.mark.parametrize("header_bytes", [1, 2, 3, 4, 5, 8, 12, 16, 20, 21, 25, 28, 29, 31])
def test_partial_header_at_the_end(tmp_path, header_bytes):
    hist = build(tmp_path)
    path = hist.active_path
    original = read(path)
    frames = walk_frames(original)
    next_frame = raw_frame(len(hist.expected), [b"never acknowledged"])
    write(path, original + next_frame[:header_bytes])
    boundary, survivors = reopen_and_check_cut(hist, len(original), frames)
    assert boundary == len(original)
    assert survivors == hist.expected  # nothing acknowledged is lost


def test_complete_unacknowledged_frame_is_kept(tmp_path):
    """A whole valid frame at the end (written, crash before the call returned) is kept."""
    hist = build(tmp_path)
    path = hist.active_path
    original = read(path)
    write(path, original + raw_frame(len(hist.expected), [b"late", b"but whole"]))
    with hist.open() as wal:
        assert wal.recover_all() == []
        assert_holds(wal, STREAM, hist.expected + [b"late", b"but whole"])


def test_kilobyte_of_zeros_appended(tmp_path):
    hist = build(tmp_path)
    path = hist.active_path
    original = read(path)
    write(path, original + bytes(1024))
    with hist.open() as wal:
        wal.recover_all()
        assert_single_cut(wal, path, len(original), bytes(1024))
        assert_holds(wal, STREAM, hist.expected)
        assert_continues(wal, STREAM, hist.expected)


def test_file_preallocated_with_zeros_in_the_middle_of_a_frame(tmp_path):
    """The file length reached the disk but the last frame's bytes did not (zeros instead)."""
    hist = build(tmp_path)
    path = hist.active_path
    original = read(path)
    frames = walk_frames(original)
    tail = frames[-1]
    zeroed = original[: tail.offset + 10] + bytes(len(original) - tail.offset - 10)
    write(path, zeroed)
    boundary, survivors = reopen_and_check_cut(hist, tail.offset, frames)
    assert survivors == hist.expected[: tail.start_id]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_cut_anywhere_in_the_active_segment(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("cut")
    seed = data.draw(st.integers(0, 3), label="seed")
    hist = build(root, seed)
    path = hist.active_path
    original = read(path)
    frames = walk_frames(original)
    cut_at = data.draw(st.integers(0, len(original) - 1), label="cut_at")
    os.truncate(path, cut_at)
    boundary, survivors = reopen_and_check_cut(hist, cut_at, frames)
    assert boundary <= cut_at


def test_active_segment_cut_to_nothing(tmp_path):
    hist = build(tmp_path)
    active = hist.segments()[-1]
    path = hist.seg_path(active)
    original = read(path)
    os.truncate(path, 7)  # not even one header survives
    with hist.open() as wal:
        wal.recover_all()
        assert_single_cut(wal, path, 0, original[:7])
        assert_holds(wal, STREAM, hist.expected[:active])
        assert wal.current_segment_start_id(STREAM) == active
        assert_continues(wal, STREAM, hist.expected[:active])


def test_single_segment_stream_torn_to_empty(tmp_path):
    opts = make_opts(tmp_path)
    with Wal(opts) as wal:
        wal.append_batch(STREAM, [b"a", b"b", b"c"])
    path = os.path.join(str(tmp_path), STREAM, seg_name(0))
    original = read(path)
    os.truncate(path, len(original) - 1)
    with Wal(opts) as wal:
        wal.recover_all()
        assert_single_cut(wal, path, 0, original[:-1])
        assert wal.next_id(STREAM) == 0
        assert wal.first_id(STREAM) is None
        assert list(wal.iter(STREAM, 0)) == []
        assert wal.get(STREAM, 0) is None
        assert wal.append(STREAM, b"fresh") == 0
    with Wal(opts) as wal:
        assert list(wal.iter(STREAM, 0)) == [b"fresh"]


@pytest.mark.parametrize("compression", [CompressionType.NONE, CompressionType.LZ4])
@pytest.mark.parametrize("how", ["batch", "transaction"])
@pytest.mark.parametrize("where", ["header", "payload start", "payload middle", "payload end"])
def test_torn_atomic_batch_keeps_none_of_it(tmp_path, compression, how, where):
    hist = build(tmp_path, compression=compression)
    before = len(hist.expected)
    items = [b"batch item %d " % i * (3 + i) for i in range(12)]
    with hist.open() as wal:
        if how == "batch":
            assert wal.append_batch(STREAM, items) == range(before, before + len(items))
        else:
            with wal.writer(STREAM) as txn:
                for item in items:
                    txn.add(item)
        assert wal.next_id(STREAM) == before + len(items)
    path = hist.active_path
    original = read(path)
    frames = walk_frames(original)
    batch = frames[-1]
    assert (batch.start_id, batch.count) == (before, len(items)), "a batch must be one frame"
    size = batch.end - batch.offset
    cut_at = batch.offset + {
        "header": 17,
        "payload start": HDR_SIZE + 1,
        "payload middle": HDR_SIZE + (size - HDR_SIZE) // 2,
        "payload end": size - 1,
    }[where]
    os.truncate(path, cut_at)
    hist.expected += items
    boundary, survivors = reopen_and_check_cut(hist, cut_at, frames)
    assert boundary == batch.offset
    assert len(survivors) == before  # all or nothing: here nothing


def test_repeated_crashes_keep_every_side_file(tmp_path):
    hist = build(tmp_path)
    path = hist.active_path
    for round_ in range(3):
        original = read(path)
        garbage = b"\xff garbage of round %d" % round_
        write(path, original + garbage)
        with hist.open() as wal:
            wal.recover_all()
            reports = wal.recovery_reports
            assert len(reports) == 1
            side = path + ".broken" + ("" if round_ == 0 else ".%d" % round_)
            assert reports[0].side_file == side
            assert read(side) == garbage
            assert_holds(wal, STREAM, hist.expected)
    assert read(path + ".broken") == b"\xff garbage of round 0"


def test_only_the_damaged_stream_is_repaired(tmp_path):
    opts = make_opts(tmp_path)
    rng = random.Random(3)
    names = ["alpha", "beta", "gamma"]
    with Wal(opts) as wal:
        expected = {name: write_history(wal, name, rng, 30) for name in names}
    beta_dir = os.path.join(str(tmp_path), "beta")
    active = segment_starts(beta_dir)[-1]
    path = os.path.join(beta_dir, seg_name(active))
    original = read(path)
    frames = walk_frames(original)
    os.truncate(path, frames[-1].end - 3)
    with Wal(opts) as wal:
        reports = wal.recover_all()
        assert [r.stream_dir for r in reports] == [beta_dir]
        assert reports[0].cut_offset == frames[-1].offset
        assert_holds(wal, "alpha", expected["alpha"])
        assert_holds(wal, "gamma", expected["gamma"])
        assert_holds(wal, "beta", expected["beta"][: frames[-1].start_id])


# --- bit flips -------------------------------------------------------------------------------------


def flippable_bytes(frame: Frame) -> List[int]:
    """Offsets (relative to the frame) whose damage the format can detect.

    The padding is not checked by anyone (the crate ignores it too), and an LZ4 frame's
    uncompressed size is not CRC-covered; both have dedicated tests below.
    """
    size = frame.end - frame.offset
    skip = set(F_PADDING) | (set(F_UNCOMPRESSED) if frame.type == 1 else set())
    return [i for i in range(size) if i not in skip]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """One history, written once, copied by each test that damages it."""
    # the first seed whose history has every kind of target, each a batch whose count a
    # single bit flip can lower without reaching zero (e.g. 3 -> 2)
    for seed in range(12, 60):
        root = tmp_path_factory.mktemp("pristine")
        hist = build(root, seed=seed, writes=120, min_active_frames=8)
        targets = _sealed_targets(hist)
        if sorted(targets) == ["lz4-last", "lz4-middle", "raw-last", "raw-middle"] and all(
            bin(frame.count).count("1") >= 2 for _, frame in targets.values()
        ):
            return hist
    pytest.fail("no seed gave a history with every kind of sealed target")


def copy_history(pristine: History, dest) -> History:
    dest = os.path.join(str(dest), "copy")
    shutil.copytree(pristine.root, dest)
    os.remove(os.path.join(dest, "LOCK"))
    return History(dest, pristine.opts.replace(root_path=dest), list(pristine.expected))


def flip(path: str, offset: int, bit: int) -> None:
    data = bytearray(read(path))
    data[offset] ^= 1 << bit
    write(path, bytes(data))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_bit_flip_in_the_active_segment_cuts_from_that_frame(pristine, tmp_path_factory, data):
    hist = copy_history(pristine, tmp_path_factory.mktemp("flip"))
    path = hist.active_path
    original = read(path)
    frames = walk_frames(original)
    victim = data.draw(st.sampled_from(frames[1:-1]), label="frame")  # in the middle
    where = data.draw(st.sampled_from(flippable_bytes(victim)), label="byte")
    bit = data.draw(st.integers(0, 7), label="bit")
    flip(path, victim.offset + where, bit)
    boundary, survivors = reopen_and_check_cut(hist, victim.offset, frames)
    assert boundary == victim.offset
    assert survivors == hist.expected[: victim.start_id]


@pytest.mark.parametrize("field", ["uncompressed size", "padding"])
def test_unchecked_header_bytes_in_the_active_segment_never_yield_wrong_data(tmp_path, field):
    """Damage to header bytes the CRC does not cover must still never produce wrong entries.

    For an LZ4 frame a damaged uncompressed size makes the frame undecodable, so recovery
    should cut it like any other bad frame (it is the tail's first invalid frame). The padding
    carries nothing: the frame either stays fully readable or is cut.
    """
    hist = build(tmp_path, compression=CompressionType.LZ4)
    with hist.open() as wal:
        items = [b"squeeze me %d " % i * 10 for i in range(4)]
        wal.append_batch(STREAM, items)
        hist.expected += items
        wal.append(STREAM, b"after")
        hist.expected.append(b"after")
    path = hist.active_path
    original = read(path)
    frames = walk_frames(original)
    victim = frames[-2]
    assert victim.type == 1
    offset = victim.offset + (F_UNCOMPRESSED[0] if field == "uncompressed size" else F_PADDING[0])
    flip(path, offset, 3)
    if field == "padding":
        with hist.open() as wal:
            wal.recover_all()
            got = list(wal.iter(STREAM, 0))
            assert got in (hist.expected, hist.expected[: victim.start_id])
        return
    boundary, survivors = reopen_and_check_cut(hist, victim.offset, frames)
    assert boundary == victim.offset
    assert survivors == hist.expected[: victim.start_id]


def _sealed_targets(hist: History) -> Dict[str, tuple]:
    """(segment start, frame) of a middle and a last frame of sealed segments, raw and LZ4."""
    found: Dict[str, tuple] = {}
    for start in hist.segments()[:-1]:
        frames = hist.frames(start)
        for i, frame in enumerate(frames):
            kind = "lz4" if frame.type == 1 else "raw"
            pos = "last" if i == len(frames) - 1 else ("middle" if 0 < i else None)
            if pos is None:
                continue
            key = f"{kind}-{pos}"
            old = found.get(key)
            if old is None or _rank(frame) > _rank(old[1]):
                found[key] = (start, frame)
    return found


def _rank(frame: Frame) -> tuple:
    # prefer batches whose count one bit flip can lower without reaching zero (e.g. 3 -> 2)
    return (bin(frame.count).count("1") >= 2, frame.count >= 2)


#: every header byte but the padding, then the payload's first, middle and last byte
SEALED_BYTES = list(range(29)) + ["p0", "pmid", "plast"]


@pytest.mark.parametrize("target", ["raw-middle", "raw-last", "lz4-middle", "lz4-last"])
@pytest.mark.parametrize("byte", SEALED_BYTES)
def test_bit_flip_in_a_sealed_segment_is_reported_never_returned(pristine, tmp_path, target, byte):
    targets = _sealed_targets(pristine)
    assert target in targets, sorted(targets)
    seg_start, victim = targets[target]
    size = victim.end - victim.offset
    rel = {"p0": HDR_SIZE, "pmid": HDR_SIZE + (size - HDR_SIZE) // 2, "plast": size - 1}.get(byte, byte)
    for bit in range(8):
        hist = copy_history(pristine, tmp_path / f"bit{bit}")
        path = hist.seg_path(seg_start)
        flip(path, victim.offset + rel, bit)
        check_sealed_damage(hist, seg_start, victim, path)


def check_sealed_damage(hist: History, seg_start: int, victim: Frame, path: str) -> None:
    expected = hist.expected
    starts = hist.segments()
    nxt = starts[starts.index(seg_start) + 1]
    with hist.open() as wal:
        wal.recover_all()  # opening succeeds: sealed segments are trusted, not rescanned
        assert wal.next_id(STREAM) == len(expected)
        # ids before the damaged frame read back exactly
        for i in range(seg_start, victim.start_id):
            assert wal.get(STREAM, i) == expected[i]
        # every id of the damaged frame is refused, naming the file and the frame's offset
        for i in range(victim.start_id, victim.end_id):
            with pytest.raises(CorruptionError) as info:
                got = wal.get(STREAM, i)
                pytest.fail(f"get({i}) returned {got!r} from a damaged frame")
            assert info.value.path == path
            assert info.value.offset == victim.offset, f"id {i}: {info.value}"
            it = wal.iter(STREAM, i)
            with pytest.raises(CorruptionError) as info:
                got = next(it)
                pytest.fail(f"iter({i}) yielded {got!r} first, past a damaged frame")
            assert info.value.offset == victim.offset
        # iterating from the start yields exactly the prefix, then reports the damage
        seen = []
        with pytest.raises(CorruptionError) as info:
            for item in wal.iter(STREAM, 0):
                seen.append(item)
        assert seen == expected[: victim.start_id]
        assert info.value.offset == victim.offset
        # later frames of the same segment: right bytes or an error, never wrong bytes or None
        for i in range(victim.end_id, nxt):
            try:
                got = wal.get(STREAM, i)
            except CorruptionError:
                continue
            assert got == expected[i], f"id {i}"
        # other segments are unaffected
        for i in (nxt, len(expected) - 1):
            assert wal.get(STREAM, i) == expected[i]
        assert list(wal.iter(STREAM, nxt)) == expected[nxt:]
        # and the stream still takes appends
        assert wal.append(STREAM, b"still writable") == len(expected)


def test_lowered_count_in_a_sealed_frame_is_not_skipped(tmp_path):
    """A bit flip that lowers a sealed frame's entry count (CRC-covered) must not make reads
    skip the frame: its ids must raise, not read as absent or as other ids' bytes."""
    opts = make_opts(tmp_path, max_segment_size=300, compression=CompressionType.NONE)
    batch = [b"y%d" % i + b"." * 28 for i in range(6)]
    with Wal(opts) as wal:
        wal.append(STREAM, b"a")  # id 0
        assert wal.append_batch(STREAM, batch) == range(1, 7)  # the sealed segment's last frame
        for i in range(10):
            wal.append(STREAM, b"z%d" % i)  # ids 7.., in later segments
        assert wal.current_segment_start_id(STREAM) > 7
    path = os.path.join(str(tmp_path), STREAM, seg_name(0))
    frames = walk_frames(read(path))
    assert [(f.start_id, f.count) for f in frames] == [(0, 1), (1, 6)]
    flip(path, frames[1].offset + F_COUNT[0], 2)  # count 6 -> 2
    with Wal(opts) as wal:
        assert wal.get(STREAM, 0) == b"a"
        assert wal.get(STREAM, 7) == b"z0"
        for i in range(1, 7):
            with pytest.raises(CorruptionError) as info:
                got = wal.get(STREAM, i)
                pytest.fail(f"get({i}) returned {got!r} for an id inside a damaged frame")
            assert info.value.offset == frames[1].offset
        with pytest.raises(CorruptionError):
            got = next(wal.iter(STREAM, 4))
            pytest.fail(f"iter(4) began with {got!r} (that is id 7's entry)")


def test_sealed_payload_flip_is_a_crc_mismatch(pristine, tmp_path):
    hist = copy_history(pristine, tmp_path)
    seg_start, victim = _sealed_targets(pristine)["raw-middle"]
    path = hist.seg_path(seg_start)
    flip(path, victim.end - 1, 0)
    with hist.open() as wal:
        with pytest.raises(CrcMismatchError) as info:
            wal.get(STREAM, victim.start_id)
        err = info.value
        assert err.path == path and err.offset == victim.offset
        assert err.expected != err.actual
        assert path in str(err) and str(victim.offset) in str(err)


# --- index files -----------------------------------------------------------------------------------


def _rng_bytes(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


IDX_DAMAGE = {
    "deleted": None,
    "empty": lambda starts: b"",
    "random bytes": lambda starts: _rng_bytes(1, 8 * len(starts)),
    "odd length": lambda starts: struct.pack(f"<{len(starts)}Q", *starts) + b"\x01\x02\x03",
    "non-ascending": lambda starts: struct.pack(f"<{len(starts)}Q", *reversed(starts)),
    "duplicate": lambda starts: struct.pack(f"<{len(starts) + 1}Q", starts[0], *starts),
    "missing the newest": lambda starts: struct.pack(f"<{len(starts) - 1}Q", *starts[:-1]),
    "names a missing segment": lambda starts: struct.pack(f"<{len(starts) + 1}Q", *starts, starts[-1] + 10**6),
}


@pytest.mark.parametrize("damage", sorted(IDX_DAMAGE))
def test_damaged_segments_idx_is_rebuilt(tmp_path, damage):
    hist = build(tmp_path)
    starts = hist.segments()
    idx = os.path.join(hist.stream_dir, "segments.idx")
    assert read(idx) == struct.pack(f"<{len(starts)}Q", *starts)
    make = IDX_DAMAGE[damage]
    if make is None:
        os.remove(idx)
    else:
        write(idx, make(starts))
    with hist.open() as wal:
        reports = wal.recover_all()
        assert len(reports) == 1 and reports[0].cut_offset is None
        assert any("segments.idx" in a for a in reports[0].actions)
        assert read(idx) == struct.pack(f"<{len(starts)}Q", *starts)
        assert_holds(wal, STREAM, hist.expected)
        grown = assert_continues(wal, STREAM, hist.expected)
        while wal.current_segment_start_id(STREAM) == starts[-1]:  # rotate once more
            grown.append(b"x" * 200)
            wal.append(STREAM, grown[-1])
    now = segment_starts(hist.stream_dir)
    assert len(now) == len(starts) + 1
    assert read(idx) == struct.pack(f"<{len(now)}Q", *now)
    with hist.open() as wal:
        assert wal.recover_all() == []
        assert_holds(wal, STREAM, grown)


def _head(name: bytes, version: int = 1) -> bytes:
    return bytes([version, len(name)]) + name


HEAD_DAMAGE = {
    "deleted": None,
    "empty": lambda starts: b"",
    "random bytes": lambda starts: _rng_bytes(2, 26),
    "wrong version": lambda starts: _head(seg_name(starts[-1]).encode(), version=2),
    "cut short": lambda starts: _head(seg_name(starts[-1]).encode())[:20],
    "length byte lies": lambda starts: bytes([1, 30]) + seg_name(starts[-1]).encode(),
    "names an older segment": lambda starts: _head(seg_name(starts[0]).encode()),
    "names a missing segment": lambda starts: _head(seg_name(starts[-1] + 10**6).encode()),
    "not a segment name": lambda starts: _head(b"x" * 24),
}


@pytest.mark.parametrize("damage", sorted(HEAD_DAMAGE))
def test_damaged_head_state_is_rebuilt(tmp_path, damage):
    hist = build(tmp_path)
    starts = hist.segments()
    head = os.path.join(hist.stream_dir, "head.state")
    good = _head(seg_name(starts[-1]).encode())
    assert read(head) == good and len(good) == 26
    make = HEAD_DAMAGE[damage]
    if make is None:
        os.remove(head)
    else:
        write(head, make(starts))
    with hist.open() as wal:
        reports = wal.recover_all()
        assert len(reports) == 1 and reports[0].cut_offset is None
        assert any("head.state" in a for a in reports[0].actions)
        assert read(head) == good
        assert_holds(wal, STREAM, hist.expected)
        grown = assert_continues(wal, STREAM, hist.expected)
    with hist.open() as wal:
        assert wal.recover_all() == []
        assert_holds(wal, STREAM, grown)


def test_both_index_files_deleted_and_tail_torn(tmp_path):
    hist = build(tmp_path)
    starts = hist.segments()
    os.remove(os.path.join(hist.stream_dir, "segments.idx"))
    os.remove(os.path.join(hist.stream_dir, "head.state"))
    path = hist.active_path
    original = read(path)
    frames = walk_frames(original)
    os.truncate(path, frames[-2].end - 5)
    with hist.open() as wal:
        wal.recover_all()
        assert_single_cut(wal, path, frames[-2].offset, original[frames[-2].offset : frames[-2].end - 5])
        assert_holds(wal, STREAM, hist.expected[: frames[-2].start_id])
    assert read(os.path.join(hist.stream_dir, "segments.idx")) == struct.pack(f"<{len(starts)}Q", *starts)
    assert read(os.path.join(hist.stream_dir, "head.state")) == _head(seg_name(starts[-1]).encode())


@pytest.mark.parametrize("stage", ["file only", "file and segments.idx", "everything but a frame"])
def test_crash_in_the_middle_of_a_rotation(tmp_path, stage):
    """The new segment exists (empty) but the rotation did not finish writing its hints."""
    hist = build(tmp_path)
    starts = hist.segments()
    n = len(hist.expected)
    new = os.path.join(hist.stream_dir, seg_name(n))
    write(new, b"")
    if stage != "file only":
        with open(os.path.join(hist.stream_dir, "segments.idx"), "ab") as fh:
            fh.write(struct.pack("<Q", n))
    if stage == "everything but a frame":
        write(os.path.join(hist.stream_dir, "head.state"), _head(seg_name(n).encode()))
    with hist.open() as wal:
        reports = wal.recover_all()
        assert all(r.cut_offset is None for r in reports)
        assert (reports == []) == (stage == "everything but a frame")
        assert_holds(wal, STREAM, hist.expected)
        assert wal.current_segment_start_id(STREAM) == n
        assert wal.first_id(STREAM) == 0
        grown = assert_continues(wal, STREAM, hist.expected)
        assert os.path.getsize(new) > 0  # the new writes went to the new segment
    assert read(os.path.join(hist.stream_dir, "segments.idx")) == struct.pack(
        f"<{len(starts) + 1}Q", *starts, n
    )
    assert read(os.path.join(hist.stream_dir, "head.state")) == _head(seg_name(n).encode())
    with hist.open() as wal:
        assert wal.recover_all() == []
        assert_holds(wal, STREAM, grown)


def test_crash_mid_rotation_after_truncation(tmp_path):
    hist = build(tmp_path)
    starts = hist.segments()
    with hist.open() as wal:
        assert wal.truncate(STREAM, starts[2]) == 2
    n = len(hist.expected)
    write(os.path.join(hist.stream_dir, seg_name(n)), b"")
    with hist.open() as wal:
        wal.recover_all()
        assert wal.first_id(STREAM) == starts[2]
        assert_holds(wal, STREAM, hist.expected, first=starts[2])
        assert wal.get(STREAM, starts[2] - 1) is None
        assert wal.append(STREAM, b"next") == n


# --- CorruptionPolicy.ERROR ------------------------------------------------------------------------


@pytest.mark.parametrize("hints", ["intact", "stale"])
@pytest.mark.parametrize("damage", ["torn payload", "partial header", "zeros", "bit flip"])
def test_error_policy_refuses_and_touches_nothing(tmp_path, damage, hints):
    hist = build(tmp_path)
    if hints == "stale":  # the index files would need rebuilding too: still touch nothing
        os.remove(os.path.join(hist.stream_dir, "segments.idx"))
        write(os.path.join(hist.stream_dir, "head.state"), b"\x01")
    path = hist.active_path
    original = read(path)
    frames = walk_frames(original)
    if damage == "torn payload":
        bad_at = frames[-1].offset
        os.truncate(path, frames[-1].end - 2)
    elif damage == "partial header":
        bad_at = len(original)
        write(path, original + MAGIC_BYTES + b"\x00" * 6)
    elif damage == "zeros":
        bad_at = len(original)
        write(path, original + bytes(1024))
    else:
        bad_at = frames[1].offset
        flip(path, frames[1].offset + HDR_SIZE, 5)
    before = snapshot(hist.root)
    wal = hist.open(on_corruption=CorruptionPolicy.ERROR)
    try:
        for attempt in (
            wal.recover_all,
            lambda: list(wal.iter(STREAM, 0)),
            lambda: wal.get(STREAM, 0),
            lambda: wal.append(STREAM, b"refused"),
            lambda: wal.next_id(STREAM),
        ):
            with pytest.raises(CorruptionError) as info:
                attempt()
            err = info.value
            assert err.path == path
            assert err.offset == bad_at
            assert path in str(err) and str(bad_at) in str(err)
        assert wal.recovery_reports == []
    finally:
        wal.close()
    assert snapshot(hist.root) == before, "the ERROR policy must not change any file"
    assert not any(name.endswith(".broken") for name in os.listdir(hist.stream_dir))
    # the TRUNCATE policy then repairs the very same files
    with hist.open() as wal:
        wal.recover_all()
        assert_single_cut(wal, path, bad_at, before[os.path.relpath(path, hist.root)][bad_at:])
        bad_frames = [f for f in frames if f.offset == bad_at]
        survivors = hist.expected[: bad_frames[0].start_id] if bad_frames else hist.expected
        assert_holds(wal, STREAM, survivors)


def test_error_policy_with_a_healthy_stream_opens_normally(tmp_path):
    hist = build(tmp_path)
    with hist.open(on_corruption=CorruptionPolicy.ERROR) as wal:
        assert wal.recover_all() == []
        assert_holds(wal, STREAM, hist.expected)
        assert_continues(wal, STREAM, hist.expected)


# --- the disk fails under a live process -----------------------------------------------------------


@pytest.mark.parametrize("how", ["append", "batch", "transaction"])
def test_disk_full_in_the_middle_of_a_frame_leaves_no_torn_bytes(tmp_path, monkeypatch, how):
    import errno

    from ironwal_mp import DiskFullError
    from ironwal_mp.engine import layout

    hist = build(tmp_path)
    with hist.open(sync_mode=SyncMode.STRICT) as wal:
        wal.recover_all()
        path = os.path.join(hist.stream_dir, seg_name(wal.current_segment_start_id(STREAM)))
        size = os.path.getsize(path)
        real = layout.write_all

        def half_then_enospc(fd, data):
            if bytes(data[:4]) != MAGIC_BYTES:  # only frame writes hit the full disk
                return real(fd, data)
            real(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(layout, "write_all", half_then_enospc)
        with pytest.raises(DiskFullError):
            if how == "append":
                wal.append(STREAM, b"lost" * 10)
            elif how == "batch":
                wal.append_batch(STREAM, [b"lost"] * 5)
            else:
                with wal.writer(STREAM) as txn:
                    txn.add(b"lost")
                    txn.add(b"too")
        monkeypatch.setattr(layout, "write_all", real)
        assert os.path.getsize(path) == size, "the partial frame must be rolled back"
        assert wal.next_id(STREAM) == len(hist.expected)
        grown = assert_continues(wal, STREAM, hist.expected)
    with hist.open() as wal:
        assert wal.recover_all() == []
        assert_holds(wal, STREAM, grown)


def test_failed_rotation_keeps_every_acknowledged_entry(tmp_path, monkeypatch):
    """head.state cannot be written during a rotation: the call fails, the stream refuses
    further writes, and a reopen finds every acknowledged entry and continues after it."""
    import errno

    from ironwal_mp import StreamFailedError, WalError
    from ironwal_mp.engine import layout

    hist = build(tmp_path)

    def eio(*_args):
        raise OSError(errno.EIO, "Input/output error")

    acked = list(hist.expected)
    with hist.open(sync_mode=SyncMode.STRICT) as wal:
        wal.recover_all()
        monkeypatch.setattr(layout, "write_head_state", eio)
        failures = []
        for i in range(80):  # enough to need a rotation
            data = b"r%03d" % i + b"." * 40
            try:
                assert wal.append(STREAM, data) == len(acked)
                acked.append(data)
            except WalError as exc:
                failures.append(exc)
        monkeypatch.undo()
        assert failures, "no rotation happened"
        assert not isinstance(failures[0], StreamFailedError)
        assert all(isinstance(f, StreamFailedError) for f in failures[1:])
        assert wal.next_id(STREAM) == len(acked)
    with hist.open() as wal:
        reports = wal.recover_all()
        assert all(r.cut_offset is None for r in reports)
        assert_holds(wal, STREAM, acked)
        grown = assert_continues(wal, STREAM, acked)
    with hist.open() as wal:
        assert wal.recover_all() == []
        assert_holds(wal, STREAM, grown)
