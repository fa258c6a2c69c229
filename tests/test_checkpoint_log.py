"""checkpoints.log / HEAD: codec, compatibility with the ironwal 0.6 crate's bytes, repair."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import threading
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ironwal_mp.engine import checkpoint_log as cl
from ironwal_mp.engine import layout
from ironwal_mp.engine.checkpoint_log import (
    CheckpointData,
    CheckpointLog,
    check_checkpoint_id,
    decode_head,
    decode_payload,
    decode_records,
    encode_head,
    encode_record,
)
from ironwal_mp.errors import (
    CheckpointCorruptedError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    DiskFullError,
    InvalidCheckpointIdError,
    NoCheckpointsError,
    WalIOError,
)

FIXTURES = os.environ.get("IRONWAL_FIXTURES", "/work/shared/fixtures/ironwal-0.6")
SHARDED = os.path.join(FIXTURES, "sharded")

needs_fixture = pytest.mark.skipif(
    not os.path.exists(os.path.join(SHARDED, "checkpoints.log")),
    reason="ironwal 0.6 fixtures not available",
)

RECORD_LEN = 65  # each fixture record: 12-byte header + 53-byte payload (8-byte id, 4 shards)


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)


@pytest.fixture(scope="module")
def expected():
    with open(os.path.join(FIXTURES, "expected.json")) as fh:
        return json.load(fh)["sharded"]


@pytest.fixture
def crate_root(tmp_path):
    """A writable copy of the crate-written checkpoints.log and HEAD."""
    root = tmp_path / "root"
    root.mkdir()
    for name in ("checkpoints.log", "HEAD"):
        shutil.copyfile(os.path.join(SHARDED, name), root / name)
    return str(root)


def _data(i: int, shards: int = 4) -> CheckpointData:
    return CheckpointData(f"ck-{i}".encode(), 1_000_000_000 + i, shards, tuple(i * 10 + s for s in range(shards)))


def _side_files(root: str) -> list:
    return sorted(n for n in os.listdir(root) if ".broken" in n)


# --- the crate's fixture -------------------------------------------------------------------------


@needs_fixture
def test_fixture_decodes_exactly(expected):
    buf = _read(os.path.join(SHARDED, "checkpoints.log"))
    records, end, problem = decode_records(buf)
    assert problem is None and end == len(buf) == 2 * RECORD_LEN
    assert len(records) == len(expected["checkpoints"]) == 2
    for rec, exp in zip(records, expected["checkpoints"]):
        assert rec.user_id == bytes.fromhex(exp["user_id_hex"]) == exp["user_id"].encode()
        assert rec.timestamp == exp["timestamp_as_stored"]
        assert rec.shard_count == exp["shard_count"] == 4
        assert rec.offsets == tuple(exp["offsets"])


@needs_fixture
def test_fixture_head(expected):
    head = decode_head(_read(os.path.join(SHARDED, "HEAD")))
    assert head == expected["latest_checkpoint_user_id"].encode() == b"ckpt-400"


@needs_fixture
def test_our_bytes_equal_the_crates(expected):
    buf = _read(os.path.join(SHARDED, "checkpoints.log"))
    ours = b"".join(
        encode_record(
            CheckpointData(bytes.fromhex(e["user_id_hex"]), e["timestamp_as_stored"], e["shard_count"], e["offsets"])
        )
        for e in expected["checkpoints"]
    )
    assert ours == buf
    assert encode_head(b"ckpt-400") == _read(os.path.join(SHARDED, "HEAD"))
    # and re-encoding what we decoded gives the same bytes back
    assert b"".join(encode_record(r) for r in decode_records(buf)[0]) == buf


@needs_fixture
def test_open_fixture_reads_everything_and_changes_nothing(crate_root, expected):
    log = CheckpointLog(crate_root)
    assert not log.report.changed
    assert log.report.head_status == "ok" and log.report.cut_offset is None
    assert len(log) == 2 and log.bytes_size == 130
    assert log.latest().user_id == b"ckpt-400"
    assert log.latest().offsets == (100, 93, 91, 116)
    assert log.get(b"ckpt-200").offsets == (52, 42, 51, 55)
    assert log.list() == [(e["user_id"].encode(), e["timestamp_as_stored"]) for e in expected["checkpoints"]]
    assert _read(os.path.join(crate_root, "checkpoints.log")) == _read(os.path.join(SHARDED, "checkpoints.log"))
    assert _read(os.path.join(crate_root, "HEAD")) == _read(os.path.join(SHARDED, "HEAD"))
    assert _side_files(crate_root) == []


@needs_fixture
def test_append_to_crate_log_keeps_its_bytes(crate_root):
    original = _read(os.path.join(crate_root, "checkpoints.log"))
    log = CheckpointLog(crate_root)
    new = CheckpointData(b"ckpt-600", 1_795_266_088_400_000_000, 4, (150, 140, 130, 180))
    log.append(new)
    buf = _read(os.path.join(crate_root, "checkpoints.log"))
    assert buf == original + encode_record(new)
    assert decode_head(_read(os.path.join(crate_root, "HEAD"))) == b"ckpt-600"
    again = CheckpointLog(crate_root)
    assert [u for u, _ in again.list()] == [b"ckpt-200", b"ckpt-400", b"ckpt-600"]
    assert again.latest() == new


# --- codec ---------------------------------------------------------------------------------------


def test_record_layout():
    data = CheckpointData(b"abc", 0x0102030405060708, 2, (7, 2**64 - 1))
    rec = encode_record(data)
    magic, crc, length = struct.unpack_from("<4sII", rec)
    payload = rec[12:]
    assert magic == b"CKPT" and length == len(payload) == 1 + 2 + 3 + 8 + 2 + 16
    assert crc == zlib.crc32(payload)
    assert payload == (
        b"\x01" + b"\x03\x00" + b"abc" + bytes.fromhex("0807060504030201") + b"\x02\x00"
        + (7).to_bytes(8, "little") + b"\xff" * 8
    )
    assert decode_payload(payload) == data


def test_zero_shards_round_trip():
    data = CheckpointData(b"x", 5, 0, ())
    assert decode_records(encode_record(data)) == ([data], 12 + 14, None)


def test_decode_empty():
    assert decode_records(b"") == ([], 0, None)
    assert decode_records(bytearray()) == ([], 0, None)


def test_decode_accepts_bytes_like():
    buf = encode_record(_data(1)) + encode_record(_data(2))
    for view in (bytearray(buf), memoryview(buf)):
        recs, end, problem = decode_records(view)
        assert recs == [_data(1), _data(2)] and end == len(buf) and problem is None


def _record_with_payload(payload: bytes, crc: int | None = None) -> bytes:
    return struct.pack("<4sII", b"CKPT", zlib.crc32(payload) if crc is None else crc, len(payload)) + payload


@pytest.mark.parametrize(
    "tail, reason",
    [
        (b"XXXX" + b"\x00" * 40, "magic"),
        (b"\x00" * 64, "magic"),
        (b"CK", "torn record header"),
        (b"CKPT\x00\x00\x00", "torn record header"),
        (b"CKPx\x00\x00\x00", "magic"),
        (_record_with_payload(encode_record(_data(3))[12:])[:-1], "torn record payload"),
        (_record_with_payload(encode_record(_data(3))[12:], crc=1), "CRC32"),
        (_record_with_payload(b"\x02" + encode_record(_data(3))[13:]), "version 2"),
        (_record_with_payload(encode_record(_data(3))[12:] + b"\x00"), "payload is"),
        (_record_with_payload(encode_record(_data(3))[12:-1]), "payload is"),
        (_record_with_payload(b"\x01\x00\x00" + b"\x00" * 10), "empty checkpoint id"),
        (_record_with_payload(b"\x01\xff\xff"), "too short"),
        (_record_with_payload(b""), "empty payload"),
        (struct.pack("<4sII", b"CKPT", 0, 0xFFFFFFFF), "exceeds the maximum"),
    ],
)
def test_decode_stops_at_first_bad_record(tail, reason):
    good = encode_record(_data(1)) + encode_record(_data(2))
    # a torn record can only be the last thing in the buffer; bad ones may have records after
    after = b"" if reason.startswith("torn") else encode_record(_data(4))
    recs, end, problem = decode_records(good + tail + after)
    assert recs == [_data(1), _data(2)]
    assert end == len(good)
    assert problem is not None and reason in problem


def test_every_single_bit_flip_is_detected():
    good = [_data(1), _data(2), _data(3)]
    buf = b"".join(encode_record(r) for r in good)
    bounds = [0]
    for r in good:
        bounds.append(bounds[-1] + len(encode_record(r)))
    for i in range(len(buf)):
        which = max(k for k in range(len(good)) if bounds[k] <= i)
        for bit in range(8):
            damaged = bytearray(buf)
            damaged[i] ^= 1 << bit
            recs, end, problem = decode_records(bytes(damaged))
            assert recs == good[:which], (i, bit)
            assert end == bounds[which] and problem is not None


def test_check_checkpoint_id():
    assert check_checkpoint_id(b"a") == b"a"
    assert check_checkpoint_id(bytearray(b"ab")) == b"ab"
    got = check_checkpoint_id(memoryview(b"xabcx")[1:4])
    assert got == b"abc" and type(got) is bytes
    assert check_checkpoint_id(b"z" * 65535) == b"z" * 65535
    for bad_type in ("ckpt", 1, None, [1, 2], 1.5):
        with pytest.raises(TypeError):
            check_checkpoint_id(bad_type)
    for bad in (b"", bytearray(), memoryview(b""), b"z" * 65536):
        with pytest.raises(InvalidCheckpointIdError):
            check_checkpoint_id(bad)
    assert issubclass(InvalidCheckpointIdError, ValueError)


def test_checkpoint_data_validation():
    d = CheckpointData(bytearray(b"id"), 1, 2, [3, 4])
    assert d.user_id == b"id" and type(d.user_id) is bytes and d.offsets == (3, 4)
    assert hash(d) == hash(CheckpointData(b"id", 1, 2, (3, 4)))
    with pytest.raises(ValueError):
        CheckpointData(b"id", 1, 3, (1, 2))
    with pytest.raises(ValueError):
        CheckpointData(b"id", -1, 0, ())
    with pytest.raises(ValueError):
        CheckpointData(b"id", 2**64, 0, ())
    with pytest.raises(ValueError):
        CheckpointData(b"id", 0, 1, (2**64,))
    with pytest.raises(TypeError):
        CheckpointData(b"id", 1.0, 0, ())
    with pytest.raises(TypeError):
        CheckpointData("id", 1, 0, ())
    with pytest.raises(InvalidCheckpointIdError):
        CheckpointData(b"", 1, 0, ())


def test_head_codec():
    assert encode_head(b"ckpt-400") == b"\x08\x00ckpt-400"
    assert decode_head(encode_head(b"x" * 65535)) == b"x" * 65535
    for bad in (b"", b"\x01", b"\x00\x00", b"\x03\x00ab", b"\x02\x00abc", b"\xff\xffab"):
        assert decode_head(bad) is None
    with pytest.raises(InvalidCheckpointIdError):
        encode_head(b"")
    with pytest.raises(TypeError):
        encode_head("x")


# --- property tests ------------------------------------------------------------------------------

checkpoint_data = st.builds(
    lambda uid, ts, offs: CheckpointData(uid, ts, len(offs), tuple(offs)),
    st.binary(min_size=1, max_size=200),
    st.integers(0, 2**64 - 1),
    st.lists(st.integers(0, 2**64 - 1), max_size=24),
)


@settings(deadline=None, max_examples=300)
@given(checkpoint_data)
def test_property_round_trip(data):
    rec = encode_record(data)
    assert decode_records(rec) == ([data], len(rec), None)
    assert decode_payload(rec[12:]) == data
    assert decode_head(encode_head(data.user_id)) == data.user_id


@settings(deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(checkpoint_data, min_size=1, max_size=6), st.data())
def test_property_prefix_decodes_to_complete_records(records, draw):
    encoded = [encode_record(r) for r in records]
    buf = b"".join(encoded)
    bounds = [0]
    for e in encoded:
        bounds.append(bounds[-1] + len(e))
    cut = draw.draw(st.integers(0, len(buf)), label="cut")
    complete = max(k for k in range(len(bounds)) if bounds[k] <= cut)
    recs, end, problem = decode_records(buf[:cut])
    assert recs == records[:complete]
    assert end == bounds[complete]
    assert (problem is None) == (cut == bounds[complete])


@settings(deadline=None, max_examples=300)
@given(st.lists(checkpoint_data, max_size=3), st.binary(max_size=200))
def test_property_decode_never_raises_and_is_canonical(records, garbage):
    buf = b"".join(encode_record(r) for r in records) + garbage
    recs, end, problem = decode_records(buf)
    assert recs[: len(records)] == records
    assert 0 <= end <= len(buf)
    assert b"".join(encode_record(r) for r in recs) == buf[:end]
    assert (problem is None) == (end == len(buf))


# --- opening and repair --------------------------------------------------------------------------


@needs_fixture
def test_torn_last_record_at_every_offset(tmp_path):
    full = _read(os.path.join(SHARDED, "checkpoints.log"))
    head = _read(os.path.join(SHARDED, "HEAD"))
    for length in range(RECORD_LEN + 1, 2 * RECORD_LEN):
        root = tmp_path / f"cut{length}"
        root.mkdir()
        _write(str(root / "checkpoints.log"), full[:length])
        _write(str(root / "HEAD"), head)
        log = CheckpointLog(str(root))
        rep = log.report
        assert [u for u, _ in log.list()] == [b"ckpt-200"], length
        assert rep.cut_offset == RECORD_LEN and rep.cut_bytes == length - RECORD_LEN
        assert rep.side_file == str(root / "checkpoints.log.broken")
        assert _read(rep.side_file) == full[RECORD_LEN:length]
        assert _read(str(root / "checkpoints.log")) == full[:RECORD_LEN]
        assert log.bytes_size == RECORD_LEN
        # HEAD named the torn record: fall back to the last surviving one, and say so on disk
        assert rep.head_status == "dangling" and rep.head_id == b"ckpt-400"
        assert log.latest().user_id == b"ckpt-200"
        assert decode_head(_read(str(root / "HEAD"))) == b"ckpt-200"
        reopened = CheckpointLog(str(root))
        assert not reopened.report.changed and reopened.latest().user_id == b"ckpt-200"


@needs_fixture
def test_torn_first_record_leaves_no_checkpoints(crate_root):
    path = os.path.join(crate_root, "checkpoints.log")
    full = _read(path)
    _write(path, full[:30])
    log = CheckpointLog(crate_root)
    assert len(log) == 0 and log.report.cut_offset == 0
    with pytest.raises(NoCheckpointsError):
        log.latest()
    assert _read(path) == b""
    log.append(_data(1))
    assert CheckpointLog(crate_root).latest() == _data(1)


@needs_fixture
def test_repair_false_reports_and_writes_nothing(crate_root):
    path = os.path.join(crate_root, "checkpoints.log")
    torn = _read(path)[:100]
    _write(path, torn)
    head_before = _read(os.path.join(crate_root, "HEAD"))
    log = CheckpointLog(crate_root, repair=False)
    assert log.report.cut_offset == RECORD_LEN and log.report.cut_bytes == 35
    assert log.report.side_file is None and log.report.changed
    assert log.latest().user_id == b"ckpt-200"
    assert log.bytes_size == 100
    with pytest.raises(CheckpointCorruptedError) as info:
        log.append(_data(9))
    assert info.value.offset == RECORD_LEN
    with pytest.raises(CheckpointCorruptedError):
        log.compact(1)
    assert _read(path) == torn
    assert _read(os.path.join(crate_root, "HEAD")) == head_before
    assert _side_files(crate_root) == []


@needs_fixture
def test_repair_false_reports_a_bad_tail_as_found_not_as_cut(crate_root):
    """`verify` and `inspect` print a repair=False report: it said "cut 35 bytes from
    checkpoints.log" of a log it left whole."""
    path = os.path.join(crate_root, "checkpoints.log")
    _write(path, _read(path)[:100])
    action = CheckpointLog(crate_root, repair=False).report.actions[0]
    assert not action.startswith("cut") and f"damaged at offset {RECORD_LEN}" in action
    assert len(_read(path)) == 100
    action = CheckpointLog(crate_root).report.actions[0]
    assert action.startswith(f"cut 35 bytes from checkpoints.log at offset {RECORD_LEN}")


