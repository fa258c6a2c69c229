"""Tests written from a mutation-testing audit: each one kills a mutant the suite let survive."""

from __future__ import annotations

import errno
import os
import shutil
import sys
import threading

import pytest

import crashfs
from conftest import open_files_under
from ironwal_mp import SyncMode, Wal, WalOptions
from ironwal_mp.engine import checkpoint_log as cl
from ironwal_mp.engine import layout
from ironwal_mp.engine.fdcache import FdCache
from ironwal_mp.engine.follow import advance
from ironwal_mp.engine.frame import frame_for_entries
from ironwal_mp.engine.recovery import StreamTail
from ironwal_mp.engine.sparse_index import SparseIndex
from ironwal_mp.errors import CheckpointCorruptedError, WalClosedError, WalIOError

STREAM = "s"


def _opts(root, **kw) -> WalOptions:
    base = dict(root_path=str(root), sync_mode=SyncMode.ASYNC)
    base.update(kw)
    return WalOptions(**base)


def _seg(root, start: int) -> str:
    return os.path.realpath(os.path.join(str(root), STREAM, layout.segment_name(start)))


# --- engine/recovery.py ------------------------------------------------------------------------


def test_recovery_fsyncs_the_active_segment(tmp_path, fsynced):
    """What a crashed process left in the page cache becomes durable at open (recovery.py:118):
    afterwards the stream reports it as durable, so the fsync must really happen."""
    with Wal(_opts(tmp_path)) as wal:
        wal.append(STREAM, b"x")
    with Wal(_opts(tmp_path)) as wal:
        wal.recover_all()
        assert wal.durable_id(STREAM) == 1
        assert _seg(tmp_path, 0) in fsynced


def test_cut_bytes_side_file_is_fsynced(tmp_path, fsynced):
    """The bytes recovery cuts are kept in a side file durably before the cut (recovery.py:136)."""
    with Wal(_opts(tmp_path)) as wal:
        wal.append(STREAM, b"x")
    with open(_seg(tmp_path, 0), "ab") as fh:
        fh.write(b"torn tail")
    with Wal(_opts(tmp_path)) as wal:
        [report] = wal.recover_all()
        assert report.side_file is not None
        assert os.path.realpath(report.side_file) in fsynced


def test_missing_head_state_is_rebuilt_after_a_single_rotation(tmp_path):
    """head.state is rebuilt when missing as soon as the stream has rotated (2 segments)."""
    with Wal(_opts(tmp_path, max_entries_per_segment=2)) as wal:
        for i in range(3):
            wal.append(STREAM, b"%d" % i)
        assert wal.current_segment_start_id(STREAM) == 2
    stream_dir = os.path.join(str(tmp_path), STREAM)
    assert layout.list_segments(stream_dir) == [0, 2]
    os.remove(os.path.join(stream_dir, layout.HEAD_STATE))
    with Wal(_opts(tmp_path, max_entries_per_segment=2)) as wal:
        [report] = wal.recover_all()
        assert any("head.state" in a for a in report.actions)
    assert layout.read_head_state(stream_dir) == 2


# --- engine/scanner.py ---------------------------------------------------------------------------


def test_a_valid_frame_after_an_id_gap_is_cut(tmp_path):
    """Ids are contiguous: a CRC-valid frame that does not start at the next id (scanner.py:73)
    ends the valid data; recovery cuts it rather than adopting ids after a gap."""
    with Wal(_opts(tmp_path)) as wal:
        for i in range(3):
            wal.append(STREAM, b"e%d" % i)
    path = _seg(tmp_path, 0)
    size = os.path.getsize(path)
    with open(path, "ab") as fh:
        fh.write(frame_for_entries(7, [b"stray"]))
    with Wal(_opts(tmp_path)) as wal:
        [report] = wal.recover_all()
        assert report.cut_offset == size
        assert wal.next_id(STREAM) == 3
        assert list(wal.iter(STREAM)) == [b"e0", b"e1", b"e2"]
        assert wal.append(STREAM, b"e3") == 3


# --- engine/stream.py ----------------------------------------------------------------------------


def test_a_frame_that_fills_the_segment_exactly_does_not_rotate(tmp_path):
    """max_segment_size is a limit a segment may reach, not one it must stay below
    (stream.py:139 compares with '>')."""
    # frame = 32-byte header + 4-byte length + entry (no compression)
    with Wal(_opts(tmp_path, max_segment_size=200)) as wal:
        wal.append(STREAM, b"a" * 64)  # 100 bytes
        wal.append(STREAM, b"b" * 64)  # 200 bytes: exactly full
        assert wal.current_segment_start_id(STREAM) == 0
        assert os.path.getsize(_seg(tmp_path, 0)) == 200
        wal.append(STREAM, b"c")  # would pass the limit: rotates
        assert wal.current_segment_start_id(STREAM) == 2


def test_rotation_fdatasyncs_the_sealed_segment(tmp_path, monkeypatch):
    """Sealed segments are never scanned again at open, and rotation raises durable_id to the
    new segment's start: so the segment being sealed must be synced (stream.py:200)."""
    from ironwal_mp.engine import stream as stream_mod

    synced = []
    real = stream_mod._fdatasync

    def spy(fd):
        synced.append(os.path.realpath(os.readlink(f"/proc/self/fd/{fd}")))
        return real(fd)

    monkeypatch.setattr(stream_mod, "_fdatasync", spy)
    with Wal(_opts(tmp_path, max_entries_per_segment=2)) as wal:
        for i in range(3):
            wal.append(STREAM, b"%d" % i)
        assert wal.current_segment_start_id(STREAM) == 2
        assert wal.durable_id(STREAM) >= 2
        assert _seg(tmp_path, 0) in synced


