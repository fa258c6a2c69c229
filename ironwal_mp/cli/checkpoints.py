"""``ironwal-mp checkpoint create|list|show|prune|compact`` on a running or stopped WAL.

Reads (list, show) go straight to checkpoints.log. Changes go through the coordinator: the
running one, or, for a stopped WAL, one started for the call and stopped after it.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Dict

from ..engine.checkpoint_log import CheckpointData, CheckpointLog
from .locate import open_sharded, sharded_root
from .output import EXIT_FINDING, EXIT_OK, UsageError, bytes_field, emit_json, shown_field, table


def _doc(data: CheckpointData) -> Dict[str, Any]:
    return {**bytes_field("id", data.user_id), "timestamp_ns": data.timestamp, "shard_count": data.shard_count,
            "offsets": list(data.offsets), "entries": sum(data.offsets)}


def _when(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ns / 1e9)) + f".{ns % 1_000_000_000 // 1_000_000:03d}Z"


def run(args) -> int:
    root = sharded_root(args.root)
    if args.action == "list":
        log = CheckpointLog(root, repair=False)
        docs = [_doc(r) for r in log.records()]
        args.verdict = EXIT_OK if log.report.cut_offset is None else EXIT_FINDING
        if args.json:
            emit_json(docs)
        elif not docs:
            print(f"no checkpoints in {root}")
        else:
            table([[shown_field(d, "id"), _when(d["timestamp_ns"]), f"{d['entries']:,}"] for d in docs],
                  header=["checkpoint", "created (UTC)", "entries appended before it"])
        report = log.report
        if report.cut_offset is None:
            return EXIT_OK
        # (on stderr: stdout stays the list, and valid JSON with --json)
        past = (f"; {report.stranded_records} intact record(s) past it are not listed"
                if report.stranded_records else "")
        print(f"ironwal-mp checkpoint list: {report.log_path} is damaged at offset {report.cut_offset} "
              f"({report.cut_reason}){past}: see `ironwal-mp verify`", file=sys.stderr)
        return EXIT_FINDING
    if args.action == "show":
        log = CheckpointLog(root, repair=False)
        data = log.latest() if args.id == "latest" else log.get(os.fsencode(args.id))
        doc = _doc(data)
        if args.json:
            emit_json(doc)
        else:
            print(f"checkpoint {shown_field(doc, 'id')}, created {_when(data.timestamp)}, "
                  f"{data.shard_count} shards, {doc['entries']:,} entries appended before it")
            table([[s, f"{off:,}"] for s, off in enumerate(data.offsets)], header=["shard", "next id"])
        return EXIT_OK
    with open_sharded(root) as wal:
        if args.action == "create":
            data = wal.create_checkpoint(os.fsencode(args.id))
            doc = _doc(data)
            text = f"created checkpoint {args.id}: offsets {list(data.offsets)}"
        elif args.action == "prune":
            stats = wal.prune_before_checkpoint(os.fsencode(args.id))
            doc = {"shards_pruned": stats.shards_pruned, "segments_deleted": stats.segments_deleted}
            text = f"pruned before {args.id}: {stats.segments_deleted} segments deleted on {stats.shards_pruned} shards"
        elif args.action == "compact":
            stats = wal.compact_checkpoints(args.keep)
            doc = {"checkpoints_before": stats.checkpoints_before, "checkpoints_after": stats.checkpoints_after,
                   "bytes_reclaimed": stats.bytes_reclaimed}
            text = (f"compacted checkpoints.log: {stats.checkpoints_before} -> {stats.checkpoints_after} records, "
                    f"{stats.bytes_reclaimed} bytes reclaimed")
        else:  # pragma: no cover - argparse restricts the choices
            raise UsageError(f"unknown action {args.action}")
    if args.json:
        emit_json(doc)
    else:
        print(text)
    return EXIT_OK