@needs_fixture
def test_repair_false_on_a_clean_log_can_append(crate_root):
    log = CheckpointLog(crate_root, repair=False)
    log.append(_data(1))
    assert CheckpointLog(crate_root).latest() == _data(1)


@needs_fixture
@pytest.mark.parametrize("byte", [0, 5, 10, 14, 20, 40, 64])
def test_flipped_bit_in_first_record_strands_the_second(crate_root, byte):
    path = os.path.join(crate_root, "checkpoints.log")
    full = bytearray(_read(path))
    full[byte] ^= 0x10
    _write(path, bytes(full))
    log = CheckpointLog(crate_root)
    assert len(log) == 0 and log.report.cut_offset == 0
    assert log.report.stranded_records == 1  # ckpt-400 is intact, in the side file
    assert _read(log.report.side_file) == bytes(full)
    assert _read(path) == b""
    with pytest.raises(NoCheckpointsError):
        log.latest()


def test_a_reader_reports_a_record_stranded_past_damage(tmp_path):
    """Read without repair (ShardedWal's loads, replay, verify), a record that lies past a
    corrupt one is CheckpointCorruptedError, not 'not found', and a HEAD naming it is not
    passed over for an older checkpoint; a repair then cuts it and falls back, as FORMAT §9 says."""
    root = str(tmp_path)
    log = CheckpointLog(root)
    for i in range(3):
        log.append(_data(i))
    ids = [_data(i).user_id for i in range(3)]
    path = os.path.join(root, "checkpoints.log")
    full = bytearray(_read(path))
    full[len(encode_record(_data(0))) + 20] ^= 0x01  # the second record's payload
    _write(path, bytes(full))

    reader = CheckpointLog(root, repair=False)
    assert reader.get(ids[0]) == _data(0)
    for uid in ids[1:]:  # the damaged one is found intact nowhere; the third is stranded
        with pytest.raises((CheckpointCorruptedError, CheckpointNotFoundError)) as info:
            reader.get(uid)
        assert info.type is (CheckpointNotFoundError if uid == ids[1] else CheckpointCorruptedError)
    with pytest.raises(CheckpointNotFoundError):
        reader.get(b"never-written")
    with pytest.raises(CheckpointCorruptedError) as info:
        reader.latest()  # HEAD names the third: the first is not the latest
    assert info.value.offset == len(encode_record(_data(0)))
    assert _read(path) == bytes(full), "a reader changed the log"

    repaired = CheckpointLog(root)
    assert repaired.latest() == _data(0)
    assert repaired.report.stranded_records == 1


