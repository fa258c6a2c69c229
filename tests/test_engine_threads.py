"""Many threads on one Wal: nothing lost, duplicated or reordered; fsyncs shared; readers safe.

Every entry names its writer thread, that thread's counter and its stream, and ends with a
digest of the rest, so any torn, mixed or misplaced entry is recognisable on sight.
"""

from __future__ import annotations

import hashlib
import random
import struct
import threading
from collections import defaultdict
from typing import Callable, Dict, List, Tuple

import pytest

from ironwal_mp import CompressionType, ReadStrategy, SyncMode, Wal, WalError, WalOptions
from ironwal_mp.engine import stream as stream_module

ENTRY = struct.Struct("<HI")  # thread, counter


def make_entry(tid: int, counter: int, stream: str, rng: random.Random) -> bytes:
    filler = bytes([65 + tid % 26]) * rng.choice((0, 3, 40, 300))  # the 300s compress
    body = ENTRY.pack(tid, counter) + stream.encode() + b"|" + filler
    return body + hashlib.blake2b(body, digest_size=8).digest()


def parse_entry(data: bytes) -> Tuple[int, int, str]:
    body, digest = data[:-8], data[-8:]
    assert hashlib.blake2b(body, digest_size=8).digest() == digest, f"damaged entry {data!r}"
    tid, counter = ENTRY.unpack_from(body)
    stream = body[ENTRY.size :].split(b"|", 1)[0].decode()
    return tid, counter, stream


def run_threads(n: int, target: Callable[[int], None]) -> None:
    """Run target(0..n-1) on n threads started together; re-raise the first failure."""
    errors: List[BaseException] = []
    barrier = threading.Barrier(n)

    def body(tid: int) -> None:
        try:
            barrier.wait()
            target(tid)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def check_stream(wal: Wal, stream: str, written: Dict[int, bytes]) -> List[bytes]:
    """``stream`` holds exactly ``written`` (id -> entry), contiguous from 0, in each writer's
    order; returns the entries."""
    n = len(written)
    assert sorted(written) == list(range(n)), "returned ids must be unique and contiguous"
    assert wal.next_id(stream) == n
    entries = list(wal.iter(stream, 0))
    assert len(entries) == n
    for seq, data in written.items():
        assert entries[seq] == data, f"{stream} id {seq} holds another entry"
    last: Dict[int, int] = {}
    for data in entries:
        tid, counter, name = parse_entry(data)
        assert name == stream
        assert counter == last.get(tid, -1) + 1, f"thread {tid}: counter {counter} out of order"
        last[tid] = counter
    for seq in random.Random(n).sample(range(n), min(n, 200)):
        assert wal.get(stream, seq) == written[seq]
    assert wal.get(stream, n) is None
    return entries


# --- many writers, many streams --------------------------------------------------------------------


@pytest.mark.parametrize("sync_mode", [SyncMode.STRICT, SyncMode.BATCH_ONLY, SyncMode.ASYNC])
@pytest.mark.parametrize("compression", [CompressionType.NONE, CompressionType.LZ4])
def test_eight_threads_four_streams(tmp_path, sync_mode, compression):
    threads, streams, ops = 8, [f"s{i}" for i in range(4)], 120
    opts = WalOptions(
        root_path=str(tmp_path),
        max_segment_size=4096,
        sync_mode=sync_mode,
        compression=compression,
        min_compression_size=64,
    )
    written: Dict[str, Dict[int, bytes]] = {s: {} for s in streams}
    lock = threading.Lock()
    with Wal(opts) as wal:

        def writer(tid: int) -> None:
            rng = random.Random(1000 + tid)
            counters = defaultdict(int)
            mine: List[Tuple[str, int, bytes]] = []

            def next_entry(s: str) -> bytes:
                counters[s] += 1
                return make_entry(tid, counters[s] - 1, s, rng)

            for _ in range(ops):
                s = rng.choice(streams)
                kind = rng.random()
                if kind < 0.5:
                    data = next_entry(s)
                    mine.append((s, wal.append(s, data), data))
                elif kind < 0.8:
                    items = [next_entry(s) for _ in range(rng.randrange(1, 6))]
                    ids = wal.append_batch(s, items)
                    assert len(ids) == len(items) and ids.step == 1
                    mine.extend((s, seq, data) for seq, data in zip(ids, items))
                else:
                    items = [next_entry(s) for _ in range(rng.randrange(1, 5))]
                    with wal.writer(s) as txn:
                        for data in items:
                            txn.add(data)
                        ids = txn.commit()
                    mine.extend((s, seq, data) for seq, data in zip(ids, items))
            with lock:
                for s, seq, data in mine:
                    assert seq not in written[s], f"id {seq} of {s} handed out twice"
                    written[s][seq] = data

        run_threads(threads, writer)
        assert sum(len(w) for w in written.values()) > threads * ops
        for s in streams:
            check_stream(wal, s, written[s])
            assert wal.current_segment_start_id(s) > 0  # several segments, rotated under load
    with Wal(opts) as wal:
        assert wal.recover_all() == []
        for s in streams:
            check_stream(wal, s, written[s])


