"""Power loss at every point of a workload, under POSIX's persistence rules (see crashfs.py).

A seeded workload of appends, batches, transactions, syncs, truncations and reopens runs under a
:class:`crashfs.Recorder`. At every file-changing call the recorder keeps a crash point; each
point is turned into several trees a crash could have left (the durable files alone, the
page cache whole, random mixtures), and each tree is opened and read. What it must hold:

* every id the ``Wal`` had reported durable (``durable_id``) before the crash, from the
  truncation floor on, with the bytes that were appended;
* nothing else but a contiguous run of later appends, each with its own bytes (never a torn or
  foreign entry, never a gap);
* the same after a second open (recovery is idempotent), and the next append gets the next id.

Recovery itself is then crashed at each of its own calls, and the result reopened and held to
the same account. The checkpoint log (``checkpoints.log`` and ``HEAD``) gets the same treatment.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import pytest

import crashfs
from ironwal_mp import CompressionType, GroupSync, SyncMode, Wal, WalOptions
from ironwal_mp.engine import layout
from ironwal_mp.engine.checkpoint_log import CheckpointData, CheckpointLog
from ironwal_mp.sharded.manifest import open_manifest, recorded_shard_count

STREAMS = ("a", "b")
#: the Wal's root below the recorded directory: the Wal creates both levels, and their names
#: must be durable too
WAL_DIR = os.path.join("data", "wal")


@pytest.fixture(autouse=True)
def no_disk_flush(monkeypatch):
    """What is durable is the recorder's model, not the disk's: skip the real flushes, which
    would cost most of this file's time (a syncfs flushes the whole filesystem)."""
    crashfs.skip_flushes(monkeypatch.setattr)


@dataclass(frozen=True)
class Account:
    """What a crash at this point must keep, per stream."""

    written: Dict[str, Tuple[bytes, ...]]  # every entry handed to the Wal so far, by id
    durable: Dict[str, int]  # ids below this were reported durable
    floor: Dict[str, int] = field(default_factory=dict)  # ids below this may be truncated away


def _opts(root: str, mode: SyncMode, group_sync: GroupSync = GroupSync.SYNCFS) -> WalOptions:
    return WalOptions(root_path=root, sync_mode=mode, max_entries_per_segment=4, max_segment_size=700,
                      compression=CompressionType.LZ4, min_compression_size=200, group_sync=group_sync)


def _payload(rng: random.Random) -> bytes:
    if rng.random() < 0.2:  # compressible and over the threshold: an LZ4 frame
        return bytes([rng.randrange(256)]) * rng.randint(200, 400)
    return rng.randbytes(rng.randint(1, 120))


