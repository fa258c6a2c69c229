"""A power loss at every file call of a sharded WAL: the client, the coordinator and the workers
recorded as one machine.

The coordinator and worker processes join the test's :class:`crashfs.SharedRecorder` through
``crashfs_site/sitecustomize.py`` (put on their ``PYTHONPATH``), so a crash point is a moment of
the whole machine: what every process has written, and what any process's sync has made
durable. A seeded single-producer workload of appends, batches, checkpoints, prunes, compactions
and syncs runs against a ``ShardedWal``. Each crash point's trees (the durable files alone, the
page cache whole, random mixtures) are opened the way a start opens them (each shard's stream
recovered by the engine, the checkpoint log by a repairing open) and held to what the client
had been told:

* every id a shard had reported durable (its ``durable_id`` in ``stats()``, a STRICT append, an
  acknowledged checkpoint's offsets, ``sync()``), from the prune floor on, with its bytes, and
  nothing else but a contiguous run of later appends;
* the checkpoint log holds the acknowledged records with the offsets the single producer knows,
  perhaps the one being taken, and nothing else; a compaction leaves the old set or the new;
* every record in the log, acknowledged or not, names only entries its shards hold (the
  barrier's order: the shards are durable before the record is written);
* the MANIFEST names the shard count once any shard or checkpoint exists.

A few states are then opened by a real ``ShardedWal`` (a coordinator and workers that recover
them) and read through the API.
"""

from __future__ import annotations

import os
import random
import signal
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

import pytest

import crashfs
from ironwal_mp import CompressionType, ShardedWal, SyncMode, Wal, WalOptions
from ironwal_mp.engine.checkpoint_log import CheckpointLog
from ironwal_mp.sharded.manifest import recorded_shard_count, shard_stream
from conftest import settle_root
from test_crash_states import _payload, _trees, check_entries

SHARDS = 3
WORKERS = 2  # one of them owns two shards
SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "crashfs_site")

#: a checkpoint log as (id, offsets) pairs in log order
Log = Tuple[Tuple[bytes, Tuple[int, ...]], ...]


@pytest.fixture
def roots():
    """The sharded roots a test opens (append to it); afterwards nothing of them may be left."""
    opened: List[str] = []
    yield opened
    left = [(root, settle_root(root)) for root in opened]
    assert not [x for x in left if x[1] != ([], [])], f"processes or IPC objects left behind: {left}"


@pytest.fixture(autouse=True)
def no_disk_flush(monkeypatch):
    """The test process's flushes (the children skip theirs in ``join_shared_recording``)."""
    crashfs.skip_flushes(monkeypatch.setattr)


@dataclass(frozen=True)
class Account:
    """What a crash at this point must keep."""

    written: Tuple[Tuple[bytes, ...], ...]  # per shard: every value handed over, by id
    durable: Tuple[int, ...]  # per shard: ids below this were reported durable
    floor: Tuple[int, ...]  # per shard: ids below this may be pruned away
    logs: Tuple[Log, ...]  # the checkpoint logs a crash may leave


def _opts(root: str, mode: SyncMode) -> WalOptions:
    return WalOptions(root_path=root, sync_mode=mode, max_entries_per_segment=4, max_segment_size=700,
                      compression=CompressionType.LZ4, min_compression_size=200)


