"""``make run``'s job for now: a short, real session with the engine, narrated.

It writes a small ledger into ``--root`` (single STRICT appends, an atomic batch, a
transaction), reopens the directory as a fresh process would, reads every entry back and
checks it, truncates old segments, and prints what is on disk.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

from . import SyncMode, Wal, WalOptions
from .engine import layout


def _entry(i: int) -> bytes:
    return b'{"seq":%d,"account":"acct-%03d","amount_cents":%d}' % (i, i % 37, (i * 7919) % 100000)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ironwal_mp.demo", description=__doc__)
    parser.add_argument("--root", default="./wal_data", help="WAL directory (default ./wal_data)")
    parser.add_argument("--entries", type=int, default=2000)
    args = parser.parse_args(argv)
    root = os.path.abspath(args.root)
    stream = "ledger"
    opts = WalOptions(root_path=root, sync_mode=SyncMode.STRICT, max_segment_size=64 * 1024)

    t0 = time.perf_counter()
    with Wal(opts) as wal:
        base = wal.next_id(stream)
        print(f"opened {root}: stream {stream!r} continues at id {base}")
        digest = hashlib.sha256()
        n_single = args.entries // 2
        for i in range(base, base + n_single):
            wal.append(stream, _entry(i))
        batch = [_entry(i) for i in range(base + n_single, base + args.entries - 10)]
        ids = wal.append_batch(stream, batch)
        with wal.writer(stream) as txn:
            for i in range(base + args.entries - 10, base + args.entries):
                txn.add(_entry(i))
        for i in range(base, base + args.entries):
            digest.update(_entry(i))
        written = time.perf_counter() - t0
        print(
            f"wrote {n_single} STRICT appends, a batch of {len(ids)} (ids {ids.start}..{ids.stop - 1})"
            f" and a transaction of 10, in {written:.2f}s"
        )

    with Wal(opts) as wal:  # as a fresh process would: recovery runs, nothing to repair
        check = hashlib.sha256()
        count = 0
        for data in wal.iter(stream, base):
            check.update(data)
            count += 1
        ok = check.digest() == digest.digest() and count == args.entries
        print(f"reopened: read back {count} entries, content {'verified' if ok else 'MISMATCH'}")
        segments = layout.list_segments(os.path.join(root, stream))
        if len(segments) > 3:
            removed = wal.truncate(stream, segments[-3])
            print(f"truncate below id {segments[-3]}: removed {removed} old segments")
        first = wal.first_id(stream)
        print(f"stream {stream!r}: ids {first}..{wal.next_id(stream) - 1} readable, "
              f"active segment starts at {wal.current_segment_start_id(stream)}")
        stream_dir = os.path.join(root, stream)
        total = sum(os.path.getsize(os.path.join(stream_dir, n)) for n in os.listdir(stream_dir))
        print(f"on disk: {len(layout.list_segments(stream_dir))} segments, {total} bytes in {stream_dir}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
