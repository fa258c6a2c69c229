"""A read-only Wal following a stream that another handle or process writes (Wal.refresh), and
the errors for writes through a read-only handle or a finished transaction."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from ironwal_mp import CompressionType, ReadStrategy, SyncMode, Wal, WalOptions
from ironwal_mp.engine import layout
from ironwal_mp.errors import (
    ConcurrentTruncationError, InvalidStreamNameError, ReadOnlyError, TransactionClosedError, WalClosedError,
    WalError,
)

READERS = [
    dict(read_strategy=ReadStrategy.STANDARD_IO),
    dict(read_strategy=ReadStrategy.MMAP),
    dict(read_strategy=ReadStrategy.STANDARD_IO, block_cache_size=1 << 20),
    dict(read_strategy=ReadStrategy.MMAP, block_cache_size=1 << 20, read_buffer_size=64),
]
READER_IDS = ["pread", "mmap", "pread+cache", "mmap+cache+small-chunks"]


def _opts(path, **kw):
    kw.setdefault("sync_mode", SyncMode.ASYNC)
    return WalOptions(root_path=str(path), **kw)


def _entry(i: int) -> bytes:
    """Entry ``i``: its id in it, and a size (and compressibility) that varies with it."""
    return b"%08d:" % i + (b"z" * (i % 7) * 40 if i % 3 else hashlib.sha256(b"%d" % i).digest()[: i % 32])


def _check_prefix(reader: Wal, stream: str, expected: list) -> None:
    n = reader.next_id(stream)
    got = list(reader.iter(stream, 0))
    assert len(got) == n <= len(expected)
    for i, value in enumerate(got):
        assert value == expected[i], i


# --- following a writer in the same process ---------------------------------------------------


@pytest.mark.parametrize("reader_kw", READERS, ids=READER_IDS)
def test_a_reader_sees_new_entries_segments_and_truncations_only_after_refresh(tmp_path, reader_kw):
    with Wal(_opts(tmp_path, max_segment_size=1024)) as w, Wal(_opts(tmp_path, **reader_kw), read_only=True) as r:
        written = []
        for i in range(5):
            written.append(_entry(i))
            w.append("s", written[-1])
        assert list(r.iter("s")) == written  # first use reads what is there
        for i in range(5, 200):
            written.append(_entry(i))
            w.append("s", written[-1])
        assert r.next_id("s") == 5 and r.get("s", 5) is None  # a stable view until refresh
        r.refresh("s")
        assert w.current_segment_start_id("s") > 0, "the test needs rotations"
        assert list(r.iter("s")) == written
        assert r.next_id("s") == 200
        assert r.current_segment_start_id("s") == w.current_segment_start_id("s")
        assert r.get("s", 199) == written[199] and r.get("s", 17) == written[17]

        ids = w.append_batch("s", [b"batch-%d" % k for k in range(30)])
        r.refresh()  # every stream the handle has used
        assert r.next_id("s") == ids.stop and r.get("s", ids.start + 29) == b"batch-29"

        safe = w.current_segment_start_id("s")
        assert w.truncate("s", safe) > 0
        r.refresh("s")
        assert r.first_id("s") == w.first_id("s") == safe
        assert r.get("s", 0) is None and r.get("s", safe) == w.get("s", safe)
        assert list(r.iter("s", 0)) == list(w.iter("s", 0))


def test_refresh_keeps_one_view_per_call_and_iterators_keep_theirs(tmp_path):
    with Wal(_opts(tmp_path, max_segment_size=512)) as w, Wal(_opts(tmp_path), read_only=True) as r:
        for i in range(50):
            w.append("s", _entry(i))
        it = r.iter("s")
        first = next(it)
        for i in range(50, 100):
            w.append("s", _entry(i))
        r.refresh("s")
        assert [first] + list(it) == [_entry(i) for i in range(50)]  # the view it began with
        assert len(list(r.iter("s"))) == 100


def test_a_stream_created_after_the_reader_opened_is_seen_at_first_use(tmp_path):
    with Wal(_opts(tmp_path)) as w, Wal(_opts(tmp_path), read_only=True) as r:
        assert r.next_id("late") == 0 and r.streams() == []
        r.refresh("late")  # never used with content: nothing to follow, no error
        w.append("late", b"x")
        assert r.streams() == ["late"] and list(r.iter("late")) == [b"x"]


@pytest.mark.parametrize("reader_kw", READERS, ids=READER_IDS)
def test_every_byte_prefix_of_a_write_shows_exactly_the_whole_frames(tmp_path, reader_kw):
    """The writer's files are copied to the reader's directory a few bytes at a time, in the
    order a writer produces them; after each step the reader shows exactly the frames that
    are complete and never a partial one."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    expected, frame_ends = [], []  # frame_ends: (segment start, offset past the frame, next id)
    with Wal(_opts(src, max_segment_size=700, compression=CompressionType.LZ4, min_compression_size=64)) as w:
        for i in range(40):
            if i % 4 == 3:
                batch = [_entry(1000 + i * 10 + k) for k in range(3)]
                w.append_batch("s", batch)
                expected.extend(batch)
            else:
                expected.append(_entry(i))
                w.append("s", expected[-1])
            view = w._streams["s"].view()
            frame_ends.append((view.segments[-1], view.active_size, view.next_id))
    sdir = src / "s"
    segments = layout.list_segments(str(sdir))
    assert len(segments) > 2, "the test needs rotations"
    os.makedirs(dst / "s")
    with Wal(_opts(dst, **reader_kw), read_only=True) as r:
        assert r.next_id("s") == 0
        for start in segments:
            data = (sdir / layout.segment_name(start)).read_bytes()
            out = dst / "s" / layout.segment_name(start)
            out.write_bytes(b"")
            for size in range(0, len(data) + 1, 5 if len(data) > 400 else 1):
                with open(out, "r+b") as fh:
                    fh.seek(0)
                    fh.write(data[:size])
                r.refresh("s")
                whole = [e for e in frame_ends if e[0] < start or (e[0] == start and e[1] <= size)]
                want = whole[-1][2] if whole else 0
                assert r.next_id("s") == want, (start, size)
            with open(out, "r+b") as fh:
                fh.write(data)
            r.refresh("s")
            _check_prefix(r, "s", expected)
        assert list(r.iter("s")) == expected


