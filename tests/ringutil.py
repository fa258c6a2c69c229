"""Helpers shared by the ring tests (tests/test_ring.py) and the child processes they start.

Child processes run ``python -c <script>`` with this directory on ``sys.path`` and call one of
the ``child_*`` functions below, so all their logic lives here rather than in strings.
"""

from __future__ import annotations

import array
import os
import signal
import select
import struct
import subprocess
import sys
import time
from typing import Iterable, List, Optional, Sequence, Tuple

from ironwal_mp.ipc import ring_layout as L
from ironwal_mp.ipc.names import Names
from ironwal_mp.ipc.ring import Ring

HERE = os.path.dirname(os.path.abspath(__file__))
_LEN = struct.Struct("<I")
_PID_CTR = struct.Struct("<II")
#: the coordinator epoch the test rings are open under (a worker and a client would read it
#: from the control block), so that appenders take the fast path
TEST_EPOCH = 0x5EED


def attach(root: str, shard: int) -> Ring:
    """Attach to a test ring as a producer of the test's coordinator epoch."""
    ring = Ring(Names(root), shard)
    ring.epoch = TEST_EPOCH
    return ring


# --- record encoding --------------------------------------------------------------------------


def encode(records: Iterable[bytes]) -> bytes:
    """Batch encoding: u32 little-endian length + bytes, repeated."""
    out = bytearray()
    for rec in records:
        out += _LEN.pack(len(rec))
        out += rec
    return bytes(out)


def parse(buf) -> List[bytes]:
    """Split a batch-encoded buffer into its records; the buffer must end on a record end."""
    buf = bytes(buf)
    out = []
    pos = 0
    end = len(buf)
    while pos < end:
        assert pos + 4 <= end, f"truncated length prefix at {pos} of {end}"
        (n,) = _LEN.unpack_from(buf, pos)
        pos += 4
        assert pos + n <= end, f"record of {n} bytes at {pos - 4} runs past the slice end {end}"
        out.append(buf[pos : pos + n])
        pos += n
    return out