def test_an_oversized_frame_into_an_empty_active_segment_does_not_rotate(tmp_path):
    """A crash mid-rotation can leave the new segment empty; the next frame goes into it even
    if it is larger than max_segment_size (stream.py:138 'size and'), rather than a second
    rotation to the same start id."""
    opts = _opts(tmp_path, max_segment_size=128)
    with Wal(opts) as wal:
        wal.append(STREAM, b"first")
    stream_dir = os.path.join(str(tmp_path), STREAM)
    open(os.path.join(stream_dir, layout.segment_name(1)), "wb").close()  # the crash's empty segment
    big = b"x" * 300
    with Wal(opts) as wal:
        assert wal.current_segment_start_id(STREAM) == 1
        assert wal.append(STREAM, big) == 1
        assert wal.current_segment_start_id(STREAM) == 1
        assert list(wal.iter(STREAM)) == [b"first", big]
    assert layout.read_segments_idx(stream_dir) == [0, 1]


def test_truncate_keeps_a_segment_holding_the_safe_id(tmp_path):
    """truncate(safe_id) deletes only segments whose ids are all below safe_id (stream.py:278)."""
    with Wal(_opts(tmp_path, max_entries_per_segment=2)) as wal:
        for i in range(5):
            wal.append(STREAM, b"%d" % i)  # segments 0 (ids 0-1), 2 (2-3), 4 (4)
        assert wal.truncate(STREAM, 1) == 0
        assert wal.truncate(STREAM, 3) == 1  # segment 0 only: id 3 lives in segment 2
        assert wal.first_id(STREAM) == 2
        assert [wal.get(STREAM, i) for i in range(2, 5)] == [b"2", b"3", b"4"]


# --- engine/group_sync.py ------------------------------------------------------------------------


def test_per_file_group_sync_fsyncs_the_directory(tmp_path, fsynced):
    """Without syncfs, a checkpoint commit's rename of HEAD is made durable by an fsync of the
    root (group_sync.py:130, sync_files)."""
    from ironwal_mp import GroupSync
    from ironwal_mp.engine.checkpoint_log import CheckpointData, CheckpointLog

    log = CheckpointLog(str(tmp_path), group_sync=GroupSync.FDATASYNC)
    log.append(CheckpointData(b"ck", 1, 2, (3, 4)))
    assert os.path.realpath(str(tmp_path)) in fsynced


def test_group_sync_marks_durable_only_what_its_syncfs_covered(tmp_path, monkeypatch):
    """An entry appended while a syncfs runs is not covered by it: the targets are taken before
    the syncfs (group_sync.py:232 marks those, not the next id after it)."""
    from ironwal_mp import GroupSync
    from ironwal_mp.engine import group_sync as gs

    if gs._syncfs is None:
        pytest.skip("no syncfs(2) here")
    fs = gs.filesystem_type(os.stat(tmp_path).st_dev)
    monkeypatch.setattr(gs, "SYNCFS_FILESYSTEMS", gs.SYNCFS_FILESYSTEMS | {fs})
    opts = WalOptions(root_path=str(tmp_path / "wal"), sync_mode=SyncMode.ASYNC, group_sync=GroupSync.SYNCFS)
    with Wal(opts) as wal:
        for name in ("a", "b"):
            wal.append(name, b"0")
        wal.sync()  # the first group sync of a filesystem is per file
        for name in ("a", "b"):
            wal.append(name, b"1")
        real = gs.syncfs
        late = []

        def syncfs(fd):
            real(fd)
            if not late:
                late.append(wal.append("a", b"late"))  # after the syncfs began: not covered

        monkeypatch.setattr(gs, "syncfs", syncfs)
        wal.sync()
        monkeypatch.setattr(gs, "syncfs", real)
        assert late == [2] and wal._syncer.syncfs_calls == 1
        assert wal.durable_id("b") == 2
        assert wal.durable_id("a") == 2 < wal.next_id("a") == 3


# --- engine/checkpoint_log.py --------------------------------------------------------------------


def test_checkpoint_log_side_file_is_fsynced(tmp_path, fsynced):
    """The cut tail of checkpoints.log is kept durably before the log is truncated
    (checkpoint_log.py:376)."""
    from ironwal_mp.engine.checkpoint_log import CheckpointData, CheckpointLog

    CheckpointLog(str(tmp_path)).append(CheckpointData(b"ck", 1, 1, (5,)))
    with open(tmp_path / "checkpoints.log", "ab") as fh:
        fh.write(b"CKPT torn")
    log = CheckpointLog(str(tmp_path))
    assert log.report.side_file is not None and len(log) == 1
    assert os.path.realpath(log.report.side_file) in fsynced


def test_checkpoint_append_rollback_is_fsynced(tmp_path, monkeypatch, fsynced):
    """A failed append truncates the log back and fsyncs it, so the refused record cannot come
    back after a crash (checkpoint_log.py:602)."""
    import errno

    from ironwal_mp.engine import checkpoint_log as cl
    from ironwal_mp.errors import WalIOError

    log = cl.CheckpointLog(str(tmp_path))
    log.append(cl.CheckpointData(b"ck-1", 1, 1, (5,)))
    size = os.path.getsize(tmp_path / "checkpoints.log")

    def failing_sync(fds, dir_fd, use_syncfs):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(cl, "sync_files", failing_sync)
    del fsynced[:]
    with pytest.raises(WalIOError):
        log.append(cl.CheckpointData(b"ck-2", 2, 1, (6,)))
    assert os.path.getsize(tmp_path / "checkpoints.log") == size
    assert os.path.realpath(str(tmp_path / "checkpoints.log")) in fsynced


