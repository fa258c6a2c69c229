"""Regression: a block that ends exactly at the end of the ring's data area.

The next block then starts at offset 0 with no skip in between. The worker must still cut its
slices at the end of the area (a slice read across it as if contiguous would turn the next
records into a frame whose payload and count disagree).
"""

import struct

import posix_ipc
import pytest

from ironwal_mp.engine.frame import decode_entries, encode_entries
from ironwal_mp.ipc import ring_layout as L
from ironwal_mp.ipc.names import Names
from ironwal_mp.ipc.ring import Ring
from ringutil import TEST_EPOCH

CAP = 4096


@pytest.fixture
def ring(tmp_path):
    names = Names(str(tmp_path))
    wake = posix_ipc.Semaphore(names.worker_wake(0), posix_ipc.O_CREAT)
    r = Ring(names, 0, capacity=CAP, create=True)
    r.epoch = TEST_EPOCH
    r.set_state(L.ST_OPEN)
    try:
        yield r
    finally:
        r.unlink()
        r.close()
        wake.unlink()
        wake.close()
    assert names.leftovers() == []


def drain(ring):
    """Every slice the worker would take now, decoded (and checked) as its frame would be."""
    out = []
    while True:
        s = ring.next_slice()
        if s is None:
            return out
        assert s.offset + s.length <= CAP, f"slice {s} crosses the end of the data area"
        payload = bytes(ring.data[s.offset : s.offset + s.length])
        out.extend(decode_entries(payload, s.count))
        ring.consume(s)


@pytest.mark.parametrize("single", [True, False], ids=["append_one", "publish"])
@pytest.mark.parametrize("lead", [1000, 2500, 4000])
def test_exact_fill_to_the_end_then_more(ring, single, lead):
    append = ring.make_appender()
    first = b"a" * (lead - 4)
    append(first)
    assert drain(ring) == [first]  # head now sits `lead` bytes into the area
    # pending records that end exactly at the end of the area, then more from offset 0
    room = CAP - (ring.published()[0] & (CAP - 1))
    before = [b"b" * 10, b"c" * (room - 14 - 4 - 8)]  # 14 + len(c) + 4 ... see the total below
    exact = b"x" * 4
    assert sum(4 + len(r) for r in before + [exact]) == room
    for rec in before:
        append(rec)
    if single:
        append(exact)
    else:
        ring.publish(encode_entries([exact]), 1)
    assert ring.published()[0] % CAP == 0
    more = [b"after-%d" % i for i in range(20)]
    for m in more:
        append(m)
    assert drain(ring) == before + [exact] + more


def test_many_cycles_with_mixed_sizes_never_tear(ring):
    append = ring.make_appender()
    sent, got = [], []
    size = 1
    for i in range(3000):
        size = (size * 7 + 13) % 300  # sizes that land exactly on the end now and then
        rec = struct.pack("<I", i) + b"z" * size
        if i % 5 == 0:
            ring.publish(encode_entries([rec, rec]), 2)
            sent += [rec, rec]
        else:
            append(rec)
            sent.append(rec)
        if i % 3 == 0:
            got += drain(ring)
    got += drain(ring)
    assert got == sent