def test_a_torn_tail_stops_the_reader_until_a_writer_repairs_it(tmp_path):
    opts = _opts(tmp_path)
    with Wal(opts) as w:
        for i in range(10):
            w.append("s", _entry(i))
    seg = tmp_path / "s" / layout.segment_name(0)
    good = seg.stat().st_size
    with open(seg, "ab") as fh:  # a crashed writer's half frame
        fh.write(b"LWAL" + bytes(10))
    with Wal(opts, read_only=True) as r:
        assert r.next_id("s") == 10
        r.refresh("s")
        assert r.next_id("s") == 10
        with Wal(opts) as w2:  # recovery cuts the tail; new frames take its place
            reports = w2.recover_all()
            assert len(reports) == 1 and reports[0].cut_offset == good
            w2.append("s", b"after")
            r.refresh("s")
            assert r.next_id("s") == 11 and r.get("s", 10) == b"after"
            assert list(r.iter("s")) == [_entry(i) for i in range(10)] + [b"after"]


@pytest.mark.parametrize("reader_kw", READERS, ids=READER_IDS)
def test_a_replaced_stream_is_read_afresh(tmp_path, reader_kw):
    """A stream deleted and written again from id 0 (its files are new ones of the same names):
    nothing the reader cached for the old files is used."""
    with Wal(_opts(tmp_path, max_segment_size=600)) as w:
        for i in range(60):
            w.append("s", _entry(i))
    with Wal(_opts(tmp_path, **reader_kw), read_only=True) as r:
        assert r.get("s", 3) == _entry(3) and len(list(r.iter("s"))) == 60
        shutil.rmtree(tmp_path / "s")
        r.refresh("s")
        assert r.next_id("s") == 0 and list(r.iter("s")) == [] and r.first_id("s") is None
        with Wal(_opts(tmp_path, max_segment_size=600)) as w:
            for i in range(40):
                w.append("s", b"new-%d" % i)
            r.refresh("s")
            assert list(r.iter("s")) == [b"new-%d" % i for i in range(40)]
            assert r.get("s", 3) == b"new-3"
        shutil.rmtree(tmp_path / "s")
        with Wal(_opts(tmp_path)) as w:  # same active segment name, another file, longer
            w.append_batch("s", [b"third-%d" % i for i in range(500)])
        r.refresh("s")
        assert r.get("s", 3) == b"third-3" and r.next_id("s") == 500