@needs_fixture
def test_flipped_bit_in_second_record(crate_root):
    path = os.path.join(crate_root, "checkpoints.log")
    full = bytearray(_read(path))
    full[RECORD_LEN + 30] ^= 0x01
    _write(path, bytes(full))
    log = CheckpointLog(crate_root)
    assert "CRC32" in log.report.cut_reason
    assert [u for u, _ in log.list()] == [b"ckpt-200"]
    assert log.latest().user_id == b"ckpt-200"
    assert log.report.stranded_records == 0


@needs_fixture
def test_zero_filled_tail(crate_root):
    path = os.path.join(crate_root, "checkpoints.log")
    full = _read(path)
    _write(path, full + b"\x00" * 4096)
    log = CheckpointLog(crate_root)
    assert len(log) == 2 and log.report.cut_offset == 130 and log.report.cut_bytes == 4096
    assert "magic" in log.report.cut_reason
    assert _read(log.report.side_file) == b"\x00" * 4096
    assert _read(path) == full
    assert log.report.head_status == "ok" and log.latest().user_id == b"ckpt-400"


@needs_fixture
def test_second_repair_gets_its_own_side_file(crate_root):
    path = os.path.join(crate_root, "checkpoints.log")
    full = _read(path)
    _write(path, full + b"junk")
    CheckpointLog(crate_root)
    _write(path, full + b"more junk")
    log = CheckpointLog(crate_root)
    assert log.report.side_file == path + ".broken.1"
    assert _read(path + ".broken") == b"junk" and _read(path + ".broken.1") == b"more junk"