def run_workload(root: str, mode: SyncMode, seed: int, rec: crashfs.Recorder, calls: int,
                 group_sync: GroupSync = GroupSync.SYNCFS) -> Account:
    """Drive a ``Wal`` under ``rec``, noting before and after each call what it acknowledged."""
    rng = random.Random(seed)
    written: Dict[str, List[bytes]] = {s: [] for s in STREAMS}
    floor = {s: 0 for s in STREAMS}
    wal = Wal(_opts(root, mode, group_sync))

    def account() -> Account:
        return Account({s: tuple(v) for s, v in written.items()},
                       {s: wal.durable_id(s) for s in STREAMS}, dict(floor))

    acked = account()

    def note_intent() -> None:  # the call about to run may land, wholly or partly
        rec.note(Account({s: tuple(v) for s, v in written.items()}, dict(acked.durable), dict(floor)))

    rec.note(acked)
    for _ in range(calls):
        stream = rng.choice(STREAMS)
        roll = rng.random()
        if roll < 0.45:
            data = _payload(rng)
            written[stream].append(data)
            note_intent()
            seq = wal.append(stream, data)
            assert seq == len(written[stream]) - 1
            if mode is SyncMode.STRICT:
                assert wal.durable_id(stream) > seq
        elif roll < 0.65:
            batch = [_payload(rng) for _ in range(rng.randint(1, 5))]
            written[stream].extend(batch)
            note_intent()
            ids = wal.append_batch(stream, batch)
            assert ids.stop == len(written[stream])
            if mode is not SyncMode.ASYNC:
                assert wal.durable_id(stream) >= ids.stop
        elif roll < 0.75:
            batch = [_payload(rng) for _ in range(rng.randint(1, 3))]
            written[stream].extend(batch)
            note_intent()
            with wal.writer(stream) as txn:
                for data in batch:
                    txn.add(data)
        elif roll < 0.85:
            note_intent()
            wal.sync()
        elif roll < 0.93:
            safe = rng.randint(len(written[stream]) // 2, len(written[stream]))
            floor[stream] = max(floor[stream], safe)
            note_intent()
            wal.truncate(stream, safe)
        else:
            note_intent()
            wal.close()
            wal = Wal(_opts(root, mode, group_sync))
        acked = account()
        rec.note(acked)
    final = account()
    wal.close()
    return final


def check_tree(root: str, mode: SyncMode, acct: Account, where: str) -> None:
    """Open the crashed tree ``root`` and hold what it reads to ``acct``."""
    for attempt in ("first open", "second open"):
        with Wal(_opts(root, mode)) as wal:
            for s in STREAMS:
                written, durable, floor = acct.written[s], acct.durable[s], acct.floor.get(s, 0)
                first = wal.first_id(s)
                got = list(wal.iter(s, first, with_ids=True)) if first is not None else []
                check_entries(got, written, floor, durable, wal.next_id(s), f"{where}, {attempt}, stream {s!r}")
            if attempt == "second open":
                for s in STREAMS:
                    nxt = wal.next_id(s)
                    assert wal.append(s, b"after the crash") == nxt
                    assert wal.get(s, nxt) == b"after the crash"


def check_entries(got: List[Tuple[int, bytes]], written: Tuple[bytes, ...], floor: int, durable: int,
                  next_id: int, ctx: str) -> None:
    """Hold one stream's entries, read after a crash, to the account: ids ``floor`` to
    ``durable - 1`` with their bytes, then nothing but a contiguous run of later appends, and the
    next id where the entries end."""
    ids = [i for i, _ in got]
    assert not ids or ids == list(range(ids[0], ids[0] + len(ids))), f"{ctx}: gap in {ids}"
    for seq, data in got:
        assert seq < len(written), f"{ctx}: id {seq} was never appended"
        assert data == written[seq], f"{ctx}: id {seq} holds other bytes"
    end = ids[-1] + 1 if ids else next_id
    if floor < durable:
        assert ids and ids[0] <= floor and end >= durable, (
            f"{ctx}: durable ids {floor}..{durable - 1} needed, read {ids[:1]}..{ids[-1:]}")
    assert next_id == end, f"{ctx}: next id {next_id} after reading up to {end}"


def _trees(points, rng: random.Random, base: str, mixtures: int, *, kills: bool = True):
    """Each crash state of ``points`` written to ``base``/state: (point, label, tree, data, dir).
    ``kills=False`` leaves out the process crashes."""
    for point in points:
        for label, tree, data in point.states(rng, mixtures):
            if kills or label != "process crash":
                dest = crashfs.scratch(base, "state")
                crashfs.materialize(tree, data, dest)
                yield point, label, tree, data, dest


def _explore(points, base: str, mode: SyncMode, seed: int, mixtures: int, recover_too: int) -> Tuple[int, int]:
    """Check every crash state of ``points``; then crash the recovery of ``recover_too`` of
    them (power losses and kills alike) at each of its calls."""
    rng = random.Random(seed * 7919)
    checked = recovered = 0
    starts = []
    for point, label, tree, data, dest in _trees(points, rng, base, mixtures):
        where = f"crash after call {point.index} ({point.call}), {label}"
        check_tree(os.path.join(dest, WAL_DIR), mode, point.note, where)
        checked += 1
        starts.append((point, label, tree, data, where))
    # half of them kills that left bytes in the page cache only, half anything else
    kills = [s for s in starts if s[1] == "process crash" and s[0].volatile_data != s[0].durable_data]
    others = [s for s in starts if s[1] != "process crash"]
    chosen = rng.sample(kills, min(recover_too // 2, len(kills)))
    chosen += rng.sample(others, min(recover_too - len(chosen), len(others)))
    for start in chosen:
        recovered += _crash_recovery(*start, base, mode, rng)
    return checked, recovered


def _crash_recovery(point, label, tree, data, where, base, mode, rng) -> int:
    """Open one crash state, with a power loss at each call the recovery makes and after it.

    After a power loss the whole state is durable; after a kill (``process crash``) only what
    was durable at the point is, so the recovery must make durable whatever it then reports
    durable: those ids join the account, and so does one append per stream made after it.
    """
    start = crashfs.scratch(base, "recovering")
    crashfs.materialize(tree, data, start)
    rec = crashfs.Recorder(start, after=point if label == "process crash" else None)
    rec.note(point.note)
    written = dict(point.note.written)
    with rec.recording():
        with Wal(_opts(os.path.join(start, WAL_DIR), mode)) as wal:
            claimed = {s: max(point.note.durable[s], wal.durable_id(s)) for s in STREAMS}
            rec.note(Account(dict(written), dict(claimed), point.note.floor))  # (copies: both change below)
            rec.crash_here("recovered")
            # the new writer goes on where the recovered tail ends: its appends replace what
            # the crash lost of the account's later entries
            for s in STREAMS:
                nxt = wal.next_id(s)
                written[s] = written[s][:nxt] + (b"appended after recovery %d" % nxt,)
                rec.note(Account(dict(written), dict(claimed), point.note.floor))
                wal.append_batch(s, [written[s][-1]])
                wal.sync(s)
                claimed[s] = wal.durable_id(s)
                assert claimed[s] == nxt + 1
                rec.note(Account(dict(written), dict(claimed), point.note.floor))
    n = 0
    for p, label2, _, _, dest in _trees(rec.points, rng, base, 1, kills=False):  # (kills: the first level's)
        check_tree(os.path.join(dest, WAL_DIR), mode, p.note,
                   f"{where}; then recovery hit by a power loss after its call {p.index} ({p.call}), {label2}")
        n += 1
    return n


@pytest.mark.parametrize("mode", [SyncMode.STRICT, SyncMode.BATCH_ONLY, SyncMode.ASYNC])
@pytest.mark.parametrize("seed, group_sync", [(1, GroupSync.SYNCFS), (2, GroupSync.FDATASYNC)])
def test_every_crash_point_of_a_workload_keeps_what_was_durable(tmp_path, scratch_base, mode, seed, group_sync):
    top = str(tmp_path / "top")
    os.mkdir(top)
    root = os.path.join(top, WAL_DIR)
    rec = crashfs.Recorder(top)
    rec.note(Account({s: () for s in STREAMS}, {s: 0 for s in STREAMS}))
    with rec.recording():
        final = run_workload(root, mode, seed, rec, calls=40, group_sync=group_sync)
    assert len(rec.points) > 40
    assert sum(final.durable.values()) > 0, "the workload made nothing durable"
    checked, recovered = _explore(rec.points, scratch_base, mode, seed, mixtures=2, recover_too=12)
    assert checked >= 3 * len(rec.points) and recovered > 0


# --- the checkpoint log --------------------------------------------------------------------------

#: one state a crash may leave: (the records in log order, the id latest() names or None)
Outcome = Tuple[Tuple[CheckpointData, ...], Optional[bytes]]


def _record(rng: random.Random, n: int) -> CheckpointData:
    return CheckpointData(b"ckpt-%d" % n, 1_700_000_000_000_000_000 + n, 2,
                          (rng.randrange(1 << 40), rng.randrange(1 << 40)))


def _kept(records: Tuple[CheckpointData, ...], latest: Optional[bytes], n: int) -> Tuple[CheckpointData, ...]:
    """What ``compact(n)`` keeps: the newest ``n``, and the latest wherever it is."""
    if len(records) <= n:
        return records
    kept = list(records[-n:])
    head = next((r for r in records if r.user_id == latest), None)
    if head is not None and head not in kept:
        kept.insert(0, head)
    return tuple(kept)


def run_checkpoint_workload(root: str, seed: int, rec: crashfs.Recorder, calls: int,
                            group_sync: GroupSync = GroupSync.SYNCFS) -> None:
    """Appends (with and without a prepared HEAD), compactions and reopens of a CheckpointLog,
    noting before each call every outcome a crash during it may leave."""
    rng = random.Random(seed)
    log = CheckpointLog(root, group_sync=group_sync)
    records: Tuple[CheckpointData, ...] = ()
    latest: Optional[bytes] = None
    rec.note([(records, latest)])
    for n in range(calls):
        roll = rng.random()
        if roll < 0.7:
            data = _record(rng, n)
            # record and HEAD are synced together: the record may land without HEAD naming it
            rec.note([(records, latest), (records + (data,), latest), (records + (data,), data.user_id)])
            if rng.random() < 0.5:
                log.append(data, log.prepare_head(data.user_id))
            else:
                log.append(data)
            records, latest = records + (data,), data.user_id
        elif roll < 0.9:
            keep = rng.randint(1, 3)
            kept = _kept(records, latest, keep)
            rec.note([(records, latest), (kept, latest)])
            log.compact(keep)
            records = kept
        else:
            rec.note([(records, latest)])
            log = CheckpointLog(root, group_sync=group_sync)
        rec.note([(records, latest)])
        assert tuple(log.records()) == records and log.head_id == latest


def _read_log(root: str) -> Outcome:
    log = CheckpointLog(root)
    records = tuple(log.records())
    latest = log.latest().user_id if records else None
    return records, latest


def check_checkpoint_tree(root: str, allowed: List[Outcome], where: str) -> Outcome:
    got = _read_log(root)
    names = lambda o: ([r.user_id for r in o[0]], o[1])  # noqa: E731
    assert got in allowed, f"{where}: read {names(got)}, allowed {[names(o) for o in allowed]}"
    assert _read_log(root) == got, f"{where}: a second open read otherwise"
    log = CheckpointLog(root)
    extra = CheckpointData(b"after the crash", 1, 2, (0, 0))
    log.append(extra)
    assert log.latest() == extra and CheckpointLog(root).latest() == extra, where
    return got


@pytest.mark.parametrize("group_sync", [GroupSync.SYNCFS, GroupSync.FDATASYNC])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_crash_point_of_the_checkpoint_log_keeps_what_was_acknowledged(tmp_path, scratch_base, seed,
                                                                             group_sync):
    root = str(tmp_path / "root")
    os.mkdir(root)
    rec = crashfs.Recorder(root)
    rec.note([((), None)])
    with rec.recording():
        run_checkpoint_workload(root, seed, rec, calls=25, group_sync=group_sync)
    rng = random.Random(seed)
    starts = []
    for point, label, tree, data, dest in _trees(rec.points, rng, scratch_base, 3):
        where = f"crash after call {point.index} ({point.call}), {label}"
        check_checkpoint_tree(dest, point.note, where)
        if label == "process crash" and point.volatile_data != point.durable_data or label.startswith("mix"):
            starts.append((point, label, tree, data, where))
    recovered = 0
    for point, label, tree, data, where in rng.sample(starts, min(16, len(starts))):
        start = crashfs.scratch(scratch_base, "recovering")
        crashfs.materialize(tree, data, start)
        rec2 = crashfs.Recorder(start, after=point if label == "process crash" else None)
        rec2.note(point.note)
        with rec2.recording():
            rec2.note([_read_log(start)])  # what the recovering open read must stay so
            rec2.crash_here("recovered")
        for p, label2, _, _, dest in _trees(rec2.points, rng, scratch_base, 1, kills=False):
            check_checkpoint_tree(dest, p.note, f"{where}; then a power loss after the recovering "
                                                 f"open's call {p.index} ({p.call}), {label2}")
            recovered += 1
    assert recovered > 0


# --- new directories -----------------------------------------------------------------------------


def test_directories_make_dirs_creates_survive_a_power_loss_once_it_returns(tmp_path):
    rec = crashfs.Recorder(str(tmp_path))
    with rec.recording():
        layout.make_dirs(str(tmp_path / "x" / "y" / "z"))
        layout.make_dirs(str(tmp_path / "x" / "y" / "z"))  # (nothing to create: nothing to do)
        rec.crash_here("returned")
    tree, _ = rec.points[-1].power_loss()
    assert {"x", "x/y", "x/y/z"} <= set(tree)
    # without the parents' fsyncs the same calls leave nothing durable: the check can fail
    rec2 = crashfs.Recorder(str(tmp_path))
    with rec2.recording():
        os.makedirs(str(tmp_path / "p" / "q"))
        rec2.crash_here("returned")
    assert not {"p", "p/q"} & set(rec2.points[-1].power_loss()[0])


def test_a_new_sharded_root_and_its_manifest_survive_a_power_loss(tmp_path):
    rec = crashfs.Recorder(str(tmp_path))
    with rec.recording():
        open_manifest(str(tmp_path / "data" / "sharded"), 4)
        rec.crash_here("returned")
    tree, data = rec.points[-1].power_loss()
    dest = crashfs.scratch(str(tmp_path), "state")
    crashfs.materialize(tree, data, dest)
    assert recorded_shard_count(os.path.join(dest, "data", "sharded")) == 4
