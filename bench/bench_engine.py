"""Single-process append throughput of the ironwal_mp engine, against raw limits measured in
the same run.

    .venv/bin/python bench/bench_engine.py [--quick] [--dir DIR] [--json]
    .venv/bin/python bench/bench_engine.py --profile 100000     # cProfile of ASYNC appends

Every configuration (3 sync modes x batch sizes 1/100/1000, plus the references below) is
measured ``--repeats`` times, round-robin: each round runs every configuration once, in an
order rotated from round to round, so that noise on a shared machine hits all of them alike.
A measurement runs until its time budget is spent (or an op cap is reached), in a fresh
directory, with set-up (opening, creating the stream) and tear-down (closing, which fsyncs,
and deleting) outside the timed region. The garbage collector is off while timing (as timeit).

Reported: the median over the rounds, and the median of the per-round ratios to a reference
measured in the same round (a ratio of two numbers taken seconds apart, not minutes).

References (all 100-byte records unless sized):
  write          os.write loop of 100-byte records to one O_APPEND file
  write+fsync    os.write then os.fdatasync per record
  write NkB      os.write of a buffer as large as one engine frame of a batch (per call)
  write+fsync NkB  the same buffer, then os.fdatasync (per call)
  sqlite FULL    sqlite3, journal_mode=WAL, synchronous=FULL, one INSERT + commit per row
  sqlite NORMAL  sqlite3, journal_mode=WAL, synchronous=NORMAL, executemany of 1000 rows
                 per commit

This is a measurement, not a test: nothing here checks any figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from typing import Dict, List, Optional

from _common import (  # bench/_common.py: helpers shared with bench_sharded.py
    add_common_arguments,
    ENTRY_SIZE,
    FRAME_HEADER,
    LENGTH_PREFIX,
    Config,
    fmt_rate,
    fmt_ratio,
    machine_info,
    measure,
    median_of,
    paired_ratio,
    round_robin,
    scratch_dir,
    spread,
)
from _common import OPEN_FLAGS as _OPEN_FLAGS
from _common import fdatasync as _fdatasync
from ironwal_mp import CompressionType, SyncMode, Wal, WalOptions

BATCH_SIZES = (1, 100, 1000)
MODES = (SyncMode.ASYNC, SyncMode.BATCH_ONLY, SyncMode.STRICT)
POOL_SIZE = 1000
STREAM = "bench"


# --- configurations ------------------------------------------------------------------------------
#
# A configuration (``_common.Config``) knows how to set itself up in a fresh directory and returns
# (chunk, teardown): ``chunk()`` performs ``ops_per_chunk`` operations; the timing loop calls it
# until the budget is spent. An "op" is one call: one append / one batch / one write / one commit.


def make_configs(pool: List[bytes], compression: CompressionType) -> List[Config]:
    configs: List[Config] = []
    single_chunk = pool[:500]  # 500 distinct payloads per chunk for non-fsync single ops
    fsync_chunk = pool[:10]  # fsync'd single ops: short chunks, the budget check stays fine
    max_entries = 600_000  # caps disk use (~60 MB) of the fastest configurations

    # --- the engine ---
    for mode in MODES:
        for batch in BATCH_SIZES:
            fsynced = mode is SyncMode.STRICT or (mode is SyncMode.BATCH_ONLY and batch > 1)

            def setup(d: str, mode: SyncMode = mode, batch: int = batch, fsynced: bool = fsynced):
                wal = Wal(WalOptions(root_path=d, sync_mode=mode, compression=compression))
                wal.append(STREAM, pool[0])  # creates the stream and its first segment
                if batch == 1:
                    items = fsync_chunk if fsynced else single_chunk
                    append = wal.append

                    def chunk() -> None:
                        for p in items:
                            append(STREAM, p)

                else:
                    batch_list = pool[:batch]
                    append_batch = wal.append_batch

                    def chunk() -> None:
                        append_batch(STREAM, batch_list)

                return chunk, wal.close

            if batch == 1:
                per_chunk = len(fsync_chunk) if fsynced else len(single_chunk)
            else:
                per_chunk = 1
            configs.append(
                Config(
                    f"wal:{mode.name}:{batch}",
                    f"{mode.name} x{batch}",
                    batch,
                    per_chunk,
                    max(1, max_entries // batch),
                    setup,
                )
            )

    # --- raw limits ---
    def raw_setup(buf_list: List[bytes], sync: bool):
        def setup(d: str):
            fd = os.open(os.path.join(d, "raw.dat"), _OPEN_FLAGS, 0o644)
            os.write(fd, pool[0])
            os.fsync(fd)  # the file exists durably before timing, like an engine segment
            write = os.write
            if sync:

                def chunk() -> None:
                    for b in buf_list:
                        write(fd, b)
                        _fdatasync(fd)

            else:

                def chunk() -> None:
                    for b in buf_list:
                        write(fd, b)

            def teardown() -> None:
                try:
                    _fdatasync(fd)  # flush outside the timed region, as Wal.close does
                finally:
                    os.close(fd)

            return chunk, teardown

        return setup

    configs.append(Config("raw:write", "write 100 B", 1, len(single_chunk), max_entries, raw_setup(single_chunk, False)))
    configs.append(Config("raw:fsync", "write+fdatasync 100 B", 1, len(fsync_chunk), 100_000, raw_setup(fsync_chunk, True)))
    for batch in BATCH_SIZES[1:]:
        size = FRAME_HEADER + batch * (LENGTH_PREFIX + ENTRY_SIZE)  # one engine frame's bytes
        buf = os.urandom(size)
        kb = f"{size / 1000:.1f} kB"
        configs.append(
            Config(f"raw:write:{batch}", f"write {kb}", batch, 1, max(1, max_entries // batch), raw_setup([buf], False))
        )
        configs.append(
            Config(f"raw:fsync:{batch}", f"write+fdatasync {kb}", batch, 1, 100_000, raw_setup([buf], True))
        )

    # --- peer: sqlite3 in WAL mode ---
    def sqlite_setup(synchronous: str, rows_per_commit: int):
        def setup(d: str):
            conn = sqlite3.connect(os.path.join(d, "bench.db"), isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={synchronous}")
            conn.execute("CREATE TABLE log (id INTEGER PRIMARY KEY, data BLOB NOT NULL)")
            execute = conn.execute
            sql = "INSERT INTO log (data) VALUES (?)"
            if rows_per_commit == 1:
                rows = [(p,) for p in fsync_chunk]

                def chunk() -> None:
                    for row in rows:
                        execute(sql, row)  # autocommit: one transaction (and commit) per row

            else:
                rows = [(p,) for p in pool[:rows_per_commit]]
                executemany = conn.executemany

                def chunk() -> None:
                    execute("BEGIN")
                    executemany(sql, rows)
                    execute("COMMIT")

            return chunk, conn.close

        return setup

    configs.append(Config("sqlite:full:1", "sqlite WAL FULL, commit/row", 1, len(fsync_chunk), 100_000, sqlite_setup("FULL", 1)))
    configs.append(
        Config("sqlite:normal:1000", "sqlite WAL NORMAL, 1000 rows/commit", 1000, 1, max_entries // 1000, sqlite_setup("NORMAL", 1000))
    )
    return configs


# --- timing ------------------------------------------------------------------------------------


def run_all(configs: List[Config], parent: str, budget: float, repeats: int, progress: bool) -> Dict[str, List[Dict[str, float]]]:
    by_key = {c.key: c for c in configs}
    return round_robin([c.key for c in configs], repeats, lambda key: measure(by_key[key], parent, budget), progress)


# --- reporting ---------------------------------------------------------------------------------


def analyse(configs: List[Config], samples: Dict[str, List[Dict[str, float]]]) -> Dict[str, object]:
    by_key = {c.key: c for c in configs}

    def summary(key: str) -> Dict[str, object]:
        s = samples[key]
        return {
            "label": by_key[key].label,
            "median_ops_per_s": median_of(s, "ops_per_s"),
            "median_entries_per_s": median_of(s, "entries_per_s"),
            "spread": spread(s, "ops_per_s"),
            "ops_per_s": [x["ops_per_s"] for x in s],
            "ops": [x["ops"] for x in s],
        }

    refs = {k: summary(k) for k in samples if not k.startswith("wal:")}
    engine = []
    for mode in MODES:
        for batch in BATCH_SIZES:
            key = f"wal:{mode.name}:{batch}"
            fsynced = mode is SyncMode.STRICT or (mode is SyncMode.BATCH_ONLY and batch > 1)
            ref = "raw:fsync" if fsynced else "raw:write"
            row = summary(key)
            row.update(
                mode=mode.name,
                batch=batch,
                fsync_per_call=fsynced,
                reference=ref,
                ratio=paired_ratio(samples, key, ref, "entries_per_s", "entries_per_s"),
            )
            if batch > 1:
                # per call: batches/s vs fsyncs/s (100 B) or writes/s, and vs a same-size raw call
                row["batches_per_s"] = row["median_ops_per_s"]
                row["call_reference"] = ref
                row["call_ratio"] = paired_ratio(samples, key, ref, "ops_per_s", "ops_per_s")
                sized = f"{ref}:{batch}"
                row["sized_reference"] = sized
                row["sized_ratio"] = paired_ratio(samples, key, sized, "ops_per_s", "ops_per_s")
            peer = "sqlite:full:1" if (mode is SyncMode.STRICT and batch == 1) else (
                "sqlite:normal:1000" if batch == 1000 else None
            )
            if peer:
                row["peer"] = peer
                row["peer_ratio"] = paired_ratio(samples, key, peer, "entries_per_s", "entries_per_s")
            engine.append(row)
    return {"references": refs, "engine": engine}


def print_report(info: Dict[str, object], settings: Dict[str, object], result: Dict[str, object]) -> None:
    refs: Dict[str, Dict[str, object]] = result["references"]  # type: ignore[assignment]
    engine: List[Dict[str, object]] = result["engine"]  # type: ignore[assignment]
    fs = info.get("filesystem") or {}
    print("ironwal_mp engine benchmark: single process, one stream, 100-byte entries")
    print(
        f"machine: {info['cpu_count']} CPUs ({info['cpus_usable']} usable), {info['implementation']} "
        f"{info['python']}, {info['platform']}, SQLite {info['sqlite']}"
    )
    print(
        f"dir: {info['dir']}  filesystem: {fs.get('type', '?')} on {fs.get('device', '?')} "
        f"(mount {fs.get('mount', '?')}), {info.get('free_gb', '?')} GB free"
    )
    print(
        f"run: {settings['repeats']} rounds, round-robin, {settings['budget_s']} s per measurement, "
        f"compression={settings['compression']}, random (incompressible) payloads; "
        f"figures are medians, ratios are medians of per-round ratios; spread = (max-min)/median"
    )
    print()
    print("References (per call)")
    print(f"  {'reference':<36} {'calls/s':>12} {'entries/s':>12} {'spread':>7}")
    for key, r in refs.items():
        print(
            f"  {r['label']:<36} {fmt_rate(r['median_ops_per_s']):>12} "  # type: ignore[arg-type]
            f"{fmt_rate(r['median_entries_per_s']):>12} {r['spread']:>6.0%}"  # type: ignore[arg-type]
        )
    print()
    print("Engine appends (entries/s vs the 100-byte reference: write for unsynced, write+fdatasync for synced)")
    print(f"  {'mode':<11} {'batch':>5} {'entries/s':>12} {'spread':>7}  {'reference':<22} {'ref/s':>11} {'ratio':>8}")
    for row in engine:
        ref = refs[row["reference"]]  # type: ignore[index]
        print(
            f"  {row['mode']:<11} {row['batch']:>5} {fmt_rate(row['median_entries_per_s']):>12} "  # type: ignore[arg-type]
            f"{row['spread']:>6.0%}  {ref['label']:<22} {fmt_rate(ref['median_ops_per_s']):>11} "  # type: ignore[arg-type]
            f"{fmt_ratio(row['ratio']):>8}"
        )
    print()
    print("Batches per call (batches/s vs 100-byte write(+fdatasync)/s, and vs a raw call of one frame's bytes)")
    print(
        f"  {'mode':<11} {'batch':>5} {'batches/s':>10}  {'vs 100 B ref':<22} {'ratio':>7}  "
        f"{'vs same-size raw call':<26} {'ref/s':>9} {'ratio':>7}"
    )
    for row in engine:
        if row["batch"] == 1:
            continue
        ref = refs[row["call_reference"]]  # type: ignore[index]
        sized = refs[row["sized_reference"]]  # type: ignore[index]
        print(
            f"  {row['mode']:<11} {row['batch']:>5} {fmt_rate(row['batches_per_s']):>10}  "  # type: ignore[arg-type]
            f"{ref['label']:<22} {fmt_ratio(row['call_ratio']):>7}  "
            f"{sized['label']:<26} {fmt_rate(sized['median_ops_per_s']):>9} {fmt_ratio(row['sized_ratio']):>7}"  # type: ignore[arg-type]
        )
    print()
    print("Peer: sqlite3 in WAL mode (entries/s ratio)")
    print(f"  {'mode':<11} {'batch':>5} {'entries/s':>12}  {'peer':<36} {'peer/s':>11} {'ratio':>8}")
    for row in engine:
        if "peer" not in row:
            continue
        peer = refs[row["peer"]]  # type: ignore[index]
        print(
            f"  {row['mode']:<11} {row['batch']:>5} {fmt_rate(row['median_entries_per_s']):>12}  "  # type: ignore[arg-type]
            f"{peer['label']:<36} {fmt_rate(peer['median_entries_per_s']):>11} {row['peer_ratio']:>7.3f}x"  # type: ignore[arg-type]
        )


# --- profile mode ------------------------------------------------------------------------------


def profile_appends(parent: str, n: int, compression: CompressionType) -> None:
    import cProfile
    import pstats

    pool = [os.urandom(ENTRY_SIZE) for _ in range(POOL_SIZE)]
    d = tempfile.mkdtemp(prefix="profile-", dir=parent)
    try:
        with Wal(WalOptions(root_path=d, sync_mode=SyncMode.ASYNC, compression=compression)) as wal:
            append = wal.append
            append(STREAM, pool[0])
            prof = cProfile.Profile()
            prof.enable()
            for i in range(n):
                append(STREAM, pool[i % POOL_SIZE])
            prof.disable()
        print(f"cProfile of {n:,} ASYNC single appends of {ENTRY_SIZE} B (top 10 by tottime)")
        pstats.Stats(prof, stream=sys.stdout).strip_dirs().sort_stats("tottime").print_stats(10)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# --- main --------------------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(ap, "30 s", "seconds per measurement (default 0.5, 0.2 with --quick)")
    ap.add_argument("--compression", choices=("lz4", "none"), default="lz4", help="engine compression (default: lz4, the library default)")
    ap.add_argument("--profile", type=int, metavar="N", default=None, help="only profile N ASYNC single appends and print the top 10 functions")
    args = ap.parse_args(argv)

    repeats = args.repeats or (3 if args.quick else 5)
    budget = args.budget or (0.2 if args.quick else 0.5)
    compression = CompressionType.LZ4 if args.compression == "lz4" else CompressionType.NONE

    with scratch_dir(args.dir, here, "bench_engine-") as scratch:
        if args.profile:
            profile_appends(scratch, args.profile, compression)
            return 0
        info = machine_info(scratch)
        pool = [os.urandom(ENTRY_SIZE) for _ in range(POOL_SIZE)]
        configs = make_configs(pool, compression)
        if not args.json:
            print(f"measuring {len(configs)} configurations x {repeats} rounds ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        samples = run_all(configs, scratch, budget, repeats, progress=not args.json)
        wall = time.perf_counter() - t0
        result = analyse(configs, samples)
        settings = {"repeats": repeats, "budget_s": budget, "compression": args.compression, "entry_size": ENTRY_SIZE, "wall_s": round(wall, 1)}
        if args.json:
            json.dump({"machine": info, "settings": settings, **result}, sys.stdout, indent=2)
            print()
        else:
            print_report(info, settings, result)
            print(f"\n(wall time {wall:.1f} s)")
        return 0

if __name__ == "__main__":
    sys.exit(main())