@needs_fixture
@pytest.mark.parametrize(
    "head, status",
    [(None, "missing"), (b"", "corrupt"), (b"\x08\x00ckpt-40", "corrupt"), (b"\x08\x00ckpt-4000", "corrupt"),
     (b"\x00\x00", "corrupt"), (encode_head(b"ckpt-999"), "dangling")],
)
def test_bad_head_falls_back_to_last_record(crate_root, head, status):
    head_path = os.path.join(crate_root, "HEAD")
    if head is None:
        os.unlink(head_path)
    else:
        _write(head_path, head)
    log = CheckpointLog(crate_root, repair=False)
    assert log.report.head_status == status
    assert log.latest().user_id == b"ckpt-400"
    assert (_read(head_path) if head is not None else None) == head  # repair=False: untouched
    log = CheckpointLog(crate_root)
    assert log.latest().user_id == b"ckpt-400"
    assert _read(head_path) == encode_head(b"ckpt-400")
    assert not CheckpointLog(crate_root).report.changed


@needs_fixture
def test_head_is_the_commit_point(crate_root):
    """A record fsynced before a crash prevented HEAD's replacement is listed, not latest."""
    extra = CheckpointData(b"ckpt-600", 1, 4, (1, 2, 3, 4))
    with open(os.path.join(crate_root, "checkpoints.log"), "ab") as fh:
        fh.write(encode_record(extra))
    log = CheckpointLog(crate_root)
    assert not log.report.changed
    assert log.latest().user_id == b"ckpt-400"
    assert log.get(b"ckpt-600") == extra and len(log) == 3


def test_empty_root(tmp_path):
    log = CheckpointLog(str(tmp_path))
    assert len(log) == 0 and log.list() == [] and log.bytes_size == 0 and not log.report.changed
    with pytest.raises(NoCheckpointsError):
        log.latest()
    with pytest.raises(CheckpointNotFoundError):
        log.get(b"nope")
    assert not os.path.exists(tmp_path / "checkpoints.log")
    log.append(_data(1))
    log.append(_data(2))
    assert log.latest() == _data(2) and log.get(b"ck-1") == _data(1)
    assert b"ck-1" in log and "ck-1" not in log and b"" not in log
    assert log.bytes_size == os.path.getsize(tmp_path / "checkpoints.log")
    reopened = CheckpointLog(str(tmp_path))
    assert reopened.records() == [_data(1), _data(2)] and reopened.head_id == b"ck-2"


def test_missing_root(tmp_path):
    with pytest.raises(WalIOError):
        CheckpointLog(str(tmp_path / "absent"))


