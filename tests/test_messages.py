"""The control-message codec (ipc/messages.py): pure, no queues."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ironwal_mp.ipc import messages as M


def test_kind_names_name_every_kind_once():
    kinds = {"ATTACH", "DETACH", "CHECKPOINT", "PRUNE", "COMPACT", "SHUTDOWN", "PING", "OK", "ERROR",
             "READY", "PREPARE", "COMMIT", "ABORT", "TRUNCATE", "STOP", "PREPARED", "TRUNCATED", "FAILED",
             "STOPPED"}
    assert {M.KIND_NAMES[getattr(M, k)] for k in kinds} == kinds
    assert len(M.KIND_NAMES) == len(kinds), M.KIND_NAMES
    # the coordinator's exit status 3 is not a message kind (it once named kind 3 in logs)
    assert M.KIND_NAMES[M.CHECKPOINT] == "CHECKPOINT" and "EXIT_LOCKED" not in M.KIND_NAMES.values()


bodies = st.dictionaries(
    st.text(max_size=8),
    st.one_of(st.integers(0, 2**64 - 1), st.binary(max_size=3000), st.text(max_size=50),
              st.lists(st.integers(-5, 5), max_size=20)),
    max_size=6,
)


@settings(max_examples=60, deadline=None)
@given(body=bodies, size=st.sampled_from([128, 256, 1024]))
def test_any_body_round_trips_in_parts_no_larger_than_the_queue_message(body, size):
    msg = M.Message(M.CHECKPOINT, 4_194_303, 2**64 - 1, body)
    parts = M.encode(msg, size)
    assert all(len(p) <= size for p in parts)
    asm = M.Assembler()
    got = [asm.feed(p) for p in parts]
    assert got[:-1] == [None] * (len(parts) - 1)
    assert got[-1] == msg


def test_a_64_kib_checkpoint_id_fits_the_default_size_and_senders_may_interleave():
    big = M.Message(M.CHECKPOINT, 11, 1, {"id": b"x" * 65535})
    small = M.Message(M.PING, 12, 1, {})
    other = M.Message(M.CHECKPOINT, 13, 7, {"id": b"y" * 5000})
    a, c = M.encode(big), M.encode(other)
    assert all(len(p) <= M.MAX_MESSAGE for p in a + c) and len(a) > 60
    asm = M.Assembler()
    out = []
    for i in range(max(len(a), len(c))):
        for parts in (a, c):
            if i < len(parts) and (m := asm.feed(parts[i])) is not None:
                out.append(m)
        if i == 2:
            out.append(asm.feed(M.encode(small)[0]))
    assert out == [small, other, big]


@pytest.mark.parametrize("raw", [
    b"\xc1",                                                   # not msgpack
    msgpack.packb(5),                                          # not an array
    msgpack.packb([1, 2, 3]),                                  # wrong arity
    msgpack.packb([1, 2, 3, 0, 1, 5]),                         # chunk is not bytes
    msgpack.packb(["x", 2, 3, 0, 1, b""]),                     # kind is not an int
    msgpack.packb([1, 2, 3, 1, 1, b""], use_bin_type=True),    # part outside 0..parts-1
    msgpack.packb([1, 2, 3, 0, 0, b""], use_bin_type=True),    # no parts at all
    msgpack.packb([1, 2, 3, 0, 1, msgpack.packb([1])], use_bin_type=True),   # body not a map
    msgpack.packb([1, 2, 3, 0, 1, b"\xc1"], use_bin_type=True),             # body not msgpack
])
def test_a_malformed_part_is_a_value_error_and_the_assembler_goes_on(raw):
    asm = M.Assembler()
    with pytest.raises(ValueError, match="malformed control message"):
        asm.feed(raw)
    msg = M.Message(M.PING, 1, 2, {"k": 1})
    assert asm.feed(M.encode(msg)[0]) == msg


def test_a_part_out_of_order_drops_that_message_only():
    msg = M.Message(M.CHECKPOINT, 3, 9, {"id": b"z" * 3000})
    parts = M.encode(msg)
    asm = M.Assembler()
    assert asm.feed(parts[0]) is None
    with pytest.raises(ValueError, match="out of order"):
        asm.feed(parts[2])
    assert [asm.feed(p) for p in parts][-1] == msg


def test_errors_cross_with_their_type_message_and_attributes():
    from ironwal_mp import errors as E

    cases = [
        E.ShardCountMismatchError(4, 16),
        E.WalIOError("fsync failed", 28, "/data/shard_01/x.wal"),
        E.DiskFullError("no space", 28, "/data"),
        E.SharedMemoryError("cannot create /x: lower ring_size"),
        E.WalIOError("no errno", None, "/p"),
        E.CrcMismatchError("/data/s/0.wal", 4096, 1, 2),
        E.ConfigError("keep_latest_n", "must be at least 1, got 0"),
        E.CheckpointNotFoundError(b"raft-1"),
        E.CorruptionError("/data/s/1.wal", 12, "truncated payload"),
        E.RecordTooLargeError(5000, 4096, "shard 1 ring block"),
        E.InvalidStreamNameError("../x", "a path separator"),
        E.CheckpointAbortedError("shards [3] have failed"),
    ]
    for exc in cases:
        body = msgpack.unpackb(msgpack.packb(M.error_body(exc), use_bin_type=True), raw=False)
        got = M.error_from_body(body)
        assert type(got) is type(exc) and str(got) == str(exc)
        for name in M.ERROR_ATTRS:
            assert getattr(got, name, None) == getattr(exc, name, None), (exc, name)
    assert isinstance(M.error_from_body({"type": "KeyboardInterrupt", "message": "x"}), E.WalError)
    assert type(M.error_from_body({"type": "NoSuchError", "message": "m"})) is E.WalError


def test_an_os_error_crosses_as_wal_io_error_or_disk_full_with_its_errno_and_file():
    """A start-up's raw OSError (LOCK or MANIFEST on a full disk, an unwritable root) reached
    the client as a bare WalError: no OSError, errno None, no path."""
    import errno

    from ironwal_mp import errors as E

    cases = [
        (OSError(errno.ENOSPC, "No space left on device", "/r/MANIFEST.tmp"), E.DiskFullError),
        (OSError(errno.EDQUOT, "Disk quota exceeded", "/r/LOCK"), E.DiskFullError),
        (PermissionError(errno.EACCES, "Permission denied", "/r"), E.WalIOError),
        (OSError(errno.EIO, "Input/output error"), E.WalIOError),
    ]
    for exc, kind in cases:
        body = msgpack.unpackb(msgpack.packb(M.error_body(exc), use_bin_type=True), raw=False)
        got = M.error_from_body(body)
        assert type(got) is kind and isinstance(got, OSError), (exc, got)
        assert got.errno == exc.errno and got.path == exc.filename, (exc, got.errno, got.path)
        assert exc.strerror in str(got) and (exc.filename is None or exc.filename in str(got))
    # one converter: errors.io_error, which keeps an ironwal_mp error as it is
    already = E.DiskFullError("x", errno.ENOSPC, "/p")
    assert E.io_error(already) is already
    named = E.io_error(OSError(errno.ENOSPC, "No space left on device"), "/r/LOCK", "writing")
    assert isinstance(named, E.DiskFullError) and named.path == "/r/LOCK" and "writing /r/LOCK failed" in str(named)
    # what the failure leaves goes after the reason, the disk-full note last
    noted = E.io_error(OSError(errno.ENOSPC, "No space left on device"), "/s/0.wal", "fsyncing", "full", "in doubt")
    assert str(noted) == "fsyncing /s/0.wal failed: No space left on device; in doubt (full)"


def test_an_error_naming_a_path_that_is_not_utf8_still_crosses():
    """A root whose name is not UTF-8 put a lone surrogate in an error's message and path, and
    msgpack refused it: the worker that should report its start-up error died with a
    traceback instead, and the start said only "exited with status 1"."""
    from ironwal_mp import errors as E

    path = b"/data/w\xff/shard_01/0.wal".decode("utf-8", "surrogateescape")
    exc = E.CorruptionError(path, 37, "bad magic")
    got = M.error_from_body(msgpack.unpackb(msgpack.packb(M.error_body(exc)), raw=False))
    assert type(got) is E.CorruptionError
    assert got.path == "/data/w\\xff/shard_01/0.wal" and "/data/w\\xff/shard_01" in str(got)
    assert M.error_body(E.WalError("lone \ud800 surrogate"))["message"] == "lone \\xed\\xa0\\x80 surrogate"


def test_text_limit_cuts_each_string_and_says_how_much():
    from ironwal_mp import errors as E

    exc = E.WalIOError("m" * 5000, 5, "p" * 3000)
    body = M.error_body(exc, text_limit=1024)
    assert body["message"].startswith("m" * 900) and body["message"].endswith("... [4008 bytes cut]")
    assert body["attrs"]["path"].endswith("... [2008 bytes cut]") and body["attrs"]["errno"] == 5
    assert len(M.encode(M.Message(M.ERROR, 0, 0, body))) <= 3  # (of the queue's 10 parts)
    assert M.error_body(E.WalError("short"), text_limit=1024)["message"] == "short"


def test_any_body_string_that_is_not_utf8_is_sent_escaped():
    """A worker's FAILED (a prepare or truncate that failed on a non-UTF-8 root) carries the
    error's text, path included: msgpack refused it and the worker died in its reply."""
    bad = "write /w\udcff/shard_00 failed"
    parts = M.encode(M.Message(M.FAILED, 1, 9, {"error": bad, "nested": [{"k\udcfe": bad}], "n": 3}))
    a = M.Assembler()
    got = [a.feed(p) for p in parts][-1]
    want = "write /w\\xff/shard_00 failed"
    assert got.body == {"error": want, "nested": [{"k\\xfe": want}], "n": 3}


def test_a_message_left_unfinished_does_not_swallow_the_next_under_its_key():
    """A worker killed while sending a multi-part start-up ERROR (req_id 0) left its first part
    behind; the restarted worker's ERROR under the same key was then dropped part by part as
    "out of order". A new first part now starts the message afresh."""
    old = M.encode(M.Message(M.ERROR, 2, 0, {"message": "a" * 3000}))
    new_msg = M.Message(M.ERROR, 2, 0, {"message": "b" * 3000})
    asm = M.Assembler()
    assert asm.feed(old[0]) is None
    got = [asm.feed(p) for p in M.encode(new_msg)]
    assert got[-1] == new_msg and got[:-1] == [None] * (len(got) - 1)
