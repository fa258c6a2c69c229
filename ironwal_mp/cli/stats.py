"""``ironwal-mp stats``: per-shard ids, ring fill, rates and fsync latency of a running WAL."""

from __future__ import annotations

import sys
import time
from typing import Any, Dict, List

from .. import connect
from ..ipc.ring import pid_alive
from .locate import sharded_root
from .output import EXIT_FINDING, EXIT_OK, emit_json, rate, table


def _rates(a: Dict[str, Any], b: Dict[str, Any], dt: float) -> List[Dict[str, Any]]:
    rows = []
    for x, y in zip(a["shards"], b["shards"]):
        fs = y["fsyncs"] - x["fsyncs"]
        row = dict(y)
        row["appends_per_s"] = (y["next_id"] - x["next_id"]) / dt
        row["fsyncs_per_s"] = fs / dt
        row["ring_fill"] = y["ring_used"] / y["ring_capacity"] if y["ring_capacity"] else 0.0
        rows.append(row)
    return rows


def _print(root: str, snap: Dict[str, Any], rows: List[Dict[str, Any]]) -> None:
    print(f"{root}: {snap['shard_count']} shards, coordinator pid {snap['coordinator_pid']}, "
          f"workers {snap['worker_pids']}, {snap['state']}")
    table([[r["shard"], f"{r['next_id']:,}", f"{r['durable_id']:,}", f"{r['ring_fill'] * 100:.1f}%",
            rate(r["appends_per_s"]), f"{r['fsyncs_per_s']:.0f}", f"{r['fsync_avg_us']:.0f}", r["state"]]
           for r in rows],
          header=["shard", "next id", "durable id", "ring fill", "appends/s", "fsyncs/s", "fsync avg us", "state"])
    total = sum(r["appends_per_s"] for r in rows)
    print(f"total: {rate(total)} appends/s")


def run(args) -> int:
    root = sharded_root(args.root)  # (a path that holds no sharded WAL is a usage error)
    with connect(root) as wal:
        a = wal.stats()
        t = time.monotonic()
        while True:
            time.sleep(args.interval)
            b = wal.stats()
            now = time.monotonic()
            rows = _rates(a, b, now - t)
            if args.json:
                emit_json({**{k: v for k, v in b.items() if k != "shards"}, "shards": rows}, line=args.watch)
            else:
                if args.watch and sys.stdout.isatty():
                    sys.stdout.write("\x1b[H\x1b[2J")
                _print(wal.root, b, rows)
            sys.stdout.flush()
            if not args.watch:
                return EXIT_OK
            if b["state"] in ("closing", "closed") or not pid_alive(b["coordinator_pid"]):
                print(f"ironwal-mp stats: the WAL at {wal.root} has stopped", file=sys.stderr)
                return EXIT_FINDING
            a, t = b, now
