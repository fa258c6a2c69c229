"""A producer process for tests/test_sharded_failures.py (run as a script, never imported by pytest).

It attaches to a running sharded WAL with ``connect(root)`` and appends until told to stop,
recording every *acknowledged* entry to its ack file as ``"<shard> <seq> <value-hex>"``, one
line per entry, flushed right after each acknowledgement (so the lines survive a SIGKILL of
anything but the producer itself). Values describe themselves so that the test can account for
entries that reached the disk without being acknowledged:

    <tag>:<op>:<shard>:<k>/<m>:<filler>

``op`` counts this producer's calls, ``shard`` is where the key routes, ``m`` is how many
entries of that call went to that shard (1 for a single append; the shard's share of a batch)
and ``k`` the entry's place among them; ``filler`` is derived from the rest, so torn or foreign
bytes are detected.

On an error the producer writes ``"ERR <type> <message>"`` to the ack file and exits with 3.
Mode ``hold-lock`` instead takes a shard's ring lock, writes junk at the ring's tail (a
half-copied record) and sleeps until it is killed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import struct
import sys
import time

from ironwal_mp import errors as E
from ironwal_mp.options import SyncMode
from ironwal_mp.sharded.client import connect

#: what the hold-lock mode writes into the ring: records that look valid (length 8)
JUNK_RECORD = struct.pack("<I", 8) + b"JUNKJUNK"


def make_value(tag: str, op: int, shard: int, k: int, m: int) -> bytes:
    head = f"{tag}:{op}:{shard}:{k}/{m}:"
    filler = hashlib.blake2b(head.encode(), digest_size=8).hexdigest() * (1 + (op + k) % 4)
    return (head + filler).encode()


def parse_value(value: bytes):
    """(tag, op, shard, k, m) of a well-formed value, or None (junk, torn, foreign)."""
    try:
        tag, op, shard, km, filler = value.decode().split(":")
        k, m = km.split("/")
        op, shard, k, m = int(op), int(shard), int(k), int(m)
    except (UnicodeDecodeError, ValueError):
        return None
    if make_value(tag, op, shard, k, m) != value or not 0 <= k < m:
        return None
    return tag, op, shard, k, m


def keys_for_shard(wal, shard: int, count: int, rng: random.Random) -> list:
    keys = []
    while len(keys) < count:
        key = b"key-%d" % rng.randrange(1 << 30)
        if wal.shard_for(key) == shard:
            keys.append(key)
    return keys


def produce(args) -> int:
    mode = SyncMode[args.sync.upper()]
    wal = connect(args.root, sync_mode=mode, timeout=args.timeout)
    rng = random.Random(args.tag)
    if args.shard is not None:
        pool = keys_for_shard(wal, args.shard, 64, rng)
    else:
        pool = [b"key-%d" % i for i in range(512)]
    out = open(args.acks, "a", buffering=1 << 16)
    if args.checkpoint:
        wal.create_checkpoint(args.tag.encode())  # a control request: this process now has a reply queue
    deadline = time.monotonic() + args.max_seconds
    op = 0
    try:
        while op < args.count and time.monotonic() < deadline:
            if args.stop_file and op % 16 == 0 and os.path.exists(args.stop_file):
                break
            r = rng.random() if args.batches else 1.0
            if r < 0.1:
                # one shard, one frame: all or nothing
                key = rng.choice(pool)
                n = rng.randint(2, 8)
                shard = wal.shard_for(key)
                values = [make_value(args.tag, op, shard, k, n) for k in range(n)]
                acked = list(zip(wal.append_batch_for_key(key, values), values))
            elif r < 0.2:
                # several shards: each shard's part is one frame
                keys = [rng.choice(pool) for _ in range(rng.randint(2, 6))]
                shards = [wal.shard_for(key) for key in keys]
                per, seen = {s: shards.count(s) for s in shards}, {}
                values = []
                for s in shards:
                    values.append(make_value(args.tag, op, s, seen.get(s, 0), per[s]))
                    seen[s] = seen.get(s, 0) + 1
                acked = list(zip(wal.append_batch(list(zip(keys, values))), values))
            else:
                key = rng.choice(pool)
                value = make_value(args.tag, op, wal.shard_for(key), 0, 1)
                acked = [(wal.append(key, value), value)]
            out.write("".join(f"{s} {q} {v.hex()}\n" for (s, q), v in acked))
            out.flush()
            op += 1
            if args.pace and op % 16 == 0:
                time.sleep(args.pace)
    except (E.WalError, OSError) as exc:
        out.write(f"ERR {type(exc).__name__} {str(exc)!r}\n")
        out.flush()
        out.close()
        if args.no_close:
            os._exit(3)  # leave this process's IPC objects behind, as a crash would
        wal.close()
        return 3
    out.write(f"DONE {op}\n")
    out.close()
    wal.close()
    return 0


def hold_lock(args) -> int:
    """Take a shard's ring lock, write a half-copied record at the tail, and wait to be killed."""
    wal = connect(args.root, sync_mode=SyncMode.ASYNC, timeout=args.timeout)
    ring = wal._rings[args.shard]
    ring.acquire()
    h = ring.header
    gen = h[8]
    base, nb = (24, 16) if gen & 1 else (16, 24)
    tail = h[base]
    off = tail & ring.mask
    free = ring.capacity - (tail - h[32])
    room = min(ring.capacity - off, free, 20 * len(JUNK_RECORD))
    junk = (JUNK_RECORD * 20)[:room]
    ring.data[off : off + len(junk)] = junk
    # half a publish: the next slot is filled in, GEN (the publish) is never stored
    h[nb] = tail + len(junk)
    h[nb + 1] = h[base + 1] + len(junk) // len(JUNK_RECORD)
    with open(args.acks, "a") as fh:
        fh.write(f"HELD {os.getpid()} {len(junk)}\n")
    time.sleep(120)
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--acks", required=True)
    p.add_argument("--tag", required=True)
    p.add_argument("--sync", default="async")
    p.add_argument("--mode", default="produce", choices=["produce", "hold-lock"])
    p.add_argument("--shard", type=int, default=None, help="use keys of this shard only")
    p.add_argument("--count", type=int, default=1 << 40, help="stop after this many calls")
    p.add_argument("--stop-file", default=None, help="stop once this file exists")
    p.add_argument("--max-seconds", type=float, default=60.0)
    p.add_argument("--pace", type=float, default=0.0, help="sleep this long every 16 calls")
    p.add_argument("--batches", action="store_true", help="mix in append_batch(_for_key)")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--no-close", action="store_true")
    p.add_argument("--checkpoint", action="store_true", help="create a checkpoint named after the tag first")
    args = p.parse_args()
    if args.mode == "hold-lock":
        return hold_lock(args)
    return produce(args)


if __name__ == "__main__":
    sys.exit(main())