@pytest.mark.parametrize("reader_kw", READERS, ids=READER_IDS)
def test_an_active_segment_replaced_or_cut_in_place_is_read_afresh(tmp_path, reader_kw):
    """One segment throughout, so only the file itself tells the change: another file of the
    same name (longer, then shorter), then the same file cut short (as a power loss may)."""
    with Wal(_opts(tmp_path, **reader_kw), read_only=True) as r:
        for tag, count in ((b"p", 5), (b"q", 50), (b"r", 2)):
            shutil.rmtree(tmp_path / "s", ignore_errors=True)
            with Wal(_opts(tmp_path)) as w:
                for i in range(count):
                    w.append("s", tag + b"-%d" % i)
            r.refresh("s")
            assert list(r.iter("s")) == [tag + b"-%d" % i for i in range(count)]
            assert r.get("s", 1) == tag + b"-1"
        with Wal(_opts(tmp_path)) as w:
            for i in range(2, 30):
                w.append("s", b"r-%d" % i)
        r.refresh("s")
        assert r.get("s", 29) == b"r-29"
        seg = tmp_path / "s" / layout.segment_name(0)
        os.truncate(seg, seg.stat().st_size // 2)  # (a frame may be cut in two)
        r.refresh("s")
        kept = r.next_id("s")
        assert 0 < kept < 30
        assert list(r.iter("s")) == [b"r-%d" % i for i in range(kept)]
        with Wal(_opts(tmp_path)) as w:  # a writer repairs the cut and goes on
            w.append("s", b"again")
        r.refresh("s")
        assert r.get("s", kept) == b"again" and r.next_id("s") == kept + 1


@pytest.mark.parametrize("reader_kw", READERS, ids=READER_IDS)
@pytest.mark.parametrize("new_per_segment", [5, 3])
def test_a_replaced_stream_is_read_afresh_when_the_reader_lags_past_a_rotation(tmp_path, reader_kw, new_per_segment):
    """The new writer rotated past the reader's old active segment: that segment, now sealed,
    is checked too (review: the reader returned old bytes, or a false CorruptionError)."""
    with Wal(_opts(tmp_path, max_entries_per_segment=5)) as w:
        for i in range(5):
            w.append("s", b"old-%d" % i)
    with Wal(_opts(tmp_path, **reader_kw), read_only=True) as r:
        assert list(r.iter("s")) == [b"old-%d" % i for i in range(5)]
        shutil.rmtree(tmp_path / "s")
        with Wal(_opts(tmp_path, max_entries_per_segment=new_per_segment)) as w:
            for i in range(7):
                w.append("s", b"new-%d" % i)
        r.refresh("s")
        assert list(r.iter("s")) == [b"new-%d" % i for i in range(7)]
        assert r.get("s", 2) == b"new-2"


def test_a_replaced_segment_is_told_by_its_contents_not_its_inode(tmp_path):
    """ext4 hands a new file the inode number of one just deleted; a reader that never read
    the old file holds no descriptor that would keep the number taken (review)."""
    with Wal(_opts(tmp_path)) as w:
        for i in range(3):
            w.append("s", b"old-%d-" % i + b"x" * 40)
    with Wal(_opts(tmp_path), read_only=True) as r:
        assert r.next_id("s") == 3  # first use: scanned on its own descriptor, none kept
        shutil.rmtree(tmp_path / "s")
        with Wal(_opts(tmp_path)) as w:
            for i in range(10):
                w.append("s", b"new-%d" % i)
        r.refresh("s")
        assert r.next_id("s") == 10
        assert list(r.iter("s")) == [b"new-%d" % i for i in range(10)]


def test_reads_under_an_old_view_cache_nothing_a_rebuilt_view_reads(tmp_path):
    """An iterator still running on the old view caches blocks after the refresh dropped the
    old files' entries; they must not be served for the new files of the same names (review)."""
    kw = dict(max_entries_per_segment=5)
    with Wal(_opts(tmp_path, block_cache_size=1 << 20, **kw), read_only=True) as r:
        with Wal(_opts(tmp_path, **kw)) as w:
            for i in range(12):
                w.append("s", b"old-%d" % i)  # segments 0, 5, 10
            assert r.get("s", 0) == b"old-0"
            it = r.iter("s", 0)
            assert next(it) == b"old-0"
            w.truncate("s", 5)
            r.refresh("s")
            rest = list(it)  # (the view it started with; its segment 0 was already open)
            assert rest[:4] == [b"old-%d" % i for i in range(1, 5)]
        shutil.rmtree(tmp_path / "s")
        with Wal(_opts(tmp_path, **kw)) as w:
            for i in range(7):
                w.append("s", b"new-%d" % i)
        r.refresh("s")
        assert r.get("s", 1) == b"new-1"
        assert list(r.iter("s")) == [b"new-%d" % i for i in range(7)]


def test_the_readme_consumer_loop_reads_each_kept_id_once_across_truncations(tmp_path):
    """The README's tailing loop, against a writer that truncates ahead of it: every id it
    hands on is the entry with that id, none twice, and what it missed was truncated."""
    kw = dict(max_entries_per_segment=10)
    handled = {}
    with Wal(_opts(tmp_path, **kw)) as w, Wal(_opts(tmp_path, **kw), read_only=True) as reader:
        w.append_batch("orders", [b"e%d" % i for i in range(10)])  # (so the reader stops on segment boundaries)
        pos = 0
        for rnd in range(6):
            reader.refresh("orders")
            if rnd == 4:  # truncate between the refresh and the iteration's start
                w.truncate("orders", w.current_segment_start_id("orders"))
            try:
                for seq, data in reader.iter("orders", pos, with_ids=True):
                    assert seq not in handled and seq >= pos
                    handled[seq] = data
                    pos = seq + 1
                    if rnd == 3 and pos % 10 == 5:  # truncate under the iteration
                        w.truncate("orders", w.current_segment_start_id("orders"))
            except ConcurrentTruncationError:
                pass
            for i in range(w.next_id("orders"), w.next_id("orders") + 30):
                w.append("orders", b"e%d" % i)
            if rnd in (0, 2):
                w.truncate("orders", w.next_id("orders") - 12)
        reader.refresh("orders")
        for seq, data in reader.iter("orders", pos, with_ids=True):
            handled[seq] = data
            pos = seq + 1
        assert pos == w.next_id("orders")
    assert all(data == b"e%d" % i for i, data in handled.items())
    missed = sorted(set(range(pos)) - set(handled))
    assert missed and len(handled) > 60  # (the test did truncate ahead of the reader)


def test_iter_raises_rather_than_skip_ids_truncated_after_its_view(tmp_path):
    """Asked from an id at or after the view's first, an iteration whose segment is deleted
    before it reads it raises; asked from below the view's first, it starts at the first kept."""
    kw = dict(max_entries_per_segment=5)
    with Wal(_opts(tmp_path, **kw)) as w, Wal(_opts(tmp_path, **kw), read_only=True) as r:
        w.append_batch("s", [b"a"] * 4)
        for i in range(16):
            w.append("s", b"%d" % i)
        r.refresh("s")
        it = r.iter("s", 6)  # the view says 0..19 are readable
        w.truncate("s", 10)  # segments 0 and 5 go before it reads anything
        with pytest.raises(ConcurrentTruncationError):
            next(it)
        with pytest.raises(ConcurrentTruncationError):
            next(r.iter("s", 0))  # the view's first id is 0: asked for exactly, and gone
        r.refresh("s")
        assert r.first_id("s") == 10
        it = r.iter("s", 3)  # below the view's first: "from the first kept", wherever that is
        w.truncate("s", 15)
        assert next(it) == b"11"  # id 15


def test_durable_id_of_a_reader_counts_only_sealed_segments(tmp_path):
    with Wal(_opts(tmp_path, max_segment_size=400)) as w:
        w.append("s", b"a" * 50)
        with Wal(_opts(tmp_path), read_only=True) as r:
            assert r.durable_id("s") == 0  # the active segment may not be synced yet
            for _ in range(30):
                w.append("s", os.urandom(50))
            r.refresh("s")
            assert r.durable_id("s") == w.current_segment_start_id("s") > 0


def test_refresh_argument_and_state_errors(tmp_path):
    with Wal(_opts(tmp_path)) as w:
        w.append("s", b"x")
        w.refresh()  # a writer sees its own writes: nothing to do
        w.refresh("s")
        with pytest.raises(InvalidStreamNameError):
            w.refresh("../s")
    r = Wal(_opts(tmp_path), read_only=True)
    with pytest.raises(InvalidStreamNameError):
        r.refresh("a/b")
    r.close()
    with pytest.raises(WalClosedError):
        r.refresh()


# --- a writer in another process ----------------------------------------------------------------

_WRITER = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, sys.argv[1])
    from ironwal_mp import Wal, WalOptions, SyncMode
    from tests.test_engine_follow import _entry
    total = int(sys.argv[3])
    with Wal(WalOptions(root_path=sys.argv[2], sync_mode=SyncMode.ASYNC, max_segment_size=8192)) as w:
        i = 0
        while i < total:
            n = 1 + i % 5
            if n == 1:
                w.append("s", _entry(i))
            else:
                w.append_batch("s", [_entry(i + k) for k in range(min(n, total - i))])
            i = w.next_id("s")
            if i % 997 < 5:
                w.truncate("s", max(0, i - 3000))
    """
)


def test_a_reader_follows_a_writer_process_and_never_sees_a_partial_or_wrong_entry(tmp_path):
    total = 12000
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.makedirs(tmp_path / "s")  # (so the reader can open before the first write)
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, root, str(tmp_path), str(total)])
    try:
        with Wal(_opts(tmp_path, read_strategy=ReadStrategy.MMAP, block_cache_size=1 << 20), read_only=True) as r:
            pos, last_next, looks, restarts = 0, 0, 0, 0
            while True:
                done = proc.poll() is not None
                r.refresh("s")
                looks += 1
                n = r.next_id("s")
                assert n >= last_next, "a reader's end never moves back"
                last_next = n
                try:
                    for value in r.iter("s", pos):
                        first = r.first_id("s")
                        pos = max(pos, first or 0)
                        assert value == _entry(pos), pos
                        pos += 1
                except ConcurrentTruncationError:
                    restarts += 1
                pos = max(pos, r.first_id("s") or 0)  # (truncated away before it was read)
                if done and pos >= n:
                    break
            assert proc.returncode == 0
            assert n == total and pos == total
            assert looks > 3, "the reader should have looked while the writer wrote"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


# --- errors for writes that cannot be made ------------------------------------------------------


def test_writes_through_a_read_only_handle_raise_read_only_error(tmp_path):
    with Wal(_opts(tmp_path)) as w:
        w.append("s", b"x")
    with Wal(_opts(tmp_path), read_only=True) as r:
        r.get("s", 0)
        for attempt in (
            lambda: r.append("s", b"y"),
            lambda: r.append("new", b"y"),
            lambda: r.append_batch("s", [b"y"]),
            lambda: r.writer("s"),
            lambda: r.sync(),
            lambda: r.sync("s"),
            lambda: r.truncate("s", 1),
        ):
            with pytest.raises(ReadOnlyError):
                attempt()
        assert issubclass(ReadOnlyError, WalError)
        assert list(r.iter("s")) == [b"x"] and r.streams() == ["s"]
    assert not os.path.exists(tmp_path / "new")


def test_a_finished_transaction_raises_transaction_closed_error(tmp_path):
    with Wal(_opts(tmp_path)) as w:
        txn = w.writer("s")
        txn.add(b"a")
        assert txn.commit() == range(0, 1)
        with pytest.raises(TransactionClosedError):
            txn.commit()
        with pytest.raises(TransactionClosedError):
            txn.add(b"b")
        txn2 = w.writer("s")
        txn2.add(b"c")
        txn2.rollback()
        with pytest.raises(TransactionClosedError):
            txn2.commit()
        assert list(w.iter("s")) == [b"a"]


# --- segments placed from outside ----------------------------------------------------------------


@pytest.mark.parametrize("stray", [1036, 20], ids=["past-the-end", "inside"])
def test_a_follower_does_not_adopt_a_stray_empty_segment(tmp_path, stray):
    """An empty file named like a segment, placed after the reader opened (a bad copy, a restore
    mixing two backups) while the writer goes on: a refresh took it for the active segment, so
    the view's ids jumped to its name (past the end) or shadowed acknowledged ones (inside),
    and hid what the writer added after. A writer's recovery sets such a file aside."""
    with Wal(_opts(tmp_path)) as w, Wal(_opts(tmp_path), read_only=True) as r:
        written = [_entry(i) for i in range(40)]
        w.append_batch("s", written)
        assert r.next_id("s") == 40
        stream_dir = os.path.join(str(tmp_path), "s")
        open(os.path.join(stream_dir, layout.segment_name(stray)), "wb").close()
        r.refresh("s")
        assert r.next_id("s") == 40 and r.current_segment_start_id("s") == 0
        for i in range(40, 50):
            written.append(_entry(i))
            w.append("s", written[-1])
        r.refresh("s")
        assert r.next_id("s") == 50
        _check_prefix(r, "s", written)
        assert r.get("s", 20) == written[20] and r.get("s", 49) == written[49]


