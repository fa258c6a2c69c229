"""Tests written from a mutation audit of engine/stream.py and engine/wal.py: each one kills a
mutant the rest of the suite let survive."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import threading
from array import array

import pytest

import crashfs
from conftest import open_files_under
from ironwal_mp import CompressionType, CorruptionPolicy, GroupSync, SyncMode, Wal, WalOptions
from ironwal_mp.engine import layout
from ironwal_mp.engine import stream as stream_mod
from ironwal_mp.engine import wal as wal_mod
from ironwal_mp.engine.frame import encode_entries
from ironwal_mp.errors import (DiskFullError, ReadOnlyError, RecordTooLargeError, StreamFailedError,
                               TransactionClosedError, WalClosedError, WalIOError)

STREAM = "s"


def _opts(root, **kw) -> WalOptions:
    base = dict(root_path=str(root), sync_mode=SyncMode.ASYNC, compression=CompressionType.NONE,
                group_sync=GroupSync.FDATASYNC)
    base.update(kw)
    return WalOptions(**base)


def _seg(root, start: int) -> str:
    return os.path.join(str(root), STREAM, layout.segment_name(start))


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def failing_write(monkeypatch):
    """Appends of a frame holding b"FAIL" fail with ENOSPC (nothing of it is written)."""
    real = layout.write_all

    def write_all(fd, data):
        if b"FAIL" in bytes(data):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(layout, "write_all", write_all)


# --- engine/stream.py: statistics and limits -----------------------------------------------------


def test_stream_stats_count_the_bytes_written_and_one_fsync_per_rotation(tmp_path):
    """stream_stats: "bytes" is what the frames take on disk, "fsyncs" counts the one fdatasync
    that seals a segment at rotation (an ASYNC stream syncs nothing else here)."""
    with Wal(_opts(tmp_path, max_entries_per_segment=1)) as wal:
        wal.append(STREAM, b"first")
        wal.append(STREAM, b"second")  # rotates to segment 1
        stats = wal.stream_stats(STREAM)
        on_disk = os.path.getsize(_seg(tmp_path, 0)) + os.path.getsize(_seg(tmp_path, 1))
        assert stats["frames"] == 2
        assert stats["bytes"] == on_disk
        assert stats["fsyncs"] == 1


def test_a_payload_of_exactly_the_largest_size_is_written(tmp_path, monkeypatch):
    """A batch payload as large as the frame format allows is written; one byte more is refused
    (the limit is scaled down here so that the test stays small)."""
    monkeypatch.setattr(stream_mod, "MAX_PAYLOAD", 64)
    with Wal(_opts(tmp_path)) as wal:
        s = wal.open_stream(STREAM)
        fits = encode_entries([b"x" * 60])
        assert len(fits) == 64
        assert s.append_payload(fits, 1) == 0
        with pytest.raises(RecordTooLargeError):
            s.append_payload(encode_entries([b"x" * 61]), 1)
        assert wal.get(STREAM, 0) == b"x" * 60
        assert wal.next_id(STREAM) == 1


def test_segment_files_are_created_0644(tmp_path, umask_022):
    """The first segment and those rotation creates are rw-r--r--."""
    with Wal(_opts(tmp_path, max_entries_per_segment=1)) as wal:
        for i in range(3):
            wal.append(STREAM, b"%d" % i)
    for start in (0, 1, 2):
        assert os.stat(_seg(tmp_path, start)).st_mode & 0o777 == 0o644


# --- engine/stream.py: rotation ----------------------------------------------------------------


def test_rotation_leaves_no_descriptor_open(tmp_path):
    """Creating the new segment at rotation closes its descriptor: once the handle is closed
    nothing under the root is open."""
    with Wal(_opts(tmp_path, max_entries_per_segment=1)) as wal:
        for i in range(4):
            wal.append(STREAM, b"%d" % i)
        assert wal.current_segment_start_id(STREAM) == 3
    assert open_files_under(str(tmp_path), "") == []


def test_a_failed_write_just_after_a_rotation_leaves_the_new_segment_empty(tmp_path, failing_write):
    """A frame that fails (rolled back) right after a rotation leaves the new active segment
    empty: the next frames go in from its start, without a second rotation, and read back."""
    with Wal(_opts(tmp_path, max_entries_per_segment=2)) as wal:
        wal.append(STREAM, b"a")
        wal.append(STREAM, b"b")
        with pytest.raises(DiskFullError):
            wal.append(STREAM, b"FAIL")  # rotates to segment 2, then the write fails
        assert wal.current_segment_start_id(STREAM) == 2
        assert wal.append(STREAM, b"c") == 2
        assert wal.append(STREAM, b"d") == 3
        assert [wal.get(STREAM, i) for i in range(4)] == [b"a", b"b", b"c", b"d"]
        assert list(wal.iter(STREAM, 3)) == [b"d"]
        assert layout.read_segments_idx(os.path.join(str(tmp_path), STREAM)) == [0, 2]


def test_a_segment_named_by_rotation_survives_any_power_loss(tmp_path):
    """A rotation makes the new segment's name durable before segments.idx names it: no power
    loss leaves an index naming a missing segment (which an ERROR-policy open refuses)."""
    top = tmp_path / "top"
    top.mkdir()
    root = str(top / "wal")
    rec = crashfs.Recorder(str(top))
    with rec.recording():
        with Wal(_opts(root, sync_mode=SyncMode.STRICT, max_entries_per_segment=1)) as wal:
            for i in range(3):
                wal.append(STREAM, b"%d" % i)
    checked = 0
    for point in rec.points:
        tree, data = point.power_loss()
        dest = crashfs.scratch(str(tmp_path), "state")
        crashfs.materialize(tree, data, dest)
        wal_dir = os.path.join(dest, "wal")
        if not os.path.isdir(os.path.join(wal_dir, STREAM)):
            continue
        with Wal(_opts(wal_dir, on_corruption=CorruptionPolicy.ERROR)) as wal:
            wal.recover_all()  # raises CorruptionError for an index naming a lost segment
        checked += 1
    assert checked > 3


# --- engine/stream.py: durability --------------------------------------------------------------


class _NoEnter:
    def __enter__(self):
        raise AssertionError("the sync lock was taken")

    def __exit__(self, *exc):
        return False


def test_a_caller_already_durable_does_not_wait_for_the_sync_lock(tmp_path):
    """make_durable returns at once for ids already durable, without queueing behind an fsync
    that another caller may be running."""
    with Wal(_opts(tmp_path, sync_mode=SyncMode.STRICT)) as wal:
        wal.append(STREAM, b"x")
        s = wal.open_stream(STREAM)
        assert s.durable_id == 1
        real, s.sync_lock = s.sync_lock, _NoEnter()
        try:
            s.make_durable(1)
            s.make_durable(0)
        finally:
            s.sync_lock = real


class _SignallingLock:
    """A lock that tells when someone starts waiting for it."""

    def __init__(self):
        self.lock = threading.Lock()
        self.waiting = threading.Event()

    def __enter__(self):
        self.waiting.set()
        self.lock.acquire()
        return self

    def __exit__(self, *exc):
        self.lock.release()
        return False


def test_a_caller_covered_while_it_waited_for_the_sync_lock_does_not_fsync_again(tmp_path, monkeypatch):
    """Group commit: a STRICT appender whose ids another caller's fsync made durable while it
    waited for the sync lock returns without an fsync of its own."""
    fdatasyncs = []
    real_fdatasync = stream_mod._fdatasync
    monkeypatch.setattr(stream_mod, "_fdatasync", lambda fd: (fdatasyncs.append(fd), real_fdatasync(fd)))
    with Wal(_opts(tmp_path, sync_mode=SyncMode.STRICT)) as wal:
        s = wal.open_stream(STREAM)
        gate = s.sync_lock = _SignallingLock()
        gate.lock.acquire()  # as if another caller were fsyncing
        result = []
        appender = threading.Thread(target=lambda: result.append(wal.append(STREAM, b"x")))
        appender.start()
        try:
            assert gate.waiting.wait(30)
            assert s.next_id == 1 and s.durable_id == 0
            target, _ = s.sync_target()
            s.mark_durable(target)  # the other caller's fsync covered id 0
        finally:
            gate.lock.release()
            appender.join(30)
        assert result == [0]
        assert fdatasyncs == []
        assert wal.stream_stats(STREAM)["fsyncs"] == 1


def test_a_sync_whose_segment_was_sealed_and_truncated_meanwhile_succeeds(tmp_path):
    """make_durable finding its segment deleted returns quietly when the rotation that sealed it
    made its ids durable, even when that rotation covered exactly the ids asked for."""
    with Wal(_opts(tmp_path, max_entries_per_segment=1)) as wal:
        wal.append(STREAM, b"a")
        s = wal.open_stream(STREAM)
        cache = s.reader.fdcache
        real = cache.acquire
        first = _seg(tmp_path, 0)
        done = []

        def acquire(path, writable=False):
            if path == first and not done:
                done.append(True)
                wal.append(STREAM, b"b")  # rotates: segment 0 sealed, ids below 1 durable
                assert wal.truncate(STREAM, 1) == 1  # and segment 0 deleted
            return real(path, writable)

        cache.acquire = acquire
        try:
            s.make_durable(1)
        finally:
            del cache.acquire
        assert done and not os.path.exists(first)
        assert s.durable_id == 1
        assert wal.get(STREAM, 1) == b"b"


# --- engine/stream.py: error messages ----------------------------------------------------------


def test_a_rolled_back_write_does_not_claim_the_stream_refuses_writes(tmp_path, failing_write):
    """A failed append cut back to the frame boundary leaves the stream writable, and its error
    says so by not saying it refuses writes."""
    with Wal(_opts(tmp_path)) as wal:
        wal.append(STREAM, b"a")
        with pytest.raises(DiskFullError) as info:
            wal.append(STREAM, b"FAIL")
        assert "refuses writes" not in str(info.value)
        assert wal.append(STREAM, b"b") == 1


def test_a_write_that_cannot_be_rolled_back_says_the_stream_refuses_writes(tmp_path, failing_write, monkeypatch):
    """When the partial frame cannot be cut off either, the error says the stream now refuses
    writes, and it does."""
    with Wal(_opts(tmp_path)) as wal:
        wal.append(STREAM, b"a")

        def ftruncate(fd, size):
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(os, "ftruncate", ftruncate)
        with pytest.raises(DiskFullError) as info:
            wal.append(STREAM, b"FAIL")
        monkeypatch.undo()
        assert "refuses writes" in str(info.value)
        with pytest.raises(StreamFailedError):
            wal.append(STREAM, b"b")


def _three_segments(wal):
    for i in range(3):
        wal.append(STREAM, b"%d" % i)  # segments 0, 1, 2 (one entry each)


def test_a_truncation_that_deleted_nothing_says_nothing_was_kept(tmp_path, monkeypatch):
    """A full disk failing the first deletion: the DiskFullError says nothing of the call was
    kept."""
    with Wal(_opts(tmp_path, max_entries_per_segment=1)) as wal:
        _three_segments(wal)
        real = os.unlink

        def unlink(path, *a, **kw):
            if str(path).endswith(".wal"):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(path, *a, **kw)

        monkeypatch.setattr(os, "unlink", unlink)
        with pytest.raises(DiskFullError) as info:
            wal.truncate(STREAM, 2)
        monkeypatch.undo()
        assert "nothing of this call was kept" in str(info.value)
        assert wal.first_id(STREAM) == 0


def test_a_truncation_that_deleted_one_segment_does_not_say_nothing_was_kept(tmp_path, monkeypatch):
    """A full disk failing the truncation after one segment was deleted: the DiskFullError does
    not claim nothing was kept."""
    with Wal(_opts(tmp_path, max_entries_per_segment=1)) as wal:
        _three_segments(wal)

        def fsync_dir(path):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(layout, "fsync_dir", fsync_dir)
        with pytest.raises(DiskFullError) as info:
            wal.truncate(STREAM, 1)
        monkeypatch.undo()
        assert "nothing of this call was kept" not in str(info.value)
        assert "after deleting 1 of 1" in str(info.value)
        assert wal.first_id(STREAM) == 1


# --- engine/stream.py: truncation --------------------------------------------------------------


def test_truncation_closes_the_descriptors_of_the_segments_it_deletes(tmp_path):
    """A deleted segment's cached descriptor is closed, so its disk space is freed."""
    with Wal(_opts(tmp_path, max_entries_per_segment=1)) as wal:
        _three_segments(wal)
        assert wal.get(STREAM, 0) == b"0"  # the reader caches segment 0's descriptor
        assert wal.truncate(STREAM, 2) == 2
        assert open_files_under(str(tmp_path), " (deleted)") == []
        assert wal.get(STREAM, 2) == b"2"


