"""``inspect``, ``verify`` and ``repair``: what is on disk, is it sound, and mend it offline."""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Dict, List

from .. import Wal, WalOptions
from ..engine.audit import StreamAudit, audit_stream
from ..engine.checkpoint_log import CheckpointLog
from ..engine.rootlock import RootLock, lock_holder
from ..errors import WalError
from .locate import Target, locate
from .output import EXIT_FINDING, EXIT_OK, Progress, bytes_field, emit_json, shown_field, size, table


def _checkpoints(target: Target) -> Dict[str, Any]:
    if target.kind != "sharded":
        return {}
    log = CheckpointLog(target.root, repair=False)
    records = log.records()
    latest = None
    try:
        latest = log.latest().user_id
    except WalError:
        pass
    return {
        "count": len(records),
        **bytes_field("latest", latest),
        "bytes": log.bytes_size,
        "problems": list(log.report.actions),
        # (where each problem is in checkpoints.log, when that is known: the damage)
        "problem_offsets": [log.report.cut_offset if i == log.report.cut_action else None
                            for i in range(len(log.report.actions))],
        "list": [{**bytes_field("id", r.user_id), "timestamp": r.timestamp, "offsets": list(r.offsets)}
                 for r in records],
    }


def _stream_doc(a: StreamAudit) -> Dict[str, Any]:
    return {
        "name": a.name,
        "segments": len(a.segments),
        "first_id": a.first_id,
        "next_id": a.next_id,
        "entries": a.entries,
        "frames": a.frames,
        "lz4_frames": sum(s.lz4_frames for s in a.segments),
        "raw_bytes": a.raw_bytes,
        "disk_bytes": a.disk_bytes,
        "side_files": a.side_files,
        "problems": [{"path": p.path, "offset": p.offset, "reason": p.reason} for p in a.problems],
        "segment_list": [
            {"start_id": s.start_id, "end_id": s.end_id, "frames": s.frames, "bytes": s.size} for s in a.segments
        ],
    }


def _size(path: str) -> int:
    """A file's size for the progress total; 0 if it cannot be had (the audit reports why)."""
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _audit_all(target: Target, show_progress: bool) -> List[StreamAudit]:
    total = 0
    for name in target.streams:
        d = os.path.join(target.root, name)
        if os.path.isdir(d):
            total += sum(_size(os.path.join(d, n)) for n in os.listdir(d) if n.endswith(".wal"))
    progress = Progress("verify", total, unit="bytes") if show_progress and total > (8 << 20) else None
    audits = []
    for name in target.streams:
        d = os.path.join(target.root, name)
        if os.path.isdir(d):
            audits.append(_audit_settled(d, (lambda n: progress.update(n)) if progress else None))
        else:
            audits.append(StreamAudit(name, d))
    if progress:
        progress.done()
    return audits


#: audits of a stream whose files changed while it was read, before its problems are believed
AUDIT_TRIES = 4
#: the wait before a stream whose only problems are lagging hint files is audited again
HINT_SETTLE_S = 0.05


def _audit_settled(stream_dir: str, progress) -> StreamAudit:
    """An audit, done again while it found problems and the directory changed under it: beside
    a live writer, a segment deleted after the listing is no damage. Hint files that lag the
    segment files (a rotation or truncation under way, or one a crash cut short) are looked at
    again a little later. What persists is reported."""
    for attempt in range(AUDIT_TRIES):
        before = _dir_state(stream_dir)
        audit = audit_stream(stream_dir, progress=progress)
        progress = None  # (counted once)
        if not audit.problems or attempt == AUDIT_TRIES - 1:
            break
        if _dir_state(stream_dir) == before:
            if not all(p.rebuildable for p in audit.problems):
                break
            time.sleep(HINT_SETTLE_S)
    return audit


def _dir_state(stream_dir: str) -> set:
    """(name, size, mtime) of each file: what a writer's append, rotation or truncation moves."""
    try:
        with os.scandir(stream_dir) as entries:
            stats = [(e.name, e.stat()) for e in entries]
        return {(name, st.st_size, st.st_mtime_ns) for name, st in stats}
    except OSError:
        return set()


def inspect(args) -> int:
    target = locate(args.path)
    audits = _audit_all(target, False)
    doc = {"path": os.path.abspath(args.path), "kind": target.kind, "root": target.root,
           "streams": [_stream_doc(a) for a in audits], "checkpoints": _checkpoints(target)}
    if target.kind == "sharded":
        doc["shard_count"] = target.shard_count
    if args.json:
        emit_json(doc)
        return EXIT_OK
    what = {"sharded": f"sharded WAL, {target.shard_count} shards", "engine": f"engine WAL, {len(audits)} streams",
            "stream": "one stream"}[target.kind]
    print(f"{doc['path']}: {what}")
    rows = []
    for a in audits:
        ids = f"{a.first_id}..{a.next_id - 1}" if a.entries else "-"
        ratio = f"{a.raw_bytes / a.disk_bytes:.2f}x" if a.disk_bytes else "-"
        rows.append([a.name, len(a.segments), ids, f"{a.entries:,}", f"{a.frames:,}", size(a.raw_bytes),
                     size(a.disk_bytes), ratio, len(a.problems)])
    table(rows, header=["stream", "segments", "ids", "entries", "frames", "raw", "on disk", "ratio", "problems"])
    ck = doc["checkpoints"]
    if ck:
        print(f"\ncheckpoints: {ck['count']} ({size(ck['bytes'])}), latest {shown_field(ck, 'latest')}")
        for rec in ck["list"][-5:]:
            print(f"  {shown_field(rec, 'id')}  offsets {rec['offsets']}")
        for problem in ck["problems"]:
            print(f"  PROBLEM checkpoints.log: {problem}")
    return EXIT_OK


