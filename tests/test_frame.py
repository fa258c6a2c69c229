import struct
import zlib

import lz4.frame
import pytest
from hypothesis import given, strategies as st

from ironwal_mp.engine import frame as fr


def test_header_layout_matches_the_format():
    data = fr.frame_for_entries(7, [b"abc", b""])
    magic, crc, start, count, ftype, disk, raw = struct.unpack_from("<IIQIBII", data)
    assert data[:4] == b"LAWL" and magic == fr.MAGIC
    assert (start, count, ftype) == (7, 2, fr.TYPE_RAW)
    assert data[29:32] == b"\0\0\0"
    payload = data[32:]
    assert payload == b"\x03\0\0\0abc\0\0\0\0" and disk == raw == len(payload)
    expected_crc = zlib.crc32(struct.pack("<QIBI", 7, 2, 0, len(payload)) + payload)
    assert crc == expected_crc


def test_crc_does_not_cover_magic_or_uncompressed_size():
    data = bytearray(fr.frame_for_entries(0, [b"x" * 10]))
    header, entries = fr.decode_frame_at(bytes(data))
    assert entries == [b"x" * 10]
    data[25] ^= 0xFF  # uncompressed size: not covered by the CRC, but checked for raw frames
    with pytest.raises(fr.FrameError):
        fr.decode_frame_at(bytes(data))


@pytest.mark.parametrize("offset", [4, 8, 16, 20, 21, 32, 40])
def test_any_covered_byte_flip_is_detected(offset):
    data = bytearray(fr.frame_for_entries(3, [b"hello world", b"again"]))
    data[offset] ^= 0x01
    with pytest.raises(fr.FrameError):
        fr.decode_frame_at(bytes(data))


def test_lz4_is_used_only_when_large_enough_and_smaller():
    small = [b"a" * 100]
    assert fr.frame_for_entries(0, small, compress=True, min_compression_size=1024)[20] == fr.TYPE_RAW
    big = [b"abcd" * 500]
    data = fr.frame_for_entries(0, big, compress=True, min_compression_size=1024)
    assert data[20] == fr.TYPE_LZ4 and len(data) < 2000
    header, entries = fr.decode_frame_at(data)
    assert entries == big and header.uncompressed_size == 2004
    # the stored payload is a standard LZ4 frame
    assert lz4.frame.decompress(data[32:]) == fr.encode_entries(big)
    # incompressible data stays raw even above the threshold
    noise = [bytes((i * 7919 + 13) % 251 for i in range(3000))]
    assert fr.frame_for_entries(0, noise, compress=True, min_compression_size=10)[20] in (0, 1)
    import os

    rnd = [os.urandom(3000)]
    assert fr.frame_for_entries(0, rnd, compress=True, min_compression_size=10)[20] == fr.TYPE_RAW
    # the threshold counts the batch encoding (4-byte prefix included), and a payload of exactly
    # that size is tried (FORMAT.md: "at least min_compression_size")
    exact = [b"a" * 996]
    assert fr.frame_for_entries(0, exact, compress=True, min_compression_size=1000)[20] == fr.TYPE_LZ4
    assert fr.frame_for_entries(0, exact, compress=True, min_compression_size=1001)[20] == fr.TYPE_RAW


def test_compression_disabled_means_raw():
    data = fr.frame_for_entries(0, [b"a" * 5000], compress=False)
    assert data[20] == fr.TYPE_RAW


@pytest.mark.parametrize(
    "mutate,reason",
    [
        (lambda b: b[:10], "partial header"),
        (lambda b: b"XXXX" + b[4:], "bad magic"),
        (lambda b: b[:20] + b"\x07" + b[21:], "unknown frame type"),
        (lambda b: b[:16] + b"\0\0\0\0" + b[20:], "no entries"),
    ],
)
def test_parse_header_rejects(mutate, reason):
    data = fr.frame_for_entries(0, [b"abc"])
    with pytest.raises(fr.FrameError, match=reason):
        fr.parse_header(mutate(data))


def test_truncated_payload_and_crc_reasons():
    data = fr.frame_for_entries(0, [b"abcdef"])
    header = fr.parse_header(data)
    with pytest.raises(fr.FrameError, match="truncated"):
        fr.check_payload(header, data[32:-1])
    bad = bytearray(data[32:])
    bad[-1] ^= 1
    with pytest.raises(fr.FrameError) as info:
        fr.check_payload(header, bytes(bad))
    assert info.value.is_crc and info.value.crc_expected == header.crc


def test_decode_entries_rejects_inconsistent_payloads():
    payload = fr.encode_entries([b"ab", b"cde"])
    assert fr.decode_entries(payload, 2) == [b"ab", b"cde"]
    with pytest.raises(fr.FrameError):
        fr.decode_entries(payload, 3)
    with pytest.raises(fr.FrameError):
        fr.decode_entries(payload, 1)  # trailing bytes
    with pytest.raises(fr.FrameError):
        fr.decode_entries(payload[:-1], 2)


def test_same_size_entries_are_checked_prefix_by_prefix():
    """Entries of one size take a shortcut; a single wrong length prefix must still be caught."""
    payload = bytearray(fr.encode_entries([b"abcd"] * 6))
    assert fr.decode_entries(bytes(payload), 6) == [b"abcd"] * 6
    assert fr.entry_at(bytes(payload), 6, 5) == b"abcd"
    # as long as six entries of four bytes, but not of one size: no shortcut may be taken
    mixed_entries = [b"abcd"] * 3 + [b"abc", b"abcde", b"abcd"]
    mixed = fr.encode_entries(mixed_entries)
    assert len(mixed) == len(payload)
    assert fr.decode_entries(mixed, 6) == mixed_entries
    assert [fr.entry_at(mixed, 6, i) for i in range(6)] == mixed_entries
    for i in range(4):  # any one byte of one prefix
        bad = bytearray(fr.encode_entries([b"xy"] * 5))
        bad[2 * 6 + i] ^= 0x40
        with pytest.raises(fr.FrameError):
            fr.decode_entries(bytes(bad), 5)
        with pytest.raises(fr.FrameError):
            fr.entry_at(bytes(bad), 5, 0)