def test_a_failed_stream_refuses_truncation(tmp_path, monkeypatch):
    """Truncation is a write: a stream whose fsync failed refuses it (StreamFailedError) until
    reopened, and deletes nothing."""
    with Wal(_opts(tmp_path, max_entries_per_segment=1)) as wal:
        _three_segments(wal)

        def eio(fd):
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(stream_mod, "_fdatasync", eio)
        with pytest.raises(WalIOError):
            wal.sync(STREAM)
        monkeypatch.undo()
        with pytest.raises(StreamFailedError):
            wal.truncate(STREAM, 2)
        assert os.path.exists(_seg(tmp_path, 0)) and os.path.exists(_seg(tmp_path, 1))
        assert wal.first_id(STREAM) == 0
    with Wal(_opts(tmp_path, max_entries_per_segment=1)) as wal:  # a reopen settles it
        assert wal.truncate(STREAM, 2) == 2


def test_deletions_of_a_truncation_that_then_failed_survive_a_power_loss(tmp_path, monkeypatch):
    """The deleted segments are made durable (a directory fsync) before segments.idx is
    rewritten: if rewriting it fails, a power loss does not bring them back."""
    top = tmp_path / "top"
    top.mkdir()
    root = str(top / "wal")
    with Wal(_opts(root, max_entries_per_segment=1)) as wal:
        _three_segments(wal)
    rec = crashfs.Recorder(str(top))

    def write_segments_idx(stream_dir, starts):
        raise OSError(errno.ENOSPC, "No space left on device")

    with rec.recording():
        with Wal(_opts(root, max_entries_per_segment=1)) as wal:
            wal.recover_all()
            monkeypatch.setattr(layout, "write_segments_idx", write_segments_idx)
            with pytest.raises(DiskFullError):
                wal.truncate(STREAM, 2)
            monkeypatch.undo()
            rec.crash_here("the truncation failed")
    [point] = [p for p in rec.points if p.call == "the truncation failed"]
    tree, _ = point.power_loss()
    names = {os.path.basename(rel) for rel in tree if rel.startswith(os.path.join("wal", STREAM) + "/")}
    assert layout.segment_name(0) not in names and layout.segment_name(1) not in names
    assert layout.segment_name(2) in names