def test_leftover_temp_files_are_removed(tmp_path):
    CheckpointLog(str(tmp_path)).append(_data(1))
    _write(str(tmp_path / "checkpoints.log.tmp"), b"half a compaction")
    _write(str(tmp_path / "HEAD.tmp"), b"\x01")
    log = CheckpointLog(str(tmp_path))
    assert log.report.changed and log.latest() == _data(1)
    assert sorted(os.listdir(tmp_path)) == ["HEAD", "checkpoints.log"]


def test_get_validates_the_id(tmp_path):
    log = CheckpointLog(str(tmp_path))
    with pytest.raises(TypeError):
        log.get("ck-1")
    with pytest.raises(InvalidCheckpointIdError):
        log.get(b"")
    err = CheckpointNotFoundError("no checkpoint with id b'x'")
    assert isinstance(err, KeyError) and str(err) == "no checkpoint with id b'x'"


# --- appending -----------------------------------------------------------------------------------


def test_duplicate_id_is_refused_and_nothing_changes(tmp_path):
    log = CheckpointLog(str(tmp_path))
    log.append(_data(1))
    log.append(_data(2))
    before = (_read(str(tmp_path / "checkpoints.log")), _read(str(tmp_path / "HEAD")))
    clash = CheckpointData(b"ck-1", 99, 1, (5,))
    with pytest.raises(CheckpointExistsError):
        log.append(clash)
    with pytest.raises(CheckpointExistsError):
        CheckpointLog(str(tmp_path)).append(clash)
    assert (_read(str(tmp_path / "checkpoints.log")), _read(str(tmp_path / "HEAD"))) == before
    assert log.get(b"ck-1") == _data(1) and len(log) == 2 and log.latest() == _data(2)


@needs_fixture
def test_duplicate_of_crate_id_is_refused(crate_root):
    before = _read(os.path.join(crate_root, "checkpoints.log"))
    with pytest.raises(CheckpointExistsError):
        CheckpointLog(crate_root).append(CheckpointData(b"ckpt-200", 1, 4, (0, 0, 0, 0)))
    assert _read(os.path.join(crate_root, "checkpoints.log")) == before


def test_crate_style_duplicates_later_record_wins(tmp_path):
    a1 = CheckpointData(b"a", 1, 1, (10,))
    b = CheckpointData(b"b", 2, 1, (20,))
    a2 = CheckpointData(b"a", 3, 1, (30,))
    _write(str(tmp_path / "checkpoints.log"), b"".join(encode_record(r) for r in (a1, b, a2)))
    _write(str(tmp_path / "HEAD"), encode_head(b"a"))
    log = CheckpointLog(str(tmp_path))
    assert not log.report.changed and log.report.duplicate_ids == [b"a"]
    assert log.get(b"a") == a2 and log.latest() == a2
    assert log.list() == [(b"a", 1), (b"b", 2), (b"a", 3)] and len(log) == 3
    with pytest.raises(CheckpointExistsError):
        log.append(CheckpointData(b"a", 4, 1, (40,)))
    assert log.compact(1) == (3, 1, 2 * len(encode_record(a1)))
    assert log.list() == [(b"a", 3)] and log.latest() == a2