def _ck(i: int, shards: int = 2) -> "cl.CheckpointData":
    return cl.CheckpointData(b"ck-%d" % i, 1_000 + i, shards, tuple(10 * i + s for s in range(shards)))


def _open_fds_under(root) -> list:
    """What this process holds open under ``root`` (the directory itself included)."""
    return open_files_under(str(root), "")


def test_checkpoint_data_refuses_a_shard_count_the_record_cannot_hold():
    """shard_count is a u16 in the record, and an int: 65536
    shards, or True for one shard, are refused when the value is made, not by struct at encode."""
    with pytest.raises(ValueError, match="shard_count"):
        cl.CheckpointData(b"a", 0, 65536, (0,) * 65536)
    with pytest.raises(TypeError, match="shard_count"):
        cl.CheckpointData(b"a", 0, True, (1,))
    assert len(cl.encode_payload(cl.CheckpointData(b"a", 0, 65535, (0,) * 65535))) == 13 + 1 + 8 * 65535


def test_the_largest_record_decodes_and_one_byte_more_is_not_a_tear():
    """L = 13 + k + 8*s is at most 13 + 65535 + 8*65535 = 589828 (FORMAT.md §9): a record of
    exactly that size is valid, and a stated length one above it is
    corruption, not a torn payload."""
    big = cl.CheckpointData(b"i" * 65535, 7, 65535, tuple(range(65535)))
    rec = cl.encode_record(big)
    assert len(rec) == 12 + 589828
    assert cl.decode_records(rec) == ([big], len(rec), None)
    _, end, problem = cl.decode_records(cl.RECORD_HEADER.pack(b"CKPT", 0, 589829))
    assert end == 0 and problem == "payload length 589829 exceeds the maximum 589828"
    _, end, problem = cl.decode_records(cl.RECORD_HEADER.pack(b"CKPT", 0, 589828))
    assert end == 0 and problem == "torn record payload (0 of 589828 bytes)"


@pytest.mark.parametrize("payload, reason", [
    (b"", "empty payload"),
    (b"\x02", "unknown record version 2"),
    (b"\x01", "payload too short for the id length"),
    (b"\x01\x01", "payload too short for the id length"),
    (b"\x01\x00\x00", "empty checkpoint id"),
    (b"\x01\x01\x00a" + bytes(5), "payload too short for its id, timestamp and shard count"),
    (b"\x01\x01\x00a" + bytes(9), "payload too short for its id, timestamp and shard count"),
])
def test_decode_payload_names_what_is_wrong(payload, reason):
    """The reason becomes the report's cut_reason; a payload too short for its id must be a
    ValueError (a record cut as invalid), not struct.error out of the open."""
    with pytest.raises(ValueError) as info:
        cl.decode_payload(payload)
    assert type(info.value) is ValueError and str(info.value) == reason


def test_decode_records_reasons_at_the_header_boundaries():
    """Exactly a header left is a torn payload, fewer bytes a torn header, and a short
    non-magic tail is reported as what it is."""
    rec = cl.encode_record(_ck(1))
    n = len(rec)
    cases = {
        cl.RECORD_HEADER.pack(b"CKPT", 0, 37): "torn record payload (0 of 37 bytes)",
        cl.RECORD_HEADER.pack(b"CKPT", 0, 37) + b"\x01\x05": "torn record payload (2 of 37 bytes)",
        b"CKP": "torn record header (3 of 12 bytes)",
        b"CKPT\x00\x00": "torn record header (6 of 12 bytes)",
        b"CKXX": "bad record magic b'CKXX'",
    }
    for tail, reason in cases.items():
        assert cl.decode_records(rec + tail) == ([_ck(1)], n, reason), tail


def test_decode_records_reads_any_buffer_by_bytes():
    """A buffer whose items are wider than a byte is read as its bytes."""
    data = cl.CheckpointData(b"abc", 5, 1, (9,))
    rec = cl.encode_record(data)
    assert len(rec) % 4 == 0
    assert cl.decode_records(memoryview(rec).cast("I")) == ([data], len(rec), None)
    assert cl.decode_records(bytearray(rec)) == ([data], len(rec), None)


def test_a_clean_open_reports_nothing_cut(tmp_path):
    """The report's defaults are what a clean open reports."""
    cl.CheckpointLog(str(tmp_path)).append(_ck(1))
    report = cl.CheckpointLog(str(tmp_path)).report
    assert (report.cut_offset, report.cut_bytes, report.cut_reason, report.stranded_records) == (None, 0, None, 0)
    assert report.records == 1 and report.head_status == "ok" and not report.changed


def _damage_second_record(root: str) -> bytes:
    log = cl.CheckpointLog(root)
    for i in range(3):
        log.append(_ck(i))
    path = os.path.join(root, "checkpoints.log")
    with open(path, "rb") as fh:
        full = bytearray(fh.read())
    full[len(cl.encode_record(_ck(0))) + 20] ^= 0x01
    with open(path, "wb") as fh:
        fh.write(full)
    return bytes(full)


