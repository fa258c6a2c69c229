"""Tests written from a mutation audit of engine/layout.py and engine/scanner.py: each one kills
a mutant the suite let survive."""

from __future__ import annotations

import errno
import os

import pytest

from conftest import open_files_under
from ironwal_mp import InvalidStreamNameError
from ironwal_mp.engine import frame as fr
from ironwal_mp.engine import layout
from ironwal_mp.engine.scanner import TAIL_WINDOWS, ScanError, scan_frames, tail_frame


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


# --- engine/layout.py ----------------------------------------------------------------------------


def test_segment_names_past_u64_are_not_segments():
    """Twenty digits can spell 2**64, which is no u64 id: such a name is not a segment's, while
    the largest id still is."""
    assert layout.parse_segment_name(layout.segment_name(2**64 - 1)) == 2**64 - 1
    assert layout.parse_segment_name(layout.segment_name(2**64)) is None


@pytest.mark.parametrize("name", ["a/b", "a\\b", "/", "orders/"])
def test_a_path_separator_is_named_as_the_reason(name):
    """Any one separator, alone, is refused for being a separator (not for a character rule)."""
    with pytest.raises(InvalidStreamNameError) as info:
        layout.check_stream_name(name)
    assert info.value.reason == "contains a path separator"


def test_append_segments_idx_fsyncs_and_closes_the_file(tmp_path, fsynced):
    """A rotation's append to segments.idx is synced and leaves no descriptor behind."""
    stream_dir = str(tmp_path / "s")  # (not tmp_path: the temp root would then hold a stream, and
    os.mkdir(stream_dir)                # every later test's WAL there would be refused as nested)
    layout.append_segments_idx(stream_dir, 0)
    layout.append_segments_idx(stream_dir, 40)
    idx = os.path.realpath(os.path.join(stream_dir, layout.SEGMENTS_IDX))
    assert fsynced.count(idx) == 2
    assert open_files_under(stream_dir, layout.SEGMENTS_IDX) == []
    assert layout.read_segments_idx(stream_dir) == [0, 40]


def test_hint_files_are_created_0644(tmp_path, umask_022):
    """segments.idx (appended or replaced) and head.state are created rw-r--r--."""
    appended, replaced = tmp_path / "a", tmp_path / "r"
    appended.mkdir()
    replaced.mkdir()
    layout.append_segments_idx(str(appended), 7)
    layout.write_segments_idx(str(replaced), [0, 7])
    layout.write_head_state(str(replaced), 7)
    for path in (appended / layout.SEGMENTS_IDX, replaced / layout.SEGMENTS_IDX, replaced / layout.HEAD_STATE):
        assert os.stat(path).st_mode & 0o777 == 0o644, path


def test_refusing_a_fifo_leaves_no_descriptor(tmp_path):
    """A FIFO under a segment's (or a hint's) name is refused with EINVAL, and the descriptor
    opened to look at it is closed again."""
    stream_dir = str(tmp_path)
    os.mkfifo(os.path.join(stream_dir, layout.segment_name(0)))
    os.mkfifo(os.path.join(stream_dir, layout.HEAD_STATE))
    with pytest.raises(OSError) as info:
        layout.open_segment(stream_dir, 0)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(OSError) as info:
        layout.read_head_state(stream_dir)
    assert info.value.errno == errno.EINVAL
    assert [p for p in open_files_under(stream_dir, "") if p != os.path.realpath(stream_dir)] == []


# --- engine/scanner.py ---------------------------------------------------------------------------


def _frames(first_id: int, n: int, entry: bytes = b"e" * 20) -> bytes:
    return b"".join(fr.frame_for_entries(first_id + i, [entry]) for i in range(n))


def _frame_of_size(start_id: int, total: int) -> bytes:
    """One raw frame of exactly ``total`` bytes (header, entry length, entry)."""
    data = fr.frame_for_entries(start_id, [b"x" * (total - fr.HEADER_SIZE - fr.LENGTH_SIZE)])
    assert len(data) == total
    return data


def _reader(data: bytes, reads=None):
    def read(off, n):
        if reads is not None:
            reads.append((off, n))
        return data[off : off + n]

    return read