def pattern(tag: int, size: int) -> bytes:
    """A deterministic payload of ``size`` bytes that differs between tags."""
    unit = (tag & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little")
    return (unit * (size // 8 + 1))[:size]


def producer_size(pid: int, counter: int) -> int:
    """Size (1..300) of a multi-process producer's record number ``counter``."""
    return 1 + (counter * 7919 + pid * 31) % 300


def producer_record(pid: int, counter: int) -> bytes:
    """The record a producer writes: pid and counter first (truncated for tiny records)."""
    size = producer_size(pid, counter)
    head = _PID_CTR.pack(pid, counter)
    return (head + pattern(pid * 1000003 + counter, size))[:size]


def record_pid_counter(rec: bytes) -> Optional[Tuple[int, int]]:
    if len(rec) < 8:
        return None
    return _PID_CTR.unpack_from(rec, 0)


# --- ring set-up --------------------------------------------------------------------------------


def open_ring(ring: Ring, first_seq: int) -> None:
    """What the worker does at start: the ring is open, ids start at ``first_seq``."""
    h = ring.header
    h[L.GEN] = 0
    h[L.SLOT0 + L.TAIL] = 0
    h[L.SLOT0 + L.NEXT_SEQ] = first_seq
    h[L.HEAD] = 0
    h[L.HEAD_SEQ] = first_seq
    if hasattr(L, "WGEN"):  # the worker's double-buffered consume position
        h[L.WGEN] = 0
        h[L.WSLOT0] = 0
        h[L.WSLOT0 + 1] = first_seq
    ring.epoch = TEST_EPOCH
    ring.set_state(L.ST_OPEN)


def worker_object_names(names: Names, ring: Ring) -> List[str]:
    """Semaphores a coordinator owns beside the ring (a per-worker wake-up, if the code has one)."""
    out = []
    wake = getattr(names, "worker_wake", None)
    if wake is not None:
        idx = ring.header[L.WORKER_IDX] if hasattr(L, "WORKER_IDX") else 0
        out.append(wake(idx))
    return out


def dispose(names: Names, ring: Ring) -> List[str]:
    """Close and unlink a test's ring with what its coordinator would remove beside it; return
    the IPC objects of ``names`` still left after that (removed too)."""
    import posix_ipc

    coordinator_owned = worker_object_names(names, ring)
    ring.close()
    ring.unlink()
    for name in coordinator_owned:
        try:
            posix_ipc.unlink_semaphore(name)
        except posix_ipc.ExistentialError:
            pass
    found = names.leftovers()
    if found:
        names.remove_all()
    return found


class Drainer:
    """The test's worker: takes slices, checks them, parses their records.

    A slice that runs past the end of the data area (a bug: see test_ring_layout
    test_run_never_crosses_the_end_after_an_exact_fill) is read around the end so the rest of a
    test can still check every record; ``crossings`` counts such slices."""

    def __init__(self, ring: Ring) -> None:
        self.ring = ring
        self.crossings: List[L.Slice] = []
        self.slices = 0
        self.skips = 0

    def take(self) -> Optional[List[Tuple[int, bytes]]]:
        """One slice (checked and consumed) as [(id, record)], or None if nothing is pending."""
        ring = self.ring
        s = ring.next_slice()
        if s is None:
            return None
        h = ring.header
        cap = ring.capacity
        assert s.first_seq == h[L.HEAD_SEQ], (s, h[L.HEAD_SEQ])
        assert s.offset == h[L.HEAD] & (cap - 1), (s, h[L.HEAD])
        assert s.new_head > h[L.HEAD], f"slice makes no progress: {s}"
        assert s.length <= cap and s.new_head - h[L.HEAD] <= cap, s
        if s.new_head - h[L.HEAD] > s.length:
            self.skips += 1
        if s.offset + s.length <= cap:
            buf = ring.data[s.offset : s.offset + s.length]
        else:
            self.crossings.append(s)
            buf = bytes(ring.data[s.offset : cap]) + bytes(ring.data[: s.offset + s.length - cap])
        recs = parse(buf)
        assert len(recs) == s.count, f"slice {s} holds {len(recs)} records"
        ring.consume(s)
        self.slices += 1
        return [(s.first_seq + i, r) for i, r in enumerate(recs)]

    def drain(self, limit: int = 1 << 30) -> List[Tuple[int, bytes]]:
        out: List[Tuple[int, bytes]] = []
        for _ in range(limit):
            got = self.take()
            if got is None:
                break
            out.extend(got)
        return out

    def assert_no_crossing(self) -> None:
        assert not self.crossings, (
            f"{len(self.crossings)} slice(s) ran past the end of the data area "
            f"(a block that filled the area exactly to its end, then a block at offset 0, "
            f"without a wrap between them), e.g. {self.crossings[0]}"
        )


# --- child processes --------------------------------------------------------------------------


def spawn(func: str, *args) -> subprocess.Popen:
    """Start ``python -c`` running ``ringutil.<func>(*args)``; stdout is a pipe."""
    script = (
        "import sys; sys.path.insert(0, {here!r}); import ringutil; ringutil.{func}(*{args!r})"
    ).format(here=HERE, func=func, args=tuple(args))
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)


def read_line(proc: subprocess.Popen, timeout: float = 30.0) -> str:
    """One line from a child's stdout, or fail (not hang) if none comes."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise AssertionError(f"child {proc.pid} said nothing within {timeout}s")
    line = proc.stdout.readline().decode().strip()
    if not line:
        raise AssertionError(f"child {proc.pid} exited early (rc {proc.poll()})")
    return line


def _say(msg: str) -> None:
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def child_producer(root: str, shard: int, n: int, out_path: str) -> None:
    """Append ``n`` records (append_one and small publish batches); write the ids returned."""
    ring = attach(root, shard)
    pid = os.getpid()
    ids = array.array("q", [-1]) * n
    counter = 0
    step = 0
    while counter < n:
        step += 1
        k = 1 if step % 4 else min(n - counter, 1 + step % 9)
        if k == 1:
            ids[counter] = ring.append_one(producer_record(pid, counter))
        else:
            recs = [producer_record(pid, c) for c in range(counter, counter + k)]
            first = ring.publish(encode(recs), k)
            for i in range(k):
                ids[counter + i] = first + i
        counter += k
    with open(out_path + ".tmp", "wb") as fh:
        fh.write(struct.pack("<I", pid))
        ids.tofile(fh)
    os.rename(out_path + ".tmp", out_path)
    ring.close()


def child_hold_lock(root: str, shard: int, junk: bool, comm: str = "") -> None:
    """Take the ring lock and never give it back; with ``junk``, start a publish and stop midway:
    bytes at the tail and a filled-in inactive slot, but no GEN store. ``comm``: a process name
    to take first."""
    if comm:
        with open("/proc/self/comm", "w") as fh:
            fh.write(comm)
    ring = attach(root, shard)
    ring.acquire()
    if junk:
        h = ring.header
        gen = h[L.GEN]
        cur = L.slot_base(gen)
        nxt = L.slot_base(gen + 1)
        tail, seq = h[cur + L.TAIL], h[cur + L.NEXT_SEQ]
        off = tail & (ring.capacity - 1)
        n = min(64, ring.capacity - off)
        ring.data[off : off + n] = (b"\x10\x00\x00\x00" + b"\xee" * 64)[:n]
        h[nxt + L.TAIL] = tail + n
        h[nxt + L.NEXT_SEQ] = seq + 3
        h[nxt + L.WRAP_POS] = tail
        h[nxt + L.WRAP_SEQ] = seq + 1
    _say(f"locked {os.getpid()}")
    time.sleep(3600)


def child_append_fixed(root: str, shard: int, count: int, size: int) -> None:
    """Append ``count`` records of ``size`` bytes through the hot path, as fast as possible."""
    ring = attach(root, shard)
    append = ring.make_appender()
    rec = b"r" * size
    _say("go")
    for _ in range(count):
        append(rec)
    ring.close()


def child_set_view(root: str, shard: int, count: int) -> None:
    """Hammer set_view with (x, x, x) triples."""
    ring = attach(root, shard)
    _say("go")
    for x in range(1, count + 1):
        ring.set_view(x, x, x)
    ring.close()


def child_wait_for_space(root: str, shard: int) -> None:
    """Append to a full ring (blocks waiting for space)."""
    ring = attach(root, shard)
    _say("waiting")
    ring.append_one(b"late", timeout=3600)


def child_wait_durable(root: str, shard: int) -> None:
    """A STRICT append, then a wait for durability that never ends (the test kills us)."""
    ring = attach(root, shard)
    seq = ring.append_one(b"strict", strict=True)
    _say(f"waiting {seq}")
    ring.wait_durable(seq + 1, timeout=3600)


def child_acquire_raw(root: str, shard: int) -> None:
    """Emulate a producer killed right after its sem_wait returned, before it stored HOLDER."""
    ring = attach(root, shard)
    ring.lock.acquire()
    _say("locked")
    time.sleep(3600)


def child_acquire_raw_then_stop(root: str, shard: int) -> None:
    """Emulate a producer paused (SIGSTOP, Ctrl-Z, a debugger) right after its sem_wait
    returned, before it stored HOLDER; once continued, it releases as a producer does."""
    ring = attach(root, shard)
    ring.lock.acquire()
    _say("locked")
    os.kill(os.getpid(), signal.SIGSTOP)
    ring.lock.release()
    _say("released")
    time.sleep(3600)


def kill_and_reap(proc: subprocess.Popen, reap: bool = True) -> None:
    if proc.poll() is None:
        proc.kill()
    if reap:
        proc.wait(30)


def ids_of(path: str) -> Tuple[int, Sequence[int]]:
    with open(path, "rb") as fh:
        (pid,) = struct.unpack("<I", fh.read(4))
        ids = array.array("q")
        ids.frombytes(fh.read())
    return pid, ids