# --- engine/stream.py: read-only followers -------------------------------------------------------


def test_a_read_only_stream_without_segments_has_nothing_durable(tmp_path):
    """A read-only handle reports durable_id 0 for a stream directory holding no segment."""
    with Wal(_opts(tmp_path)) as wal:
        wal.append("other", b"x")  # (a root a writer made)
    os.mkdir(os.path.join(str(tmp_path), STREAM))
    with Wal(_opts(tmp_path), read_only=True) as reader:
        assert reader.next_id(STREAM) == 0
        assert reader.durable_id(STREAM) == 0


def test_a_follower_reports_the_active_segment_start_as_durable(tmp_path):
    """A read-only handle knows sealed segments are durable: after a refresh its durable_id is
    the active segment's start, and 0 once the stream is gone."""
    opts = _opts(tmp_path, max_entries_per_segment=2)
    with Wal(opts) as wal:
        wal.append(STREAM, b"0")
    with Wal(opts, read_only=True) as reader:
        assert reader.durable_id(STREAM) == 0
        with Wal(opts) as wal:
            for i in range(1, 5):
                wal.append(STREAM, b"%d" % i)  # segments 0, 2, 4
        reader.refresh(STREAM)
        assert reader.next_id(STREAM) == 5
        assert reader.durable_id(STREAM) == 4
        shutil.rmtree(os.path.join(str(tmp_path), STREAM))
        reader.refresh(STREAM)
        assert reader.next_id(STREAM) == 0
        assert reader.durable_id(STREAM) == 0


