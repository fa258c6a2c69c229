"""``ironwal-mp replay``: entries to stdout, for piping into other tools.

Raw mode writes each entry followed by a newline (entries that contain newlines stay
ambiguous: use --json). JSON mode writes one object per line with shard, id and the data as
text, or as ``data_hex`` when it is not UTF-8.
"""

from __future__ import annotations

import json
import os
import sys
from typing import List

from ..engine.audit import audit_stream
from ..engine.checkpoint_log import CheckpointLog
from ..errors import CorruptionError, ShardCountMismatchError, WalClosedError, WorkerFailedError
from ..sharded.manifest import recorded_shard_count
from .locate import locate, open_sharded, sharded_root
from .output import EXIT_OK, UsageError


def _refuse_if_damaged(root: str) -> None:
    """CorruptionError if any shard of a stopped WAL has a damaged or torn frame or lost files,
    or checkpoints.log a damaged or torn record: starting it would let recovery cut them (into
    a .broken file), and a read must not change what the log holds. A stale segments.idx or
    head.state (a crash mid-rotation), or a HEAD that falls back to the last record, does not
    stop it: recovery rewrites those from what the files hold and cuts nothing."""
    target = locate(root)
    problems = [(p.path, p.offset, p.reason)
                for name in target.streams if os.path.isdir(os.path.join(root, name))
                for p in audit_stream(os.path.join(root, name)).problems if not p.rebuildable]
    report = CheckpointLog(root, repair=False).report
    if report.cut_offset is not None:
        problems.append((report.log_path, report.cut_offset, report.cut_reason or "damaged record"))
    if problems:
        path, offset, reason = problems[0]
        raise CorruptionError(path, offset if offset is not None else -1,
                              f"{reason} ({len(problems)} problem(s): see `ironwal-mp verify`). "
                              f"replay never cuts frames or records: run `ironwal-mp repair {root}` first")


def run(args) -> int:
    root = sharded_root(args.root)
    out = sys.stdout.buffer
    _check_shard(args.shard, recorded_shard_count(root))  # (before a stopped WAL is started)
    started = False
    try:
        wal = open_sharded(root, start=False)
    except WalClosedError:  # stopped: starting it recovers, which may cut
        _refuse_if_damaged(root)
        wal, started = open_sharded(root), True
    with wal:
        if started:  # records a killed run acknowledged into kept rings are written now: wait
            try:
                wal.sync()
            except WorkerFailedError as exc:
                print(f"ironwal-mp replay: warning: {exc}; replaying what the files hold", file=sys.stderr)
        n = wal.shard_count
        _check_shard(args.shard, n)
        starts: List[int] = [0] * n
        if args.from_checkpoint is not None:
            log = CheckpointLog(root, repair=False)
            data = log.latest() if args.from_checkpoint == "latest" else log.get(os.fsencode(args.from_checkpoint))
            if data.shard_count != n:
                raise ShardCountMismatchError(
                    n, data.shard_count, f"checkpoint {data.user_id!r} records {data.shard_count} shards, "
                                         f"this WAL has {n}: its offsets are not this WAL's")
            starts = list(data.offsets)
        shards = [args.shard] if args.shard is not None else range(n)
        try:
            for s in shards:
                if not args.json:
                    for entry in wal.iter_shard(s, starts[s]):
                        out.write(entry + b"\n")
                    continue
                for seq, entry in wal.iter_shard(s, starts[s], with_ids=True):
                    doc = {"shard": s, "id": seq}
                    try:
                        doc["data"] = entry.decode("utf-8")
                    except UnicodeDecodeError:
                        doc["data_hex"] = entry.hex()
                    out.write(json.dumps(doc).encode() + b"\n")
            out.flush()
        except BrokenPipeError:  # e.g. piped into head
            sys.stderr.close()
    return EXIT_OK


def _check_shard(shard, count) -> None:
    if shard is not None and count is not None and not 0 <= shard < count:
        raise UsageError(f"--shard {shard} is out of range (0..{count - 1})")