def test_a_stray_empty_segment_stays_out_once_the_writer_rotates_past_it(tmp_path):
    """The stray above, inside the ids of the active segment, left out while it is the newest:
    once the writer rotates, it is no longer the newest file, and a refresh took it in as a
    sealed segment, where it shadowed the ids below the rotation (CorruptionError for them)."""
    opts = _opts(tmp_path, max_segment_size=4096)
    with Wal(opts) as w, Wal(opts, read_only=True) as r:
        written = [_entry(i) for i in range(40)]
        w.append_batch("s", written)
        assert r.next_id("s") == 40
        stream_dir = os.path.join(str(tmp_path), "s")
        open(os.path.join(stream_dir, layout.segment_name(20)), "wb").close()
        r.refresh("s")
        while w.current_segment_start_id("s") == 0:
            written.append(_entry(len(written)))
            w.append("s", written[-1])
        for _ in range(2):  # (the next look too, when the view already continues past it)
            r.refresh("s")
            assert r.next_id("s") == len(written)
            _check_prefix(r, "s", written)
            assert r.get("s", 20) == written[20] and r.get("s", 39) == written[39]
        assert layout.list_segments(stream_dir) == [0, 20, w.current_segment_start_id("s")]


def test_a_follower_adopts_the_empty_segment_a_rotation_leaves(tmp_path):
    """The check above must not hold back a real rotation: its new file, still empty (as a
    rotation or a crash right after one leaves it), starts one past the last id of the segment
    before, which that segment's last frame shows."""
    with Wal(_opts(tmp_path)) as w:
        w.append_batch("s", [_entry(i) for i in range(39)])
        w.append("s", _entry(39))
    stream_dir = os.path.join(str(tmp_path), "s")
    with Wal(_opts(tmp_path), read_only=True) as r:
        assert r.next_id("s") == 40
        open(os.path.join(stream_dir, layout.segment_name(40)), "wb").close()
        r.refresh("s")
        assert r.current_segment_start_id("s") == 40 and r.next_id("s") == 40
        with Wal(_opts(tmp_path)) as w:  # (its recovery takes the file as the active segment)
            assert w.append("s", b"after") == 40
        r.refresh("s")
        assert r.get("s", 40) == b"after" and r.get("s", 39) == _entry(39)