def test_a_read_under_a_view_a_refresh_replaced_caches_nothing_the_new_view_reads(tmp_path):
    """A refresh that finds the stream rewritten gives the new view a new cache epoch: a read
    still running on the old view, which stores the old bytes in the block cache after the
    refresh, does not serve them to reads of the new files."""
    opts = _opts(tmp_path, block_cache_size=1 << 20)
    with Wal(opts) as wal:
        wal.append(STREAM, b"old0")
    with Wal(opts, read_only=True) as reader:
        blocks = reader._reader.blocks
        real_put = blocks.put
        replaced = []

        def put(key, value):
            if not replaced:  # the first read has decoded the old frame: now the stream is replaced
                replaced.append(True)
                shutil.rmtree(os.path.join(str(tmp_path), STREAM))
                with Wal(opts) as wal:
                    wal.append(STREAM, b"new0")
                reader.refresh(STREAM)
            return real_put(key, value)

        blocks.put = put
        try:
            assert reader.get(STREAM, 0) == b"old0"  # a read that began before the refresh
        finally:
            del blocks.put
        assert replaced
        assert reader.get(STREAM, 0) == b"new0"
        assert list(reader.iter(STREAM)) == [b"new0"]


# --- engine/wal.py: arguments and entry sizes ----------------------------------------------------