def _behind_checkpoints(target: Target, audits: List[StreamAudit]) -> List[Dict[str, Any]]:
    """Shards that end below what a checkpoint recorded them reaching: entries were lost
    (files removed, cut or replaced), though every frame left may be sound."""
    reach: Dict[int, tuple] = {}
    records = CheckpointLog(target.root, repair=False).records()
    for rec in records:
        for shard, offset in enumerate(rec.offsets):
            if offset > reach.get(shard, (0, b""))[0]:
                reach[shard] = (offset, rec.user_id)
    out = []
    for rec in records:
        if rec.shard_count != target.shard_count:
            out.append({"path": os.path.join(target.root, "checkpoints.log"), "offset": None,
                        "reason": f"checkpoint {rec.user_id.decode(errors='replace')!r} records "
                                  f"{rec.shard_count} shards, but the WAL has {target.shard_count}"})
    for shard, a in enumerate(audits):
        offset, cid = reach.get(shard, (0, b""))
        if a.next_id < offset:
            out.append({"path": a.path, "offset": None,
                        "reason": f"ends at id {a.next_id}, but checkpoint {cid.decode(errors='replace')!r} "
                                  f"recorded it reaching {offset}: entries were lost"})
    return out


def verify(args) -> int:
    target = locate(args.path)
    audits = _audit_all(target, not args.json)
    problems = [{"path": p.path, "offset": p.offset, "reason": p.reason} for a in audits for p in a.problems]
    ck = _checkpoints(target)
    for action, offset in zip(ck.get("problems", []), ck.get("problem_offsets", [])):
        problems.append({"path": os.path.join(target.root, "checkpoints.log"), "offset": offset, "reason": action})
    if target.kind == "sharded":
        problems.extend(_behind_checkpoints(target, audits))
    kept_aside = [os.path.join(a.path, f) for a in audits for f in a.side_files]
    entries = sum(a.entries for a in audits)
    frames = sum(a.frames for a in audits)
    args.verdict = EXIT_FINDING if problems else EXIT_OK  # (the exit status even if stdout closes early)
    if args.json:
        emit_json({"path": os.path.abspath(args.path), "ok": not problems, "streams": len(audits),
                   "frames": frames, "entries": entries, "problems": problems, "kept_aside": kept_aside})
    else:
        for p in problems:
            where = p["path"] + (f" at offset {p['offset']}" if p["offset"] is not None else "")
            print(f"PROBLEM {where}: {p['reason']}")
        for path in kept_aside:  # (what recovery cut or set aside: not damage, but worth a look)
            print(f"NOTE {path}: kept aside by a recovery (bytes it cut, or a stray segment)")
        verdict = "OK" if not problems else f"{len(problems)} problem(s)"
        print(f"verify {os.path.abspath(args.path)}: {len(audits)} streams, {frames:,} frames, "
              f"{entries:,} entries, every CRC checked: {verdict}")
    return args.verdict


def repair(args) -> int:
    target = locate(args.path)
    holder = lock_holder(target.root)
    if holder is not None:
        # on stderr, like every refusal: stdout stays a report (and valid JSON with --json)
        print(f"ironwal-mp repair: refusing to repair {target.root}: it is held by a running process "
              f"(pid {holder}); stop it first", file=sys.stderr)
        return EXIT_FINDING
    changes: List[str] = []
    notes: List[str] = []
    # LOCK taken here, not by the Wal: an engine Wal refuses a sharded root, which this repairs
    lock = RootLock(target.root).acquire()
    try:
        if target.kind == "sharded":
            # Workers outlive a coordinator killed outright while they drain their rings, and
            # write the shard files without LOCK: let them finish (or stop them), then remove
            # the dead run's IPC objects but the rings still holding unwritten records, as a
            # start does.
            from ..ipc.leftovers import clear_leftovers
            from ..ipc.names import Names

            for shard, ring in sorted(clear_leftovers(target.root, Names(target.root), target.shard_count).items()):
                ring.close()
                notes.append(f"shard_{shard:02d}: its ring from the last run holds records the files "
                             "lack; kept for the next start, which writes them")
        with Wal(WalOptions(root_path=target.root), lock=False) as wal:
            for name in target.streams:
                if os.path.isdir(os.path.join(target.root, name)):
                    wal.next_id(name)  # the first use of a stream recovers it
            for report in wal.recovery_reports:
                for action in report.actions:
                    side = f" (cut bytes kept in {report.side_file})" if report.side_file and action.startswith("cut") else ""
                    changes.append(f"{os.path.basename(report.stream_dir)}: {action}{side}")
            if target.kind == "sharded":
                report = CheckpointLog(target.root).report
                for action in report.actions:
                    if action.startswith("cut") and report.side_file:
                        action += f" (cut bytes kept in {report.side_file}"
                        if report.stranded_records:
                            action += f"; they hold {report.stranded_records} intact record(s) that " \
                                      "lay past the damage, gone from the log now"
                        action += ")"
                    changes.append(f"checkpoints.log: {action}")
    finally:
        lock.release()
    remaining = [p for name in target.streams if os.path.isdir(os.path.join(target.root, name))
                 for p in audit_stream(os.path.join(target.root, name)).problems]
    args.verdict = EXIT_FINDING if remaining else EXIT_OK
    if args.json:
        emit_json({"root": target.root, "changes": changes, "notes": notes,
                   "remaining_problems": [str(p) for p in remaining]})
    else:
        for c in changes:
            print(f"repaired {c}")
        for n in notes:
            print(f"NOTE {n}")
        if not changes:
            print(f"nothing to repair in {target.root}")
        for p in remaining:
            print(f"NOT REPAIRED {p} (damage inside a sealed segment, or a file that cannot be read: left as it is)")
    return args.verdict