def test_an_unrepaired_report_tells_of_a_head_past_the_damage(tmp_path):
    """verify prints the actions: a HEAD naming a stranded record is one."""
    _damage_second_record(str(tmp_path))
    report = cl.CheckpointLog(str(tmp_path), repair=False).report
    assert report.head_status == "dangling" and len(report.actions) == 2
    assert "HEAD names b'ck-2', whose record lies past the damage" in report.actions[1]


@pytest.mark.parametrize("repair", [False, True])
def test_the_report_tells_of_a_head_fallback(tmp_path, repair):
    """A corrupt HEAD with records: the fallback is an action."""
    log = cl.CheckpointLog(str(tmp_path))
    log.append(_ck(1))
    log.append(_ck(2))
    with open(tmp_path / "HEAD", "wb") as fh:
        fh.write(b"\x05\x00ab")
    report = cl.CheckpointLog(str(tmp_path), repair=repair).report
    assert report.head_status == "corrupt" and report.changed
    assert report.actions == ["HEAD is corrupt; latest checkpoint falls back to the last record b'ck-2'"
                              + ("; rewrote HEAD" if repair else "")]


def test_stranded_records_are_found_one_byte_past_the_damage(tmp_path):
    """A stray byte before an intact record: the record is counted as stranded and, unrepaired,
    reported as lying past the damage, not as absent."""
    with open(tmp_path / "checkpoints.log", "wb") as fh:
        fh.write(cl.encode_record(_ck(0)) + b"X" + cl.encode_record(_ck(1)))
    reader = cl.CheckpointLog(str(tmp_path), repair=False)
    assert reader.report.stranded_records == 1 and len(reader) == 1
    with pytest.raises(CheckpointCorruptedError):
        reader.get(b"ck-1")
    assert cl.CheckpointLog(str(tmp_path)).report.stranded_records == 1


def test_damage_followed_by_a_torn_record_opens(tmp_path):
    """A bit flip, then an append torn by a crash: the search for stranded records passes over
    the torn one's magic and ends."""
    full = _damage_second_record(str(tmp_path))
    with open(tmp_path / "checkpoints.log", "wb") as fh:
        fh.write(full + cl.encode_record(_ck(3))[:30])
    reader = cl.CheckpointLog(str(tmp_path), repair=False)
    assert reader.report.stranded_records == 1  # ck-2, whole; ck-3 is torn
    repaired = cl.CheckpointLog(str(tmp_path))
    assert repaired.report.stranded_records == 1 and repaired.latest() == _ck(0)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_checkpoint_files_are_created_0644(tmp_path, umask_022):
    """checkpoints.log, HEAD (via HEAD.tmp) and the side file are rw-r--r--."""
    cl.CheckpointLog(str(tmp_path)).append(_ck(1))
    with open(tmp_path / "checkpoints.log", "ab") as fh:
        fh.write(b"CKPT torn")
    log = cl.CheckpointLog(str(tmp_path))
    for path in (log.log_path, log.head_path, log.report.side_file):
        assert os.stat(path).st_mode & 0o777 == 0o644, path


def test_the_checkpoint_log_leaves_no_descriptor_open(tmp_path):
    """A repairing open that cuts a tail, appends, a failed prepare and discards close every
    descriptor they opened."""
    root = str(tmp_path / "root")
    os.mkdir(root)
    log = cl.CheckpointLog(root)
    log.append(_ck(1))
    log.append(_ck(2), log.prepare_head(b"ck-2"))
    assert _open_fds_under(root) == []
    with open(os.path.join(root, "checkpoints.log"), "ab") as fh:
        fh.write(b"CKPT torn")
    log = cl.CheckpointLog(root)
    assert log.report.side_file is not None and _open_fds_under(root) == []
    os.mkdir(os.path.join(root, "HEAD.tmp"))  # HEAD.tmp cannot be opened for writing
    with pytest.raises(WalIOError):
        log.prepare_head(b"ck-3")
    assert _open_fds_under(root) == []
    os.rmdir(os.path.join(root, "HEAD.tmp"))
    prepared = log.prepare_head(b"ck-3")
    log.discard_head(prepared)
    assert prepared.fd < 0 and prepared.dir_fd < 0 and _open_fds_under(root) == []


def test_discard_head_abandons_the_prepared_head(tmp_path):
    """discard_head removes HEAD.tmp, leaves HEAD alone, and frees the slot for the next
    prepare_head."""
    log = cl.CheckpointLog(str(tmp_path))
    log.append(_ck(1))
    log.discard_head(log.prepare_head(b"ck-2"))
    assert sorted(os.listdir(tmp_path)) == ["HEAD", "checkpoints.log"]
    assert cl.CheckpointLog(str(tmp_path)).latest() == _ck(1)
    log.append(_ck(3), log.prepare_head(b"ck-3"))
    assert cl.CheckpointLog(str(tmp_path)).latest() == _ck(3)