def test_lock_must_be_a_bool(tmp_path):
    """Wal(lock=...) takes only True or False: a truthy object may be a misplaced argument."""
    for bad in ("no", 0, None):
        with pytest.raises(TypeError, match="lock must be True or False"):
            Wal(_opts(tmp_path), lock=bad)


def test_an_entry_of_exactly_the_largest_size_is_accepted(tmp_path, monkeypatch):
    """An entry as long as its u32 length prefix can say is accepted by append (bytes-like),
    append_batch and transactions; one byte more is refused (the limit is scaled down here)."""
    monkeypatch.setattr(wal_mod, "MAX_ENTRY", 16)
    with Wal(_opts(tmp_path)) as wal:
        assert wal.append(STREAM, bytearray(b"a" * 16)) == 0
        assert wal.append_batch(STREAM, [b"b" * 16]) == range(1, 2)
        with wal.writer(STREAM) as txn:
            txn.add(b"c" * 16)
        for too_long in (lambda: wal.append(STREAM, bytearray(17)), lambda: wal.append_batch(STREAM, [bytes(17)])):
            with pytest.raises(RecordTooLargeError):
                too_long()
        assert list(wal.iter(STREAM)) == [b"a" * 16, b"b" * 16, b"c" * 16]


def test_append_takes_a_bytes_like_entry_by_its_bytes(tmp_path):
    """Wal.append stores a bytes-like entry whose items are wider than a byte as all of its
    bytes, and refuses a str with the library's TypeError."""
    data = array("H", [1, 2, 0xFFFF])
    with Wal(_opts(tmp_path)) as wal:
        assert wal.append(STREAM, memoryview(data)) == 0
        assert wal.get(STREAM, 0) == data.tobytes()
        with pytest.raises(TypeError, match="entry data must be bytes, not str"):
            wal.append(STREAM, "text")
        assert wal.next_id(STREAM) == 1