def _bad_lz4_size(start_id: int) -> bytes:
    """A CRC-valid LZ4 frame whose uncompressed-size field (not CRC-covered) is off by one."""
    data = bytearray(fr.frame_for_entries(start_id, [b"abcd" * 500], compress=True))
    assert data[20] == fr.TYPE_LZ4
    data[25] ^= 0x01
    return bytes(data)


def test_scan_error_message_names_the_offset_and_the_reason():
    """A ScanError's text says where scanning stopped and why."""
    data = _frames(0, 2)
    torn = data[:-3]
    with pytest.raises(ScanError) as info:
        list(scan_frames(_reader(torn), 0, 0, end=len(torn)))
    at = len(data) // 2
    assert info.value.offset == at
    assert str(info.value) == f"offset {at}: truncated payload"


@pytest.mark.parametrize("past", [5, fr.HEADER_SIZE + 3])
def test_scan_frames_never_reads_or_yields_past_end(past):
    """``end`` bounds the walk even when the data goes on: a frame crossing it is reported as
    cut there, never read whole from beyond it."""
    one = fr.frame_for_entries(0, [b"a" * 10])
    data = one + _frames(1, 3)
    end = len(one) + past
    reads: list = []
    walked = []
    with pytest.raises(ScanError) as info:
        for off, header, _ in scan_frames(_reader(data, reads), 0, 0, end=end):
            walked.append(header.start_id)
    assert walked == [0]
    assert info.value.offset == len(one)
    assert max(off + n for off, n in reads) <= end


def test_data_that_ends_on_a_frame_boundary_before_end_is_a_clean_end():
    """When the bytes run out before ``end`` exactly after a whole frame, the walk just stops;
    a torn frame there is still an error."""
    data = _frames(0, 3)
    got = [h.start_id for _, h, _ in scan_frames(_reader(data), 0, 0, end=len(data) + 100)]
    assert got == [0, 1, 2]
    with pytest.raises(ScanError):
        list(scan_frames(_reader(data[:-1]), 0, 0, end=len(data) + 100))


def test_decode_lz4_false_leaves_decoding_to_the_caller():
    """With decode_lz4=False a CRC-valid LZ4 frame is yielded without being decoded (the
    caller decodes it); by default it must decode to its stated size."""
    data = _frames(0, 1) + _bad_lz4_size(1)
    got = [h.start_id for _, h, _ in scan_frames(_reader(data), 0, 0, end=len(data), decode_lz4=False)]
    assert got == [0, 1]
    with pytest.raises(ScanError):
        list(scan_frames(_reader(data), 0, 0, end=len(data)))


@pytest.mark.parametrize("total", [64, TAIL_WINDOWS[0] + 1])
def test_tail_frame_finds_a_frame_that_starts_the_file(total):
    """A file holding one frame: its header at offset 0 is a candidate, also when the frame is
    one byte longer than the first window (its magic straddles that window's start)."""
    data = _frame_of_size(5, total)
    header = tail_frame(_reader(data), len(data))
    assert header is not None and (header.start_id, header.frame_size) == (5, total)


def test_tail_frame_finds_a_large_frame_after_many_small_ones():
    """The second window searches everything the first did not, not only the file's start."""
    small = _frames(0, 2000)
    assert len(small) > TAIL_WINDOWS[0]
    data = small + _frame_of_size(2000, 100_000)
    header = tail_frame(_reader(data), len(data))
    assert header is not None and header.start_id == 2000


def test_tail_frame_ignores_bytes_past_size():
    """Only the bytes below ``size`` are read: a file that has grown since still answers for
    the frame that ends at ``size``."""
    data = _frames(0, 3000)
    assert len(data) > TAIL_WINDOWS[0]
    more = data + _frames(3000, 5)
    header = tail_frame(_reader(more), len(data))
    assert header is not None and header.start_id == 2999


def test_tail_frame_checks_the_last_frames_crc():
    """A last frame whose payload was damaged is no answer."""
    data = bytearray(_frames(0, 10))
    data[-1] ^= 0xFF
    assert tail_frame(_reader(bytes(data)), len(data)) is None


def test_tail_frame_proves_an_lz4_frame_decodes_to_its_size():
    """The uncompressed size of an LZ4 frame is not CRC-covered: a last frame whose size field
    is wrong is no answer."""
    data = _frames(0, 10) + _bad_lz4_size(10)
    assert tail_frame(_reader(data), len(data)) is None