def run_workload(root: str, mode: SyncMode, seed: int, rec: crashfs.SharedRecorder, calls: int,
                 **service) -> Account:
    """Drive a ShardedWal from one thread, noting before each call what it may leave and after
    it what was acknowledged."""
    rng = random.Random(seed)
    written: List[List[bytes]] = [[] for _ in range(SHARDS)]
    durable, floor = [0] * SHARDS, [0] * SHARDS
    log: List[Tuple[bytes, Tuple[int, ...]]] = []

    def account(*logs: Log) -> Account:
        return Account(tuple(map(tuple, written)), tuple(durable), tuple(floor), logs or (tuple(log),))

    def hand_over(pairs) -> List[Tuple[int, int]]:
        """Add the values to the account before the call; the expected (shard, id) of each."""
        out = []
        for key, value in pairs:
            shard = wal.shard_for(key)
            written[shard].append(value)
            out.append((shard, len(written[shard]) - 1))
        rec.note(account())
        return out

    rec.note(account())
    with ShardedWal(_opts(root, mode), SHARDS, workers=WORKERS, **service) as wal:
        # (rolls that always come up: every run kills a worker and prunes)
        forced = {calls // 3: 0.92, 2 * calls // 3: 0.8}
        for n in range(calls):
            roll = forced.get(n, rng.random())
            key = b"key-%d" % rng.randrange(40)
            if roll < 0.35:
                value = _payload(rng)
                want = hand_over([(key, value)])
                assert wal.append(key, value) == want[0]
            elif roll < 0.5:
                items = [(b"key-%d" % rng.randrange(40), _payload(rng)) for _ in range(rng.randint(1, 6))]
                want = hand_over(items)
                assert wal.append_batch(items) == want
            elif roll < 0.6:
                values = [_payload(rng) for _ in range(rng.randint(1, 4))]
                want = hand_over([(key, v) for v in values])
                assert wal.append_batch_for_key(key, values) == want
            elif roll < 0.78:
                cid = b"ckpt-%d" % n
                offsets = tuple(len(w) for w in written)  # (one producer: exactly what it handed over)
                rec.note(account(tuple(log), tuple(log) + ((cid, offsets),)))
                assert wal.create_checkpoint(cid).offsets == offsets
                log.append((cid, offsets))
                durable[:] = [max(d, o) for d, o in zip(durable, offsets)]
            elif roll < 0.85 and log:
                cid, offsets = rng.choice(log)
                floor[:] = [max(f, o) for f, o in zip(floor, offsets)]
                rec.note(account())
                wal.prune_before_checkpoint(cid)
            elif roll < 0.9 and log:
                keep = rng.randint(1, 3)
                rec.note(account(tuple(log), tuple(log[-keep:])))  # (HEAD names the last: it is kept)
                wal.compact_checkpoints(keep)
                del log[:-keep]
            elif roll < 0.95:
                rec.note(account())
                _kill_a_worker(wal, rng, rec)  # the coordinator starts another, which resumes from the ring
            else:
                rec.note(account())
                wal.sync()
                durable[:] = [len(w) for w in written]
            for shard in wal.stats()["shards"]:
                s = shard["shard"]
                durable[s] = max(durable[s], shard["durable_id"])
            if mode is SyncMode.STRICT:
                assert durable == [len(w) for w in written], "a STRICT append returned before it was durable"
            rec.note(account())
        rec.note(account())
    durable[:] = [len(w) for w in written]  # a clean close drains and syncs every ring
    final = account()
    rec.note(final)
    rec.crash_here("closed")
    return final


def _kill_a_worker(wal: ShardedWal, rng: random.Random, rec: crashfs.SharedRecorder) -> None:
    """SIGKILL a worker outside any recorded call, and wait for its replacement (a request sent
    while the killed one's threads are still exiting fails with WorkerFailedError)."""
    pid = rng.choice(wal.stats()["worker_pids"])
    with rec.held():
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while pid in wal.stats()["worker_pids"]:
        assert time.monotonic() < deadline, f"worker {pid} was not replaced"
        time.sleep(0.005)
    rec.crash_here("kill")


def _read_streams(root: str, acct: Account, ctx: str) -> List[int]:
    """Check each shard's entries against the account; each shard's next id."""
    next_ids = []
    with Wal(_opts(root, SyncMode.ASYNC), lock=False) as wal:  # (as a worker opens them)
        for s in range(SHARDS):
            name = shard_stream(s)
            got = []
            if os.path.isdir(os.path.join(root, name)):
                first = wal.first_id(name)
                got = list(wal.iter(name, first, with_ids=True)) if first is not None else []
                nxt = wal.next_id(name)
            else:
                nxt = 0
            check_entries(got, acct.written[s], acct.floor[s], acct.durable[s], nxt, f"{ctx}, shard {s}")
            next_ids.append(nxt)
    return next_ids


def _check_log(got: Log, latest: bytes, next_ids: List[int], root: str, acct: Account, ctx: str) -> None:
    assert got in acct.logs, f"{ctx}: log {[c for c, _ in got]}, allowed {[[c for c, _ in o] for o in acct.logs]}"
    for cid, offsets in got:
        behind = [s for s in range(SHARDS) if next_ids[s] < offsets[s]]
        assert not behind, f"{ctx}: checkpoint {cid!r} names {offsets}, shards {behind} end at {next_ids}"
    assert not got or latest in [c for c, _ in got], f"{ctx}: latest {latest!r}"
    if got or any(next_ids):
        assert recorded_shard_count(root) == SHARDS, f"{ctx}: MANIFEST lost"


def check_tree(root: str, acct: Account, where: str) -> None:
    """Open a crashed tree as a start does (each shard, then the checkpoint log), twice."""
    for attempt in ("first open", "second open"):
        ctx = f"{where}, {attempt}"
        next_ids = _read_streams(root, acct, ctx)
        log = CheckpointLog(root)
        records = log.records()
        got = tuple((r.user_id, tuple(r.offsets)) for r in records)
        _check_log(got, log.latest().user_id if records else b"", next_ids, root, acct, ctx)


def check_by_restart(root: str, acct: Account, where: str, rec: Optional[crashfs.SharedRecorder] = None) -> None:
    """Open a crashed tree with a real ShardedWal (its workers recover it), read it back and
    append once to each shard; with ``rec``, note what the restart claims as it goes."""
    note = rec.note if rec is not None else (lambda account: None)
    with ShardedWal(_opts(root, SyncMode.STRICT), SHARDS, workers=WORKERS) as wal:
        next_ids = []
        for s in range(SHARDS):
            first = wal.first_id(s)
            got = list(wal.iter_shard(s, first, with_ids=True)) if first is not None else []
            assert [d for _, d in got] == list(acct.written[s][got[0][0]:got[-1][0] + 1] if got else []), (
                f"{where}: shard {s} reads other entries")
            end = got[-1][0] + 1 if got else wal.stats()["shards"][s]["next_id"]
            assert end >= acct.durable[s] and (not got or got[0][0] <= acct.floor[s]), f"{where}: shard {s}"
            next_ids.append(end)
        listed = tuple((cid, tuple(wal.load_checkpoint(cid).offsets)) for cid, _ in wal.list_checkpoints())
        latest = wal.load_latest_checkpoint()[0] if listed else b""
        _check_log(listed, latest, next_ids, root, acct, where)
        # what the restart reports durable joins the account, and so does an append per shard
        written = [list(w) for w in acct.written]
        durable = [max(d, shard["durable_id"]) for d, shard in zip(acct.durable, wal.stats()["shards"])]

        def account() -> Account:
            return Account(tuple(map(tuple, written)), tuple(durable), acct.floor, (listed,))

        note(account())
        for s in range(SHARDS):
            key = next(b"probe-%d" % i for i in range(1000) if wal.shard_for(b"probe-%d" % i) == s)
            written[s][next_ids[s]:] = [b"after the crash"]
            note(account())
            assert wal.append(key, b"after the crash") == (s, next_ids[s])
            durable[s] = next_ids[s] + 1
            note(account())


#: ASYNC without the idle flush: only the barrier, sync() and close make data durable
NO_FLUSH = {"idle_flush": False, "flush_interval": 3600.0}


@pytest.mark.parametrize("mode, seed, service", [(SyncMode.ASYNC, 1, NO_FLUSH), (SyncMode.ASYNC, 3, {}),
                                                 (SyncMode.STRICT, 2, {})], ids=["ASYNC-no-idle-flush", "ASYNC", "STRICT"])
def test_every_crash_point_of_a_sharded_workload_keeps_what_was_acknowledged(tmp_path, scratch_base, monkeypatch,
                                                                            roots, mode, seed, service):
    top = str(tmp_path / "top")
    os.mkdir(top)
    root = os.path.join(top, "data", "sharded")
    roots.append(root)
    rec = crashfs.SharedRecorder(str(tmp_path / "recording"), top)
    rec.note(Account(((),) * SHARDS, (0,) * SHARDS, (0,) * SHARDS, ((),)))
    monkeypatch.setenv(crashfs.SHARED_ENV, rec.shared)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (SITE, os.environ.get("PYTHONPATH")) if p))
    with rec.recording():
        final = run_workload(root, mode, seed, rec, calls=30, **service)
    monkeypatch.delenv(crashfs.SHARED_ENV)
    points = rec.load_points()
    assert any(final.floor) and any(p.call == "kill" for p in points), "the workload pruned nothing or killed no worker"
    for made_by, path in (("a worker", "/shard_"), ("the coordinator", "/checkpoints.log")):
        assert any(path in p.call for p in points), f"no call of {made_by} was recorded"
    rng = random.Random(seed)
    restarts = []
    n = 0
    for point, label, tree, data, dest in _trees(points, rng, scratch_base, 2):
        check_tree(os.path.join(dest, "data", "sharded"), point.note,
                   f"crash after call {point.index} ({point.call}), {label}")
        n += 1
        if point.volatile_data != point.durable_data:  # (kills and mixtures that lost something)
            restarts.append((point, label, tree, data))
    assert n >= 3 * len(points)
    # a few of them restarted by real processes, recorded in turn: a power loss at each call of
    # the restart (recovery, the first appends) must keep what it and the first run claimed
    recovered = 0
    kills = [r for r in restarts if r[1] == "process crash"]
    chosen = rng.sample(kills, min(2, len(kills)))
    others = [r for r in restarts if r[1] != "process crash"]
    chosen += rng.sample(others, min(2, len(others)))
    for i, (point, label, tree, data) in enumerate(chosen):
        top2 = crashfs.scratch(str(tmp_path), f"restart-{i}")
        crashfs.materialize(tree, data, top2)
        where = f"restart after call {point.index} ({point.call}), {label}"
        rec2 = crashfs.SharedRecorder(str(tmp_path / f"recording-{i}"), top2,
                                      after=point if label == "process crash" else None)
        rec2.note(point.note)
        monkeypatch.setenv(crashfs.SHARED_ENV, rec2.shared)
        roots.append(os.path.join(top2, "data", "sharded"))
        with rec2.recording():
            check_by_restart(roots[-1], point.note, where, rec2)
        monkeypatch.delenv(crashfs.SHARED_ENV)
        for p, label2, _, _, dest in _trees(rec2.load_points(), rng, scratch_base, 1, kills=False):
            check_tree(os.path.join(dest, "data", "sharded"), p.note,
                       f"{where}; then a power loss after its call {p.index} ({p.call}), {label2}")
            recovered += 1
    assert recovered > 0