def test_stream_stats_of_a_stream_never_written_are_all_zero(tmp_path):
    """stream_stats of a stream that does not exist: every count is 0."""
    with Wal(_opts(tmp_path)) as wal:
        assert wal.stream_stats("nothing") == {"next_id": 0, "durable_id": 0, "fsyncs": 0, "frames": 0, "bytes": 0}


# --- engine/wal.py: closed and read-only handles -------------------------------------------------


def test_a_closed_handle_refuses_to_start_a_transaction(tmp_path):
    """writer() on a closed handle raises WalClosedError at once, not at the commit."""
    wal = Wal(_opts(tmp_path))
    wal.append(STREAM, b"x")
    wal.close()
    with pytest.raises(WalClosedError):
        wal.writer(STREAM)


def test_a_closed_handle_does_not_recover_a_stream_it_had_not_used(tmp_path):
    """A read through a closed handle of a stream it never used raises WalClosedError before
    recovery could repair anything: the torn tail is still there afterwards."""
    with Wal(_opts(tmp_path)) as wal:
        wal.append(STREAM, b"x")
    with open(_seg(tmp_path, 0), "ab") as fh:
        fh.write(b"torn tail")
    size = os.path.getsize(_seg(tmp_path, 0))
    before = sorted(os.listdir(os.path.join(str(tmp_path), STREAM)))
    wal = Wal(_opts(tmp_path))
    wal.close()
    with pytest.raises(WalClosedError):
        wal.get(STREAM, 0)
    assert os.path.getsize(_seg(tmp_path, 0)) == size
    assert sorted(os.listdir(os.path.join(str(tmp_path), STREAM))) == before


def test_a_read_only_handle_refuses_sync_and_truncate_of_any_stream(tmp_path):
    """sync and truncate through a read-only handle raise ReadOnlyError, also for streams it
    has not used or that do not exist."""
    with Wal(_opts(tmp_path)) as wal:
        wal.append(STREAM, b"x")
    with Wal(_opts(tmp_path), read_only=True) as reader:
        with pytest.raises(ReadOnlyError):
            reader.sync()
        with pytest.raises(ReadOnlyError):
            reader.sync(STREAM)
        with pytest.raises(ReadOnlyError):
            reader.truncate("nothing", 1)
        with pytest.raises(ReadOnlyError):
            reader.truncate(STREAM, 1)


def test_a_stream_recovered_while_the_handle_closes_is_not_handed_out(tmp_path, monkeypatch):
    """A stream whose recovery was under way when close() ran is not registered with the closed
    handle: open_stream raises WalClosedError instead of returning a writer nobody will sync."""
    with Wal(_opts(tmp_path)) as wal:
        wal.append(STREAM, b"x")
    wal = Wal(_opts(tmp_path))
    real = wal_mod.recover_stream

    def recover_stream(*args, **kwargs):
        wal.close()  # a close in this thread (a signal handler's) between recovery and registration
        return real(*args, **kwargs)

    monkeypatch.setattr(wal_mod, "recover_stream", recover_stream)
    with pytest.raises(WalClosedError):
        wal.open_stream(STREAM)
    assert wal._streams == {}