def test_the_shortcut_is_taken_for_one_size_only():
    """``_uniform_stride`` (found by a mutation audit): a shortcut that took a mixed payload for
    one of a single size would split it at the wrong places. Here every prefix byte differs from
    the would-be stride's, so only the comparison itself can tell."""
    assert fr._uniform_stride(fr.encode_entries([b"ab"] * 3), 3) == 6
    assert fr._uniform_stride(fr.encode_entries([b""] * 3), 3) == 4  # (entries of no bytes)
    assert fr._uniform_stride(fr.encode_entries([b"ab"] * 3), 2) == 0
    mixed = [b"x" * 300, b"yy"]  # 310 bytes: "two entries of 151" by size alone
    payload = fr.encode_entries(mixed)
    assert len(payload) % 2 == 0 and fr._uniform_stride(payload, 2) == 0
    assert fr.decode_entries(payload, 2) == mixed and list(fr.entry_bounds(payload, 2)) == [0, 304, 310]


def test_frame_error_reasons_name_what_is_wrong():
    """Only a CRC mismatch is reported as one (the reader raises CrcMismatchError for those);
    the bytes left over are counted; a header cut short at an offset is a partial header (the
    tail search parses candidates near the end of its buffer)."""
    assert not fr.FrameError("bad magic").is_crc
    with pytest.raises(fr.FrameError, match="payload has 3 bytes after its 1 entries"):
        fr.decode_entries(fr.encode_entries([b"ab"]) + b"xyz", 1)
    data = fr.frame_for_entries(0, [b"abc"])
    buf = b"\0" * 40 + data[:31]
    for offset in (40, 50, 70):
        with pytest.raises(fr.FrameError, match="partial header"):
            fr.parse_header(buf, offset)
    assert fr.parse_header(b"\0" * 40 + data, 40).count == 1


@given(st.lists(st.binary(max_size=40), min_size=1, max_size=30), st.data())
def test_entry_at_agrees_with_decode_entries(entries, data):
    payload = fr.encode_entries(entries)
    assert fr.decode_entries(payload, len(entries)) == entries
    i = data.draw(st.integers(0, len(entries) - 1))
    assert fr.entry_at(payload, len(entries), i) == entries[i]
    cut = data.draw(st.integers(0, len(payload) - 1))
    for damaged, count in ((payload[:cut], len(entries)), (payload, len(entries) + 1)):
        with pytest.raises(fr.FrameError):
            fr.decode_entries(damaged, count)
        with pytest.raises(fr.FrameError):
            fr.entry_at(damaged, count, 0)


@given(
    st.integers(0, 2**64 - 1 - 1000),
    st.lists(st.binary(max_size=3000), min_size=1, max_size=20),
    st.booleans(),
    st.integers(0, 4096),
)
def test_round_trip(start, entries, compress, threshold):
    data = fr.frame_for_entries(start, entries, compress=compress, min_compression_size=threshold)
    header, decoded = fr.decode_frame_at(data)
    assert decoded == entries
    assert header.start_id == start and header.count == len(entries)
    assert header.frame_size == len(data)


def _reader(buf: bytes):
    return lambda off, n: buf[off : off + n]


def test_tail_frame_finds_the_frame_that_ends_the_file():
    from ironwal_mp.engine.scanner import tail_frame

    frames = [fr.encode_frame(10 + i, 1, fr.encode_entries([b"e%d" % i])) for i in range(50)]
    buf = b"".join(frames)
    header = tail_frame(_reader(buf), len(buf))
    assert (header.start_id, header.count) == (59, 1)
    # a torn last frame, garbage after the last one, or an empty file: no answer
    assert tail_frame(_reader(buf[:-1]), len(buf) - 1) is None
    assert tail_frame(_reader(buf + b"\0" * 7), len(buf) + 7) is None
    assert tail_frame(_reader(b""), 0) is None
    # a compressed frame is proven to decode
    big = fr.encode_frame(60, 2, fr.encode_entries([b"a" * 5000, b"b" * 5000]), compress=True)
    assert big[20] == fr.TYPE_LZ4 and tail_frame(_reader(buf + big), len(buf) + len(big)).start_id == 60


def test_tail_frame_looks_past_its_first_window_for_a_large_last_frame():
    from ironwal_mp.engine.scanner import tail_frame

    last = fr.encode_frame(7, 1, fr.encode_entries([bytes(range(256)) * 1024]))  # 256 KiB
    buf = fr.encode_frame(6, 1, fr.encode_entries([b"x"])) + last
    assert tail_frame(_reader(buf), len(buf), windows=(4096, 1 << 20)).start_id == 7
    assert tail_frame(_reader(buf), len(buf), windows=(4096, 65536)) is None, "beyond every window"


def test_tail_frame_finds_the_innermost_frame_an_entry_holds():
    """Documented limit: callers only use the answer to confirm what they expect."""
    from ironwal_mp.engine.scanner import tail_frame

    inner = fr.encode_frame(900, 3, fr.encode_entries([b"p", b"q", b"r"]))
    buf = fr.encode_frame(5, 1, fr.encode_entries([inner]))
    assert tail_frame(_reader(buf), len(buf)).start_id == 900