# --- group commit ----------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["append", "append_batch"])
def test_concurrent_strict_appenders_share_fsyncs(tmp_path, monkeypatch, how):
    """With a slow disk, appenders that arrive during an fsync are covered by the next one."""
    real = stream_module._fdatasync
    calls = []

    def slow_fdatasync(fd: int) -> None:
        calls.append(fd)
        threading.Event().wait(0.002)  # a slow disk; correctness must not depend on it
        real(fd)

    monkeypatch.setattr(stream_module, "_fdatasync", slow_fdatasync)
    threads, per_thread = 8, 60
    opts = WalOptions(root_path=str(tmp_path), sync_mode=SyncMode.STRICT)
    written: Dict[int, bytes] = {}
    lock = threading.Lock()
    with Wal(opts) as wal:

        def writer(tid: int) -> None:
            rng = random.Random(tid)
            for counter in range(per_thread):
                data = make_entry(tid, counter, "one", rng)
                if how == "append":
                    seq = wal.append("one", data)
                else:
                    (seq,) = wal.append_batch("one", [data])
                # STRICT: the call returns only once its entry is durable
                assert wal.durable_id("one") > seq
                with lock:
                    written[seq] = data

        run_threads(threads, writer)
        stats = wal.stream_stats("one")
        appends = threads * per_thread
        assert stats["frames"] == appends
        assert stats["next_id"] == appends
        assert stats["durable_id"] == appends
        assert 0 < stats["fsyncs"] < appends, stats
        assert len(calls) == stats["fsyncs"]
        check_stream(wal, "one", written)
    with Wal(opts) as wal:
        check_stream(wal, "one", written)


# --- readers during writes -------------------------------------------------------------------------


def _digest(entries: List[bytes]) -> bytes:
    h = hashlib.sha256()
    for data in entries:
        h.update(struct.pack("<I", len(data)) + data)
    return h.digest()


