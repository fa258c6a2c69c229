import os

import pytest

from ironwal_mp import InvalidStreamNameError
from ironwal_mp.engine import layout


@pytest.mark.parametrize("name", ["orders", "a", "A-b_c.d", "x" * 200, "0", "shard_00", "checkpoints", "HEADLINES", "LOCKS.v2"])
def test_safe_names_are_kept(name):
    assert layout.check_stream_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", "a/b", "a\\b", "a\x00b", ".hidden", "x" * 201, "sp ace", "é", "a:b", "segments.idx", "head.state", "LOCK", "MANIFEST", "HEAD", "checkpoints.log",
     "HEAD.tmp", "checkpoints.log.tmp", "MANIFEST.tmp", "checkpoints.log.broken"],
)
def test_unsafe_names_are_refused(name):
    with pytest.raises(InvalidStreamNameError):
        layout.check_stream_name(name)


def test_non_str_name_is_a_type_error():
    with pytest.raises(TypeError):
        layout.check_stream_name(b"orders")


def test_segment_names():
    assert layout.segment_name(58) == "00000000000000000058.wal"
    assert layout.parse_segment_name("00000000000000000058.wal") == 58
    assert layout.parse_segment_name("00000000000000000058.wal.broken") is None
    assert layout.parse_segment_name("58.wal") is None


def test_segments_idx_round_trip_and_validation():
    data = layout.encode_segments_idx([0, 87, 200])
    assert data == (0).to_bytes(8, "little") + (87).to_bytes(8, "little") + (200).to_bytes(8, "little")
    assert layout.decode_segments_idx(data) == [0, 87, 200]
    assert layout.decode_segments_idx(data[:-1]) is None
    assert layout.decode_segments_idx(layout.encode_segments_idx([5, 5])) is None
    assert layout.decode_segments_idx(b"") == []


def test_head_state_layout():
    data = layout.encode_head_state(281)
    assert data == b"\x01\x18" + b"00000000000000000281.wal" and len(data) == 26
    assert layout.decode_head_state(data) == 281
    assert layout.decode_head_state(b"\x02" + data[1:]) is None
    assert layout.decode_head_state(data[:-1]) is None
    assert layout.decode_head_state(b"\x01\x03abc") is None


def test_fixture_index_files_decode(fixtures_dir):
    ledger = os.path.join(fixtures_dir, "core", "ledger")
    assert layout.read_segments_idx(ledger) == [58, 115, 171, 226, 281]
    assert layout.read_head_state(ledger) == 281
    assert layout.list_segments(ledger) == [58, 115, 171, 226, 281]


def test_write_file_atomic_replaces(tmp_path):
    path = str(tmp_path / "f")
    layout.write_file_atomic(path, b"one")
    layout.write_file_atomic(path, b"two")
    assert open(path, "rb").read() == b"two"
    assert not os.path.exists(path + ".tmp")


def test_side_file_path_numbers(tmp_path):
    base = str(tmp_path / "seg.wal")
    first = layout.side_file_path(base)
    assert first == base + ".broken"
    open(first, "wb").close()
    assert layout.side_file_path(base) == base + ".broken.1"


def test_stray_segments_rule():
    """An empty newest segment must start where the one before it ends; only then is it what a
    rotation made. Ends are asked for only when the newest segment is empty."""
    ends = {0: 40, 40: 40, 1036: 1036}
    asked = []

    def end_of(start):
        asked.append(start)
        return ends.get(start)

    def strays(starts, nonempty=()):
        return layout.stray_segments(starts, lambda s: s in nonempty, end_of)

    assert strays([0, 1036], nonempty={1036}) == [] and asked == []  # holds frames: not checked
    assert strays([0]) == [] and asked == []  # nothing before it
    assert strays([0, 40]) == []  # a rotation's empty new segment
    assert strays([0, 1036]) == [1036]  # past the end
    assert strays([0, 20]) == [20]  # inside the previous segment's ids
    assert strays([0, 40, 1036, 2000]) == [2000, 1036]  # newest first, down to the one that fits
    ends[0] = None  # the previous segment does not scan cleanly to its end: not judged here
    assert strays([0, 1036]) == []