def _fail_call(real, exc, which, *, partial=False):
    """Wrap ``real``: its call number ``which`` (from 1) fails with ``exc``, after writing half
    of the data if ``partial``; every other call goes through."""
    state = {"n": 0}

    def wrapper(fd, data, *args):
        state["n"] += 1
        if state["n"] == which:
            if partial:
                real(fd, bytes(data)[: len(data) // 2])
            raise exc
        return real(fd, data, *args)

    return wrapper


def _files(tmp_path):
    """(log bytes, HEAD bytes); None for a file that does not exist."""
    return tuple(_read(str(p)) if p.exists() else None for p in (tmp_path / "checkpoints.log", tmp_path / "HEAD"))


@pytest.mark.parametrize("which", [1, 2], ids=["HEAD.tmp", "record"])
def test_disk_full_during_append_rolls_back(tmp_path, monkeypatch, which):
    log = CheckpointLog(str(tmp_path))
    log.append(_data(1))
    before = _files(tmp_path)
    monkeypatch.setattr(layout, "write_all", _fail_call(layout.write_all, OSError(errno.ENOSPC, "No space left"), which, partial=True))
    with pytest.raises(DiskFullError) as info:
        log.append(_data(2))
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert _files(tmp_path) == before and not os.path.exists(tmp_path / "HEAD.tmp")
    assert len(log) == 1 and log.latest() == _data(1) and log.bytes_size == len(before[0])
    log.append(_data(2))  # the next attempt works (the wrapper fails only once)
    assert CheckpointLog(str(tmp_path)).records() == [_data(1), _data(2)]


def _failing_sync(monkeypatch, *, syncfs_fails: bool, file_sync_fails: bool):
    """Make the commit's sync fail: its syncfs, and/or the per-file fdatasyncs after it."""
    from ironwal_mp.engine import group_sync as gs

    calls = {"syncfs": 0, "fdatasync": 0}
    real_syncfs, real_fdatasync = gs.syncfs, os.fdatasync

    def syncfs(fd):
        calls["syncfs"] += 1
        if syncfs_fails:
            raise OSError(errno.EIO, "I/O error (another file)")
        return real_syncfs(fd)

    def fdatasync(fd):
        calls["fdatasync"] += 1
        if file_sync_fails:
            raise OSError(errno.EIO, "I/O error")
        return real_fdatasync(fd)

    monkeypatch.setattr(gs, "syncfs", syncfs)
    monkeypatch.setattr(gs.os, "fdatasync", fdatasync)
    return calls


@pytest.mark.parametrize("first", [False, True], ids=["later", "first"])
def test_sync_error_during_append_rolls_back_log_and_head(tmp_path, monkeypatch, first):
    """The rename happened before the failed sync: HEAD is put back (or removed) too."""
    log = CheckpointLog(str(tmp_path))
    if not first:
        log.append(_data(1))
    before = _files(tmp_path)
    calls = _failing_sync(monkeypatch, syncfs_fails=True, file_sync_fails=True)
    with pytest.raises(WalIOError) as info:
        log.append(_data(2))
    assert calls["fdatasync"] >= 1  # a failed syncfs is followed by per-file syncs
    assert not isinstance(info.value, DiskFullError) and info.value.errno == errno.EIO
    monkeypatch.undo()
    log_bytes, head_bytes = _files(tmp_path)
    assert (log_bytes or None, head_bytes) == before  # (a first append leaves an empty log)
    assert not os.path.exists(tmp_path / "HEAD.tmp")
    assert len(log) == (0 if first else 1) and b"ck-2" not in log
    reopened = CheckpointLog(str(tmp_path))
    assert not reopened.report.changed and reopened.records() == log.records()
    log.append(_data(2))
    assert CheckpointLog(str(tmp_path)).latest() == _data(2)


def test_failed_syncfs_falls_back_to_per_file_syncs(tmp_path, monkeypatch):
    """A syncfs error may be another file's: the per-file syncs decide, and they pass here."""
    log = CheckpointLog(str(tmp_path))
    calls = _failing_sync(monkeypatch, syncfs_fails=True, file_sync_fails=False)
    log.append(_data(1))
    assert calls["fdatasync"] == 2  # the log and HEAD (and an fsync of the root)
    assert CheckpointLog(str(tmp_path)).latest() == _data(1)


def test_commit_sync_method(tmp_path, monkeypatch):
    """One syncfs per append where allowed; with FDATASYNC never a syncfs."""
    from ironwal_mp import GroupSync
    from ironwal_mp.engine import group_sync as gs

    if gs.syncfs_device(str(tmp_path)) is None:
        pytest.skip("syncfs is not used on this filesystem or kernel")
    calls = _failing_sync(monkeypatch, syncfs_fails=False, file_sync_fails=False)
    log = CheckpointLog(str(tmp_path))
    log.append(_data(1))
    log.append(_data(2))
    assert calls == {"syncfs": 2, "fdatasync": 0}
    log = CheckpointLog(str(tmp_path), group_sync=GroupSync.FDATASYNC)
    log.append(_data(3))
    assert calls == {"syncfs": 2, "fdatasync": 2}
    assert CheckpointLog(str(tmp_path)).latest() == _data(3)


def test_head_without_its_record_is_dangling_and_falls_back(tmp_path):
    """The crash the commit's single sync allows: HEAD renamed and durable, the record not."""
    log = CheckpointLog(str(tmp_path))
    log.append(_data(1))
    log.append(_data(2))
    one = len(encode_record(_data(1)))
    with open(tmp_path / "checkpoints.log", "r+b") as fh:
        fh.truncate(one + 5)  # the second record torn; HEAD names it
    reader = CheckpointLog(str(tmp_path), repair=False)
    assert reader.report.head_status == "dangling" and reader.latest() == _data(1)
    repaired = CheckpointLog(str(tmp_path))
    assert repaired.latest() == _data(1) and _read(str(tmp_path / "HEAD")) == encode_head(b"ck-1")


def _commit_events(monkeypatch):
    """Record the log's fdatasyncs and HEAD's renames, in order."""
    events = []
    real_fdatasync, real_replace = os.fdatasync, os.replace

    def fdatasync(fd):
        events.append("fdatasync")
        return real_fdatasync(fd)

    def replace(src, dst):
        events.append("rename")
        return real_replace(src, dst)

    monkeypatch.setattr(cl.os, "fdatasync", fdatasync)
    monkeypatch.setattr(cl.os, "replace", replace)
    return events


def test_record_after_heads_is_made_durable_before_the_rename(tmp_path, monkeypatch):
    """A crash between write and rename leaves a record newer than HEAD's. A later HEAD that
    dangles would read as that record (never acknowledged), so while one exists the next record
    is synced before HEAD is renamed; once HEAD names the last record the single sync is back."""
    log = CheckpointLog(str(tmp_path))
    log.append(_data(1))
    with open(tmp_path / "checkpoints.log", "ab") as fh:  # ck-2 written, its rename never done
        fh.write(encode_record(_data(2)))
    log = CheckpointLog(str(tmp_path))
    assert log.latest() == _data(1) and len(log) == 2
    events = _commit_events(monkeypatch)
    log.append(_data(3))
    assert events[:2] == ["fdatasync", "rename"]
    events.clear()
    log.append(_data(4))
    assert events[0] == "rename"  # HEAD named the last record: one sync after the rename
    monkeypatch.undo()
    assert CheckpointLog(str(tmp_path)).latest() == _data(4)


def test_prepared_head_opens_the_directory_before_writing(tmp_path, monkeypatch):
    """The commit's syncfs reports only writeback errors after its descriptor was opened."""
    opened = []
    real_open = os.open

    def recording_open(path, *args, **kwargs):
        opened.append(os.path.basename(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(cl.os, "open", recording_open)
    log = CheckpointLog(str(tmp_path))
    opened.clear()
    log.append(_data(1))
    assert opened[:3] == [tmp_path.name, "HEAD.tmp", "checkpoints.log"]


def test_failed_restore_of_head_refuses_further_appends(tmp_path, monkeypatch):
    """The sync fails and putting HEAD back fails too: the error is raised, memory still says
    ck-1, later appends are refused, and a repairing open reads ck-1 (HEAD dangles)."""
    log = CheckpointLog(str(tmp_path))
    log.append(_data(1))
    _failing_sync(monkeypatch, syncfs_fails=True, file_sync_fails=True)

    def broken(path, data):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(layout, "write_file_atomic", broken)
    with pytest.raises(WalIOError):
        log.append(_data(2))
    monkeypatch.undo()
    assert log.latest() == _data(1) and b"ck-2" not in log
    with pytest.raises(WalIOError, match="put HEAD back"):
        log.append(_data(3))
    reopened = CheckpointLog(str(tmp_path))
    assert reopened.report.head_status == "dangling" and reopened.latest() == _data(1)


def test_prepared_head_must_match_the_record(tmp_path):
    log = CheckpointLog(str(tmp_path))
    head = log.prepare_head(b"ck-1")
    with pytest.raises(ValueError):
        log.append(_data(2), head)
    assert not os.path.exists(tmp_path / "HEAD.tmp") and len(log) == 0


def test_one_prepared_head_at_a_time(tmp_path):
    """Two prepared HEADs would share HEAD.tmp (the first rename would publish the second's
    id), so a second is refused; a used one cannot be used or discarded again."""
    log = CheckpointLog(str(tmp_path))
    first = log.prepare_head(b"ck-1")
    with pytest.raises(RuntimeError, match="already prepared"):
        log.prepare_head(b"ck-2")
    with pytest.raises(RuntimeError, match="already prepared"):
        log.append(_data(2))
    log.append(_data(1), first)
    with pytest.raises(ValueError, match="already appended or discarded"):
        log.append(_data(1), first)
    second = log.prepare_head(b"ck-2")
    log.discard_head(first)  # stale: must not remove the second's HEAD.tmp
    assert _read(str(tmp_path / "HEAD.tmp")) == encode_head(b"ck-2")
    log.append(_data(2), second)
    assert CheckpointLog(str(tmp_path)).latest() == _data(2) and not os.path.exists(tmp_path / "HEAD.tmp")


@pytest.mark.parametrize("where", ["write", "sync"])
def test_interrupt_during_append_rolls_back(tmp_path, monkeypatch, where):
    """A KeyboardInterrupt after the record's write began is rolled back like an I/O error:
    otherwise the file would hold a record that memory does not, and the next append would
    be written over it at the old length."""
    log = CheckpointLog(str(tmp_path))
    log.append(_data(1))
    before = _files(tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    if where == "write":
        monkeypatch.setattr(layout, "write_all", _fail_call(layout.write_all, KeyboardInterrupt(), 2, partial=True))
    else:
        monkeypatch.setattr(cl, "sync_files", interrupted)
    with pytest.raises(KeyboardInterrupt):
        log.append(_data(2))
    monkeypatch.undo()
    assert _files(tmp_path) == before and not os.path.exists(tmp_path / "HEAD.tmp")
    assert log.latest() == _data(1) and len(log) == 1
    log.append(_data(3))
    reopened = CheckpointLog(str(tmp_path))
    assert not reopened.report.changed and reopened.records() == [_data(1), _data(3)]


@pytest.mark.parametrize("head", [encode_head(b"ck-1"), b"\x05\x00ab"], ids=["dangling", "corrupt"])
def test_repair_removes_a_head_with_no_records(tmp_path, head):
    """A power loss during the first checkpoint can leave HEAD without its record. The crate
    answers CheckpointNotFound for a dangling HEAD, so repair removes it (NoCheckpoints)."""
    _write(str(tmp_path / "HEAD"), head)
    reader = CheckpointLog(str(tmp_path), repair=False)
    assert reader.report.changed and "no records" in " ".join(reader.report.actions)
    with pytest.raises(NoCheckpointsError):
        reader.latest()
    assert os.path.exists(tmp_path / "HEAD")
    repaired = CheckpointLog(str(tmp_path))
    assert "removed HEAD" in " ".join(repaired.report.actions) and not os.path.exists(tmp_path / "HEAD")
    assert not CheckpointLog(str(tmp_path)).report.changed


def test_append_type_check(tmp_path):
    with pytest.raises(TypeError):
        CheckpointLog(str(tmp_path)).append((b"x", 1, 0, ()))


def test_concurrent_appends(tmp_path):
    log = CheckpointLog(str(tmp_path))
    errors = []

    def worker(t):
        try:
            for i in range(25):
                log.append(CheckpointData(f"t{t}-{i}".encode(), i, 2, (t, i)))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert len(log) == 200
    reopened = CheckpointLog(str(tmp_path))
    assert not reopened.report.changed
    assert reopened.records() == log.records()
    assert reopened.latest() == log.latest() == log.records()[-1]


# --- compaction ----------------------------------------------------------------------------------


def test_compact_keeps_newest_n(tmp_path):
    log = CheckpointLog(str(tmp_path))
    for i in range(10):
        log.append(_data(i))
    head = _read(str(tmp_path / "HEAD"))
    size = log.bytes_size
    before, after, reclaimed = log.compact(3)
    assert (before, after) == (10, 3)
    kept = [_data(i) for i in (7, 8, 9)]
    expected_bytes = b"".join(encode_record(r) for r in kept)
    assert reclaimed == size - len(expected_bytes) > 0
    assert _read(str(tmp_path / "checkpoints.log")) == expected_bytes
    assert _read(str(tmp_path / "HEAD")) == head
    assert log.records() == kept and len(log) == 3 and log.bytes_size == len(expected_bytes)
    with pytest.raises(CheckpointNotFoundError):
        log.get(b"ck-0")
    assert sorted(os.listdir(tmp_path)) == ["HEAD", "checkpoints.log"]
    reopened = CheckpointLog(str(tmp_path))
    assert not reopened.report.changed
    assert reopened.records() == kept and reopened.latest() == _data(9)
    reopened.append(_data(10))
    assert [u for u, _ in CheckpointLog(str(tmp_path)).list()][-2:] == [b"ck-9", b"ck-10"]


@pytest.mark.parametrize("crash_left", [False, True])
def test_a_reader_racing_a_commit_never_pairs_a_new_head_with_an_old_log(tmp_path, monkeypatch, crash_left):
    """A reader (a client's load_latest_checkpoint) read the log, then HEAD. A commit between the
    two reads paired the new HEAD with the old log: HEAD named an id that compaction had freed
    and the commit used again, and the reader returned the old record of that id; or HEAD named
    a record the old log lacked, and the reader fell back to a record a crash had left
    unanswered, which was never the latest. The answer must be the latest at some moment of the
    call: the one before the commit, or the one it made."""
    root = str(tmp_path)
    writer = CheckpointLog(root)
    old_a = CheckpointData(b"A", 1, 2, (1, 1))
    writer.append(old_a)
    for i in range(3):
        writer.append(CheckpointData(b"F%d" % i, 2 + i, 2, (2 + i, 2 + i)))
    if crash_left:  # a record whose HEAD rename a crash prevented (its caller got no answer)
        _write(os.path.join(root, "checkpoints.log"),
               _read(os.path.join(root, "checkpoints.log")) + encode_record(CheckpointData(b"U", 9, 2, (9, 9))))
        writer = CheckpointLog(root)
    before = writer.latest()
    new_a = CheckpointData(b"C" if crash_left else b"A", 10, 2, (10, 10))
    real_read = cl._read_file
    reads = []

    def read_then_commit(path):
        data = real_read(path)
        reads.append(path)
        if len(reads) == 1:  # between the reader's two reads
            if not crash_left:
                writer.compact(3)  # frees the id A
            writer.append(new_a)
        return data

    monkeypatch.setattr(cl, "_read_file", read_then_commit)
    got = CheckpointLog(root, repair=False).latest()
    monkeypatch.setattr(cl, "_read_file", real_read)
    assert len(reads) == 2
    assert got in (before, new_a), got
    assert CheckpointLog(root, repair=False).latest() == new_a


def test_compact_with_nothing_to_drop(tmp_path):
    log = CheckpointLog(str(tmp_path))
    assert log.compact(1) == (0, 0, 0)
    log.append(_data(1))
    log.append(_data(2))
    before = _read(str(tmp_path / "checkpoints.log"))
    assert log.compact(2) == (2, 2, 0)
    assert log.compact(5) == (2, 2, 0)
    assert _read(str(tmp_path / "checkpoints.log")) == before


@pytest.mark.parametrize("n", [0, -1, 1.5, True, "2", None])
def test_compact_rejects_bad_n(tmp_path, n):
    from ironwal_mp.errors import ConfigError

    log = CheckpointLog(str(tmp_path))
    log.append(_data(1))
    with pytest.raises(ConfigError if isinstance(n, int) and not isinstance(n, bool) else TypeError):
        log.compact(n)
    assert len(log) == 1


def test_compact_never_drops_heads_record(tmp_path):
    recs = [_data(i) for i in range(4)]
    _write(str(tmp_path / "checkpoints.log"), b"".join(encode_record(r) for r in recs))
    _write(str(tmp_path / "HEAD"), encode_head(b"ck-1"))  # as after crashes before HEAD moved
    log = CheckpointLog(str(tmp_path))
    assert log.latest() == recs[1]
    assert log.compact(1) == (4, 2, 2 * len(encode_record(recs[0])))
    assert log.records() == [recs[1], recs[3]] and log.latest() == recs[1]
    assert CheckpointLog(str(tmp_path)).latest() == recs[1]


@needs_fixture
def test_compact_crate_log(crate_root):
    log = CheckpointLog(crate_root)
    assert log.compact(1) == (2, 1, RECORD_LEN)
    full = _read(os.path.join(SHARDED, "checkpoints.log"))
    assert _read(os.path.join(crate_root, "checkpoints.log")) == full[RECORD_LEN:]
    assert CheckpointLog(crate_root).latest().user_id == b"ckpt-400"


def test_compact_failure_leaves_log_intact(tmp_path, monkeypatch):
    log = CheckpointLog(str(tmp_path))
    for i in range(4):
        log.append(_data(i))
    before = _read(str(tmp_path / "checkpoints.log"))

    def broken(path, data):
        _write(path + ".tmp", data[:3])
        raise OSError(errno.ENOSPC, "No space left")

    monkeypatch.setattr(layout, "prepare_atomic", broken)
    with pytest.raises(DiskFullError):
        log.compact(1)
    monkeypatch.undo()
    assert _read(str(tmp_path / "checkpoints.log")) == before and len(log) == 4
    assert sorted(os.listdir(tmp_path)) == ["HEAD", "checkpoints.log"]


def test_a_compaction_whose_rename_is_not_made_durable_refuses_appends_and_loses_nothing(tmp_path, monkeypatch):
    """The directory fsync after the rename failed: memory kept the old records and length, so
    the next checkpoint was acknowledged, written past a hole of zeros in the shorter file, read
    back as corrupt and cut at the next open (found by a kill/failure review)."""
    from ironwal_mp.errors import WalIOError

    log = CheckpointLog(str(tmp_path))
    for i in range(4):
        log.append(_data(i))

    def eio(path):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(layout, "fsync_dir", eio)
    with pytest.raises(WalIOError) as info:
        log.compact(1)
    monkeypatch.undo()
    assert "new ones are refused until the WAL is reopened" in str(info.value)
    on_disk = _read(str(tmp_path / "checkpoints.log"))
    assert len(log) == 1 and len(on_disk) == log._size  # memory follows the file in place
    with pytest.raises(WalIOError, match="refuses writes"):
        log.append(_data(9))
    assert log.latest().user_id == _data(3).user_id
    reopened = CheckpointLog(str(tmp_path))
    assert [r.user_id for r in reopened.records()] == [_data(3).user_id]
    reopened.append(_data(9))
    assert reopened.latest().user_id == _data(9).user_id
    assert [r.user_id for r in CheckpointLog(str(tmp_path)).records()] == [_data(3).user_id, _data(9).user_id]