@pytest.mark.parametrize(
    "strategy,cache",
    [(ReadStrategy.STANDARD_IO, None), (ReadStrategy.MMAP, None), (ReadStrategy.STANDARD_IO, 64 * 1024)],
)
def test_readers_see_only_complete_entries_while_writers_run(tmp_path, strategy, cache):
    streams = ["r0", "r1"]
    writers, readers, ops = 4, 3, 150
    opts = WalOptions(
        root_path=str(tmp_path),
        max_segment_size=1024,  # rotations all the time
        sync_mode=SyncMode.ASYNC,
        compression=CompressionType.LZ4,
        min_compression_size=64,
        read_strategy=strategy,
        block_cache_size=cache,
        read_buffer_size=256,  # reads come in several chunks
    )
    written: Dict[str, Dict[int, bytes]] = {s: {} for s in streams}
    seen_prefixes: List[Tuple[str, int, bytes]] = []
    seen_gets: List[Tuple[str, int, bytes]] = []
    done = threading.Event()
    lock = threading.Lock()
    with Wal(opts) as wal:

        def writer(tid: int) -> None:
            rng = random.Random(tid)
            counters = defaultdict(int)
            for _ in range(ops):
                s = rng.choice(streams)
                items = []
                for _ in range(rng.choice((1, 1, 2, 4))):
                    items.append(make_entry(tid, counters[s], s, rng))
                    counters[s] += 1
                if len(items) == 1:
                    ids = [wal.append(s, items[0])]
                else:
                    ids = wal.append_batch(s, items)
                with lock:
                    written[s].update(zip(ids, items))

        def reader(rid: int) -> None:
            rng = random.Random(100 + rid)
            rounds = 0
            while not done.is_set() or rounds < 5:
                rounds += 1
                s = rng.choice(streams)
                known = wal.next_id(s)
                snapshot = list(wal.iter(s, 0))
                assert len(snapshot) >= known  # nothing acknowledged is missing
                last: Dict[int, int] = {}
                for data in snapshot:  # a prefix of the log: every writer's counters from 0
                    tid, counter, name = parse_entry(data)
                    assert name == s
                    assert counter == last.get(tid, -1) + 1
                    last[tid] = counter
                seen_prefixes.append((s, len(snapshot), _digest(snapshot)))
                if snapshot:
                    seq = rng.randrange(len(snapshot))
                    got = wal.get(s, seq)
                    assert got == snapshot[seq]
                    seen_gets.append((s, seq, got))
                    tail = list(wal.iter(s, seq))
                    assert tail[: len(snapshot) - seq] == snapshot[seq:]

        def role(i: int) -> None:
            if i < writers:
                writer(i)
            else:
                reader(i - writers)

        def run_writers_then_stop(i: int) -> None:
            try:
                role(i)
            finally:
                if i < writers:
                    with lock:
                        finished.append(i)
                        if len(finished) == writers:
                            done.set()

        finished: List[int] = []
        run_threads(writers + readers, run_writers_then_stop)
        final = {s: check_stream(wal, s, written[s]) for s in streams}
    assert seen_prefixes, "the readers never ran"
    for s, n, digest in seen_prefixes:
        assert _digest(final[s][:n]) == digest, "a reader saw something that is not a prefix"
    for s, seq, got in seen_gets:
        assert final[s][seq] == got


def test_readers_racing_truncation_see_a_contiguous_run(tmp_path):
    """While old segments are deleted, an iteration may start later than asked (the first kept
    id) but must never skip ids in the middle."""
    opts = WalOptions(
        root_path=str(tmp_path),
        max_segment_size=512,
        sync_mode=SyncMode.ASYNC,
        compression=CompressionType.NONE,
        read_buffer_size=64,  # a segment is read in many small pieces
    )
    log: List[bytes] = []
    rng = random.Random(5)
    with Wal(opts) as wal:
        for counter in range(3000):
            log.append(make_entry(0, counter, "t", rng))
            wal.append("t", log[-1])
        position = {data: i for i, data in enumerate(log)}
        done = threading.Event()

        def truncater() -> None:
            try:
                for safe in range(0, len(log), 40):
                    wal.truncate("t", safe)
            finally:
                done.set()

        def reader(rid: int) -> None:
            local = random.Random(rid)
            while not done.is_set():
                start = local.randrange(len(log))
                got: List[bytes] = []
                try:
                    for data in wal.iter("t", start):
                        got.append(data)
                    complete = True
                except WalError:  # refusing to go on is acceptable; a silent gap is not
                    complete = False
                if not got:
                    continue
                first = position[got[0]]
                assert first >= start
                assert got == log[first : first + len(got)], "an iteration skipped ids"
                if complete:
                    assert first + len(got) == len(log)

        def role(i: int) -> None:
            if i == 0:
                truncater()
            else:
                reader(i)

        run_threads(4, role)


def test_iteration_interrupted_by_truncation_does_not_skip_ids(tmp_path):
    """The deterministic core of the race above: an iterator suspended inside a segment that
    is then truncated away must not resume at a later segment as if nothing was missing."""
    opts = WalOptions(
        root_path=str(tmp_path),
        max_segment_size=512,
        sync_mode=SyncMode.ASYNC,
        compression=CompressionType.NONE,
        read_buffer_size=64,
    )
    with Wal(opts) as wal:
        log = [b"%03d" % i for i in range(40)]
        for data in log:
            wal.append("t", data)
        it = wal.iter("t", 0)
        got = [next(it), next(it)]
        assert got == log[:2]
        assert wal.truncate("t", 30) >= 1  # deletes the segment the iterator is reading
        try:
            got.extend(it)
            complete = True
        except WalError:
            complete = False
        assert got == log[: len(got)], f"iteration jumped: {[g.decode() for g in got]}"
        if complete:
            assert len(got) == len(log)