def test_a_failed_root_fsync_at_open_releases_the_lock(tmp_path, monkeypatch):
    """When the root cannot be fsynced at open, the WalIOError says why and LOCK is released,
    so a later open succeeds (with lock=False there is no lock to release)."""
    root = tmp_path / "wal"
    Wal(_opts(root)).close()
    real = layout.fsync_dir

    def fsync_dir(path):
        if os.path.realpath(path) == os.path.realpath(str(root)):
            raise OSError(errno.EIO, "Input/output error")
        return real(path)

    monkeypatch.setattr(layout, "fsync_dir", fsync_dir)
    for lock in (True, False):
        with pytest.raises(WalIOError) as info:
            Wal(_opts(root), lock=lock)
        assert str(info.value).endswith(": Input/output error")
        assert info.value.errno == errno.EIO
    assert open_files_under(str(root), "LOCK") == []
    monkeypatch.undo()
    Wal(_opts(root)).close()


def test_a_root_that_is_a_file_is_named_with_the_reason(tmp_path):
    """A root_path that is a file: WalIOError saying it is not a directory, and why."""
    root = tmp_path / "file"
    root.write_bytes(b"")
    with pytest.raises(WalIOError) as info:
        Wal(_opts(root))
    message = str(info.value)
    assert "is not a directory: " in message
    assert message.endswith(": " + os.strerror(info.value.errno))


# --- engine/wal.py: transactions ----------------------------------------------------------------


def test_a_transaction_whose_block_raised_is_rolled_back(tmp_path):
    """A with-block that raises rolls the transaction back: nothing is written, and it cannot be
    added to or committed afterwards."""
    with Wal(_opts(tmp_path)) as wal:
        with pytest.raises(KeyError):
            with wal.writer(STREAM) as txn:
                txn.add(b"a")
                raise KeyError("boom")
        assert len(txn) == 0
        with pytest.raises(TransactionClosedError):
            txn.add(b"b")
        with pytest.raises(TransactionClosedError):
            txn.commit()
        assert wal.next_id(STREAM) == 0


# --- engine/wal.py: group commit ----------------------------------------------------------------


def test_a_strict_append_already_covered_by_another_sync_does_not_fsync_again(tmp_path):
    """A STRICT append whose id another caller's sync made durable between its write and its
    own sync returns without an fsync: it asks only for its own id to be durable."""
    with Wal(_opts(tmp_path, sync_mode=SyncMode.STRICT)) as wal:
        s = wal.open_stream(STREAM)
        real = s.append_payload

        def append_payload(*args, **kwargs):
            seq = real(*args, **kwargs)
            s.make_durable(s.next_id)  # another appender's sync, covering this frame too
            return seq

        s.append_payload = append_payload
        try:
            assert wal.append(STREAM, b"x") == 0
        finally:
            del s.append_payload
        assert wal.stream_stats(STREAM)["fsyncs"] == 1
        assert wal.durable_id(STREAM) == 1


# --- engine/wal.py: fork ------------------------------------------------------------------------


def _in_child(check) -> int:
    """Run ``check()`` in a forked child; its exit status (0: it returned True)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.alarm(20)  # (a hang guard for the child)
            code = 0 if check() else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1


def test_a_forked_child_closes_the_segment_descriptors_it_inherited(tmp_path):
    """In a forked child the inherited handle's cached segment descriptors are closed."""
    with Wal(_opts(tmp_path)) as wal:
        wal.append(STREAM, b"x")
        assert wal.get(STREAM, 0) == b"x"
        assert open_files_under(str(tmp_path), ".wal")
        assert _in_child(lambda: open_files_under(str(tmp_path), ".wal") == []) == 0
        assert wal.get(STREAM, 0) == b"x"


def test_a_handle_closed_before_a_fork_says_it_is_closed_not_forked(tmp_path):
    """A handle closed before the fork is simply closed in the child: its WalClosedError does not
    blame the fork."""
    wal = Wal(_opts(tmp_path))
    wal.append(STREAM, b"x")
    wal.close()

    def check():
        try:
            wal.append(STREAM, b"y")
        except WalClosedError as exc:
            return "fork" not in str(exc)
        return False

    assert _in_child(check) == 0