def test_a_failed_head_rewrite_at_open_leaves_no_head_tmp(tmp_path, monkeypatch):
    """Rewriting a corrupt HEAD fails at the rename: WalIOError, and the HEAD.tmp it wrote is
    removed."""
    cl.CheckpointLog(str(tmp_path)).append(_ck(1))
    with open(tmp_path / "HEAD", "wb") as fh:
        fh.write(b"\x00")

    def failing_commit(tmp, path):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(layout, "commit_atomic", failing_commit)
    with pytest.raises(WalIOError):
        cl.CheckpointLog(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["HEAD", "checkpoints.log"]


def test_compact_with_nothing_to_drop_leaves_the_log_alone(tmp_path):
    """compact(n) with n records already is a no-op, not a rewrite of the same bytes
   ."""
    log = cl.CheckpointLog(str(tmp_path))
    for i in range(3):
        log.append(_ck(i))
    ino = os.stat(tmp_path / "checkpoints.log").st_ino
    assert log.compact(3) == (3, 3, 0)
    assert os.stat(tmp_path / "checkpoints.log").st_ino == ino


def _power_loss_states(point, base: str):
    """The trees a power loss at ``point`` may leave: the durable names plus each prefix of the
    pending ones (they reach the disk in order)."""
    for k in range(len(point.pending) + 1):
        tree, data = point.power_loss()
        for op in point.pending[:k]:
            crashfs.apply_meta(tree, op)
        dest = crashfs.scratch(base, f"state-{point.index}-{k}")
        crashfs.materialize(tree, data, dest)
        yield dest


def test_a_cut_tail_survives_a_power_loss_during_the_repair(tmp_path):
    """The side file's name is made durable before the log is cut: at
    every point of a repairing open, a power loss leaves the cut bytes in the log or in a side
    file."""
    root = str(tmp_path / "root")
    os.mkdir(root)
    cl.CheckpointLog(root).append(_ck(1))
    tail = b"CKPT and then some torn bytes"
    with open(os.path.join(root, "checkpoints.log"), "ab") as fh:
        fh.write(tail)
    rec = crashfs.Recorder(root)
    with rec.recording():
        assert cl.CheckpointLog(root).report.cut_bytes == len(tail)
    for point in rec.points:
        dest = crashfs.scratch(str(tmp_path), f"state-{point.index}")
        crashfs.materialize(*point.power_loss(), dest)
        kept = []
        for name in os.listdir(dest):
            if name.startswith("checkpoints.log"):
                with open(os.path.join(dest, name), "rb") as fh:
                    kept.append(fh.read())
        assert any(b.endswith(tail) for b in kept), f"after {point.call}: the cut bytes are gone"


def test_a_failed_first_append_leaves_no_head_after_a_power_loss(tmp_path, monkeypatch):
    """A first append whose sync fails removes the HEAD its rename made, and makes the removal
    durable: a power loss after the error must not bring HEAD back,
    naming a record that was rolled back."""
    root = str(tmp_path / "root")
    os.mkdir(root)
    log = cl.CheckpointLog(root)

    def failing_sync(fds, dir_fd, use_syncfs):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(cl, "sync_files", failing_sync)
    rec = crashfs.Recorder(root)
    with rec.recording():
        with pytest.raises(WalIOError):
            log.append(_ck(1))
        rec.crash_here("the append failed")
    for dest in _power_loss_states(rec.points[-1], str(tmp_path)):
        assert not os.path.exists(os.path.join(dest, "HEAD")), dest


# --- coordinator/barrier.py ----------------------------------------------------------------------


def test_barrier_aborts_when_a_worker_is_durable_below_its_cut():
    """A PREPARED answer below the cut aborts the checkpoint (barrier.py:44)."""
    from coordinator.barrier import Barrier, Phase

    b = Barrier(1, [5, 7], [0, 1])
    b.on_prepared(0, 1, {0: 5})
    assert b.phase is Phase.PREPARING
    b.on_prepared(1, 1, {1: 6})
    assert b.phase is Phase.ABORTED and "below the cut" in b.error
    with pytest.raises(RuntimeError):
        b.offsets


def test_barrier_ignores_stale_and_repeated_answers():
    """Answers of another request, or a second one from a worker, change nothing (barrier.py:40),
    and a failure of another request does not abort this one (barrier.py:52)."""
    from coordinator.barrier import Barrier, Phase

    b = Barrier(2, [5, 7], [0, 1])
    b.on_failed(0, 1, "stale")  # an earlier, aborted barrier's answer
    b.on_prepared(1, 1, {1: 7})  # ditto
    assert b.phase is Phase.PREPARING and b.waiting == {0, 1}
    b.on_prepared(0, 2, {0: 5})
    b.on_prepared(0, 2, {0: 3})  # repeated: ignored
    assert b.phase is Phase.PREPARING and b.durable == {0: 5}
    b.on_prepared(1, 2, {1: 9})
    assert b.phase is Phase.PREPARED and b.offsets == [5, 7] and b.durable == {0: 5, 1: 9}


# --- ipc/ring.py ---------------------------------------------------------------------------------


@pytest.fixture
def ring(tmp_path):
    """An open ring of this test's own root (objects removed afterwards), ids from 10."""
    import ringutil
    from ironwal_mp.ipc.names import Names
    from ironwal_mp.ipc.ring import Ring

    root = tmp_path / "ringroot"
    root.mkdir()
    names = Names(str(root))
    try:
        r = Ring(names, 0, capacity=4096, create=True)
    except BaseException:
        names.remove_all()
        raise
    ringutil.open_ring(r, 10)
    yield r
    assert ringutil.dispose(names, r) == []


def test_wait_durable_waits_for_the_last_id_too(ring):
    """A STRICT append is acknowledged only once its own id is durable: DURABLE_SEQ one below
    the id after it is not enough (ring.py:610)."""
    from ironwal_mp.errors import WorkerFailedError
    from ironwal_mp.ipc import ring_layout as L

    h = ring.header
    seq = ring.append_one(b"strict", strict=True)
    assert seq == 10 and h[L.DUR_WAITERS] == 1
    h[L.WRITTEN_SEQ] = h[L.DURABLE_SEQ] = seq  # ids below 10 durable, 10 itself not
    with pytest.raises(WorkerFailedError, match="no durability before the timeout"):
        ring.wait_durable(seq + 1, timeout=0.2)
    assert h[L.DUR_WAITERS] == 0
    h[L.DURABLE_SEQ] = seq + 1
    ring.wait_durable(seq + 1, timeout=5, registered=False)  # durable now: returns at once


# --- workers/worker.py (a Worker assembled by hand around stubs, as in test_worker_policy) -------


class _Ring:
    def __init__(self, slices=()):
        import types

        self.slices = list(slices)
        self.states, self.views, self.consumed = [], [], []
        self.capacity = 4096
        self.data = memoryview(bytearray(4096))
        self.space_free = types.SimpleNamespace(release=lambda: None)

    def next_slice(self):
        return self.slices.pop(0) if self.slices else None

    def consume(self, s):
        self.consumed.append(s)

    def set_state(self, state):
        self.states.append(state)

    def set_view(self, seg, size, durable):
        self.views.append((seg, size, durable))

    def wake_durable_waiters(self):
        pass

    def acquire(self, timeout=30.0):
        pass

    def release(self):
        pass


class _Stream:
    def __init__(self, next_id, first=None):
        self.next_id, self.first = next_id, first

    def view(self):
        from ironwal_mp.engine.reader import StreamView
        from ironwal_mp.engine.sparse_index import SparseIndex

        return StreamView((0,), 64, self.next_id, SparseIndex())

    def append_payload(self, payload, count, trusted=False):
        return self.first


def _worker(*streams, slices=()):
    from ironwal_mp.ipc import ring_layout as L
    from workers import worker as W

    w = W.Worker.__new__(W.Worker)
    w.shards = {}
    for i, stream in enumerate(streams):
        st = W.ShardState.__new__(W.ShardState)
        st.shard, st.ring, st.stream, st.dirty_since = i, _Ring(slices), stream, 0.0
        st.h = [0] * (L.HEADER_BYTES // 8)
        st.h[L.STATE] = L.ST_OPEN
        w.shards[i] = st
    w._stopped = False
    w.stopping = False
    return w


def test_a_failed_sync_publishes_no_durable_id():
    """A shard whose fsync failed gets no durable id (a STRICT appender would take it as an
    acknowledgement); the others of the group sync do (worker.py:219)."""
    import errno
    import types

    from ironwal_mp.errors import WalIOError
    from ironwal_mp.ipc import ring_layout as L

    w = _worker(_Stream(7), _Stream(9))
    w.syncer = types.SimpleNamespace(sync=lambda streams: [WalIOError("fsync failed", errno.EIO, "/x"), None])
    bad, good = w.shards[0], w.shards[1]
    bad.h[L.WRITTEN_SEQ], good.h[L.WRITTEN_SEQ] = 7, 9
    w.sync([bad, good])
    assert bad.h[L.DURABLE_SEQ] == 0 and bad.ring.views == [] and bad.ring.states == [L.ST_FAILED]
    assert bad.h[L.ERRNO] == errno.EIO
    assert good.h[L.DURABLE_SEQ] == 9 and good.ring.views == [(0, 64, 9)] and good.ring.states == []


def test_stop_syncs_what_it_drained_before_closing_the_rings():
    """stop() makes every dirty shard durable and publishes its durable id before the rings
    are closed, so STRICT appenders waiting at shutdown are acknowledged (worker.py:372)."""
    from ironwal_mp.ipc import ring_layout as L

    w = _worker(_Stream(5))
    st = w.shards[0]
    st.h[L.WRITTEN_SEQ] = 5
    w.synced = []
    w.sync = lambda due: w.synced.append([s.shard for s in due])
    w.stop()
    assert w.synced == [[0]]
    assert st.ring.states == [L.ST_CLOSING, L.ST_CLOSED]


def test_a_frame_written_under_another_id_than_the_ring_gave_fails_the_shard():
    """If the engine assigns a frame other ids than the ring handed to producers, the shard
    fails and the slice is not consumed (worker.py:185)."""
    from ironwal_mp.ipc import ring_layout as L

    s = L.Slice(0, 8, 5, 1, 8)
    w = _worker(_Stream(6, first=6), slices=[s])
    st = w.shards[0]
    assert w._drain(st) == 0
    assert st.ring.states == [L.ST_FAILED] and st.ring.consumed == []
    assert st.h[L.WRITTEN_SEQ] == 0


# --- engine/layout.py ----------------------------------------------------------------------------


def test_write_file_atomic_syncs_data_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    """MANIFEST, segments.idx, head.state and a compacted checkpoints.log are replaced this way:
    the new bytes must be durable before the rename (layout.py:113), and the rename after it
    (layout.py:122), or a crash can leave an empty file or the old one."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", os.path.realpath(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = os.path.join(os.path.realpath(str(tmp_path)), "f")
    layout.write_file_atomic(target, b"data")
    monkeypatch.undo()
    assert events == [("fsync", target + ".tmp"), ("rename", target), ("fsync", os.path.dirname(target))]
    with open(target, "rb") as fh:
        assert fh.read() == b"data"


# --- engine/follow.py ----------------------------------------------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _add_frame(stream_dir: str, segment: int, first_id: int, *entries: bytes) -> None:
    with open(os.path.join(stream_dir, layout.segment_name(segment)), "ab") as fh:
        fh.write(frame_for_entries(first_id, list(entries)))


def _look(stream_dir: str, tail: StreamTail):
    """One follower's look; it must leave none of the descriptors it opened behind
    (the newest segment, a new segment read for its first frame, the old active segment once
    segment once sealed)."""
    before = _open_fds()
    got = advance(stream_dir, tail, 4096)
    assert _open_fds() == before, "a look leaked a descriptor"
    return got


def test_a_follower_continues_its_view_across_quiet_looks_growth_rotation_and_truncation(tmp_path):
    """``Followed.continued`` tells the caller whether to drop everything it cached; a view the
    files do continue must say so (a needless rebuild throws away every cached descriptor,
    index and block), and ``forget`` must name exactly the segments truncated away."""
    d = str(tmp_path / STREAM)
    os.makedirs(d)
    _add_frame(d, 0, 0, b"a", b"b")
    first = _look(d, StreamTail([], 0, 0, SparseIndex()))
    assert first.tail.segments == [0] and first.tail.next_id == 2
    assert first.tail.last_frame is not None and first.tail.last_frame[0] == 0  # (the scan's last frame)

    # nothing new (the kept segments are the old view's suffix; a file as long as the view is no cut)
    quiet = _look(d, first.tail)
    assert quiet.continued is True and quiet.forget == []
    assert (quiet.tail.next_id, quiet.tail.active_size) == (2, first.tail.active_size)
    assert quiet.tail.last_frame == first.tail.last_frame  # (no new frame: the old one is kept)

    _add_frame(d, 0, 2, b"c")
    grown = _look(d, quiet.tail)
    assert grown.continued is True and grown.forget == [] and grown.tail.next_id == 3
    assert grown.tail.last_frame[0] == first.tail.active_size  # the new frame is the last seen

    # the writer rotates right at the view's end: the sealed segment is exactly as long as the
    # view saw it (rotated, and a sealed file as long as the view is no cut)
    _add_frame(d, 3, 3, b"d")
    rotated = _look(d, grown.tail)
    assert rotated.continued is True and rotated.forget == []
    assert rotated.tail.segments == [0, 3] and rotated.tail.next_id == 4

    _add_frame(d, 3, 4, b"e")
    _add_frame(d, 5, 5, b"f")
    os.remove(os.path.join(d, layout.segment_name(0)))  # truncation: the oldest goes first
    truncated = _look(d, rotated.tail)
    assert truncated.continued is True and truncated.forget == [0]  # (not 3 too)
    assert truncated.tail.segments == [3, 5] and truncated.tail.next_id == 6

    shutil.rmtree(d)  # the stream removed: an empty view that continues nothing
    gone = _look(d, truncated.tail)
    assert not gone.continued and gone.forget == [3, 5]
    assert (gone.tail.segments, gone.tail.active_size, gone.tail.next_id) == ([], 0, 0)
    still_gone = _look(d, gone.tail)
    assert still_gone.continued is True and still_gone.forget == [] and still_gone.tail.segments == []


def test_a_stream_replaced_after_a_quiet_refresh_is_read_afresh(tmp_path):
    """A refresh that finds nothing new must keep the view's last frame: it is
    what the next look checks the file against, and without it a stream deleted and written
    again, longer, would be taken for a continuation of the old one."""
    with Wal(_opts(tmp_path)) as w:
        for i in range(3):
            w.append(STREAM, b"old-%d-" % i + b"x" * 40)
    with Wal(_opts(tmp_path), read_only=True) as r:
        assert list(r.iter(STREAM)) == [b"old-%d-" % i + b"x" * 40 for i in range(3)]
        r.refresh(STREAM)  # nothing new
        assert r.next_id(STREAM) == 3
        shutil.rmtree(tmp_path / STREAM)
        with Wal(_opts(tmp_path)) as w:
            for i in range(10):
                w.append(STREAM, b"new-%d-" % i + b"y" * 25)
        r.refresh(STREAM)
        assert list(r.iter(STREAM)) == [b"new-%d-" % i + b"y" * 25 for i in range(10)]
        assert r.next_id(STREAM) == 10


def test_a_follower_takes_in_a_new_segment_by_its_first_frame(tmp_path):
    """A new segment that begins with a valid frame of its id is taken in even when the end of
    the segment before cannot be confirmed from its tail: here that segment's last frame is
    larger than the window ``tail_frame`` searches back: the new one is read from its offset 0."""
    d = str(tmp_path / STREAM)
    os.makedirs(d)
    _add_frame(d, 0, 0, b"\x00" * (4 * 1024 * 1024 + 1))
    _add_frame(d, 1, 1, b"next")
    got = _look(d, StreamTail([], 0, 0, SparseIndex()))
    assert got.tail.segments == [0, 1] and got.tail.next_id == 2


# --- engine/fdcache.py ---------------------------------------------------------------------------


def _cache_files(tmp_path, n: int, size: int = 1) -> list:
    paths = []
    for i in range(n):
        p = tmp_path / f"f{i}"
        p.write_bytes(b"%d" % i * size)
        paths.append(str(p))
    return paths


def _waits_announced(cache: FdCache) -> threading.Event:
    """An event set by a thread that is about to block in ``cache`` for a free slot: whoever
    next takes the cache's lock does so after that thread is waiting."""
    waiting = threading.Event()
    real_wait = cache._cond.wait

    def wait(*args, **kw):
        waiting.set()
        return real_wait(*args, **kw)

    cache._cond.wait = wait
    return waiting


def _in_thread(fn):
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # (handed to the test)
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def test_fdcache_closes_what_it_evicts_forgets_and_drops(tmp_path):
    """Descriptors leave the process when the cache lets go of them, not only its table:
    on eviction, forget of an unpinned file, close_all and abandon."""
    paths = _cache_files(tmp_path, 6)
    cache = FdCache(1)
    base = _open_fds()
    for p in paths:  # each one evicts the one before
        cache.release(cache.acquire(p))
        assert _open_fds() == base + 1
    cache.forget(paths[-1])
    assert _open_fds() == base and cache.open_paths() == {}
    cache.release(cache.acquire(paths[0]))
    cache.close_all()
    assert _open_fds() == base

    cache = FdCache(4)
    cache.acquire(paths[0])  # left pinned
    cache.release(cache.acquire(paths[1]))
    assert _open_fds() == base + 2
    cache.abandon()  # (a forked child: pinned or not, every descriptor goes)
    assert _open_fds() == base


def test_fdcache_counts_opens_and_a_hit_opens_nothing(tmp_path):
    """``opens`` counts descriptors opened; a cached file is not reopened."""
    a, b = _cache_files(tmp_path, 2)
    cache = FdCache(1)
    assert cache.opens == 0
    e1 = cache.acquire(a)
    e2 = cache.acquire(a)
    assert e1 is e2 and cache.opens == 1
    cache.release(e1)
    cache.release(e2)
    cache.release(cache.acquire(b))  # evicts a
    cache.release(cache.acquire(a))
    assert cache.opens == 3
    cache.close_all()


def test_fdcache_mapping_is_reused_until_the_file_must_be_remapped(tmp_path):
    """A map long enough is handed out again, not made anew for every read;
    an empty file gives EOFError like any file too short (mmap cannot map it), and the
    message names the file."""
    (a,) = _cache_files(tmp_path, 1, size=8)
    cache = FdCache(2)
    e = cache.acquire(a)
    first = e.mapping(8)
    assert e.mapping(8) is first and e.mapping(3) is first
    with pytest.raises(EOFError, match="holds 8 bytes, 9 needed") as info:
        e.mapping(9)
    assert str(info.value).startswith(a)
    cache.release(e)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    e = cache.acquire(str(empty))
    with pytest.raises(EOFError):
        e.mapping(0)
    cache.release(e)
    cache.close_all()


def test_fdcache_a_map_keeps_a_second_descriptor_only_before_python_3_13(tmp_path):
    """README: with MMAP a cached segment holds up to two descriptors, as a map keeps a
    duplicate of its file's before Python 3.13; from 3.13 it is made without one
    (a mutant of the version check shows only on 3.13 and later)."""
    (a,) = _cache_files(tmp_path, 1, size=8)
    cache = FdCache(1)
    base = _open_fds()
    e = cache.acquire(a)
    m = e.mapping(8)
    assert _open_fds() == base + (1 if sys.version_info >= (3, 13) else 2)
    del m
    cache.release(e)
    cache.close_all()
    assert _open_fds() == base


def test_fdcache_a_second_wait_for_a_slot_is_woken_too(tmp_path):
    """Each thread that waited for a slot stops counting as waiting once it has one, so a
    release wakes the next one as well."""
    a, b = _cache_files(tmp_path, 2)
    cache = FdCache(1)
    for _ in range(2):
        held = cache.acquire(a)
        waiting = _waits_announced(cache)
        t, box = _in_thread(lambda: cache.acquire(b))
        assert waiting.wait(60)
        cache.release(held)  # (takes the lock only once the thread is waiting)
        t.join(60)
        assert not t.is_alive() and "value" in box, "the waiting thread was never woken"
        cache.release(box["value"])
        del cache._cond.wait
    cache.close_all()


def _a_waiter(tmp_path):
    """A one-slot cache whose slot is pinned, and a thread already waiting in it for another
    file: (cache, the pinned entry, its path, the thread, the thread's result box)."""
    a, b = _cache_files(tmp_path, 2)
    cache = FdCache(1)
    held = cache.acquire(a)
    waiting = _waits_announced(cache)
    t, box = _in_thread(lambda: cache.acquire(b))
    assert waiting.wait(60)
    return cache, held, a, t, box


def test_fdcache_forget_of_a_pinned_file_frees_its_slot_for_a_waiter(tmp_path):
    """forget drops the file from the table at once, so a thread waiting for a slot gets one
    while the forgotten file is still pinned and usable."""
    cache, held, a, t, box = _a_waiter(tmp_path)
    try:
        cache.forget(a)
        t.join(60)
        assert "value" in box, "the waiter did not get the slot forget freed"
        assert os.pread(held.fd, 1, 0) == b"0"  # pinned: still open
    finally:
        cache.release(held)
        t.join(60)
    cache.release(box["value"])
    cache.close_all()


def test_fdcache_close_all_wakes_a_waiter_with_wal_closed_error(tmp_path):
    """A thread waiting for a slot when the log closes is told so, not left
    waiting for a release that may never come."""
    cache, held, _, t, box = _a_waiter(tmp_path)
    try:
        cache.close_all()
        t.join(60)
        assert isinstance(box.get("error"), WalClosedError)
    finally:
        cache.release(held)
        t.join(60)
