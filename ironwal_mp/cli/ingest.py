"""``ironwal-mp ingest``: append records to a sharded WAL, checkpointing as it goes.

Ctrl-C or SIGTERM (a service manager's stop) ends the run after the batch in hand: it is appended,
a checkpoint is written, and the summary says how far the job got; nothing acknowledged is lost.
A second one aborts at once. The exit status is 128 + the signal's number (130, 143).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from typing import Dict, List, Optional, Tuple

from .. import ShardedWal, SyncMode, WalOptions
from ..errors import RecordTooLargeError
from ..sharded.client import DEFAULT_RING_SIZE
from ..engine import layout
from ..sharded.manifest import shard_stream
from .live import IDLE, Feed, is_live
from .output import Progress, UsageError, emit_json, rate, size, table
from .sources import Record, open_source, synthetic_ledger

DEFAULT_RECORDS = 1_000_000
#: an input that goes quiet for this long has what it sent appended (and acknowledged) at once
IDLE_FLUSH_S = 0.1


def _dir_bytes(root: str, shards: int) -> Tuple[int, int]:
    """(segment bytes on disk, segment files) over all shards."""
    total = files = 0
    for s in range(shards):
        d = os.path.join(root, shard_stream(s))
        for name in os.listdir(d) if os.path.isdir(d) else ():
            if layout.parse_segment_name(name) is not None:
                total += os.path.getsize(os.path.join(d, name))
                files += 1
    return total, files


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _stop_signals_held():
    """Hold Ctrl-C and SIGTERM back while a library call runs; the handler runs once it returns.

    The library's IPC waits (posix_ipc) turn a signal whose handler returns, as ours does on the
    first Ctrl-C, into posix_ipc.SignalError in the middle of an append or a checkpoint. So the
    handler must run between library calls, never inside one.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, set(STOP_SIGNALS))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def run(args) -> int:
    # (--batch, --checkpoint-every and --records are range-checked by main._check_numbers)
    total: Optional[int] = None
    live = False
    if args.input is None:
        records = synthetic_ledger(args.records)
        described = f"synthetic ledger events ({args.records:,} records, key 'account')"
        total = args.records
    else:
        records, described = open_source(args.input, args.format, args.key)
        total = None
        live = is_live(args.input)
    root = os.path.abspath(args.root)
    opts = WalOptions(root_path=root, sync_mode=SyncMode[args.sync.upper()])
    # (--ring-size is checked by main._check_numbers)
    ring_size = DEFAULT_RING_SIZE if args.ring_size is None else args.ring_size
    # "count": records appended when the stop came; once more are, the batch in hand is done
    stop = {"requested": False, "signal": 0, "count": 0}

    def on_stop_signal(sig, _frame):
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"], stop["signal"], stop["count"] = True, sig, count
        what = "interrupt" if sig == signal.SIGINT else signal.Signals(sig).name
        sys.stderr.write(f"\n{what}: finishing the current batch, then a checkpoint (a second Ctrl-C or SIGTERM aborts)\n")

    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    # the pid keeps ids of runs started in the same second (one after another, or side by side
    # against `serve`) apart: an id the log holds is refused, so a clash would fail the run
    run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{os.getpid()}"
    per_shard: Dict[int, int] = {}
    checkpoints: List[bytes] = []
    count = raw_bytes = 0
    progress = Progress("ingest", total)
    disk_before, _ = _dir_bytes(root, args.shards)  # the ratio is this run's: what its bytes added
    try:
        with ShardedWal(opts, args.shards, workers=args.workers, ring_size=ring_size) as wal:
            # installed once the WAL is open: until then Ctrl-C is a plain KeyboardInterrupt ("aborted"),
            # and no signal mask is inherited by the coordinator the open starts
            for sig in STOP_SIGNALS:
                signal.signal(sig, on_stop_signal)
            if not args.json:
                print(f"ingesting {described} into {root}: {wal.shard_count} shards, "
                      f"sync {opts.sync_mode.value}, batch {args.batch}")
            next_ckpt = args.checkpoint_every
            batch: List[Record] = []
            # a batch's part for one shard must fit that shard's ring: large records make
            # smaller batches (at most half a ring per part, so producers and worker overlap)
            part_limit = min(s["ring_capacity"] for s in wal.stats()["shards"]) // 2
            part_bytes: Dict[int, int] = {}

            def flush() -> None:
                nonlocal count, raw_bytes
                if not batch:
                    return
                with _stop_signals_held():
                    acks = [wal.append(*batch[0])] if len(batch) == 1 else wal.append_batch(batch)
                for shard, _seq in acks:
                    per_shard[shard] = per_shard.get(shard, 0) + 1
                nbytes = sum(len(v) for _, v in batch)
                count += len(batch)
                raw_bytes += nbytes
                progress.update(len(batch), nbytes)
                batch.clear()
                part_bytes.clear()

            def checkpoint(label: str) -> None:
                cid = f"ingest-{run_id}-{label}".encode()
                with _stop_signals_held():
                    wal.create_checkpoint(cid)
                checkpoints.append(cid)

            def flush_and_checkpoint() -> None:
                """Flush the batch, then write a checkpoint if one is due."""
                nonlocal next_ckpt
                flush()
                if next_ckpt is not None and count >= next_ckpt:
                    checkpoint(str(count))
                    next_ckpt = (count // args.checkpoint_every + 1) * args.checkpoint_every

            def add(record: Record) -> None:
                shard, need = wal.shard_for(record[0]), 4 + len(record[1])
                if batch and part_bytes.get(shard, 0) + need > part_limit:
                    flush_and_checkpoint()
                batch.append(record)
                part_bytes[shard] = part_bytes.get(shard, 0) + need
                if len(batch) >= args.batch:
                    flush_and_checkpoint()

            # a pipe or a terminal may go quiet for good: read it on a thread, and append what
            # came in as soon as it does (a regular file is read here, at full speed)
            feed = Feed(records, IDLE_FLUSH_S, 4 * args.batch, STOP_SIGNALS) if live else None
            try:
                for record in feed if feed is not None else records:
                    if record is not IDLE:
                        add(record)
                    elif batch:
                        flush_and_checkpoint()
                    # a file stops once the batch in hand is appended (a batch cut into parts
                    # by the ring size never empties: each flush leaves the record that
                    # overflowed it); a live input at once (its batch may never fill), with what
                    # it has sent appended
                    if stop["requested"] and (feed is not None or not batch or count > stop["count"]):
                        break
            except BaseException:
                if feed is not None:
                    feed.stop()
                raise
            # what the thread read is gone from the input: on a stop it is appended too
            for record in feed.stop() if feed is not None else ():
                add(record)
            flush()
            if stop["requested"] or not checkpoints or not checkpoints[-1].endswith(b"-%d" % count):
                checkpoint("interrupted" if stop["requested"] else "end")
            progress.done()
            with _stop_signals_held():
                stats = wal.stats()
                wal.close()  # drains the rings and stops the coordinator: no Ctrl-C inside it either
        elapsed = progress.elapsed
    except UsageError as exc:  # bad input part-way through: say what is already in the WAL
        if count:
            raise UsageError(f"{exc}; the {count:,} records before it were appended "
                             "(no checkpoint marks them)") from None
        raise
    except RecordTooLargeError as exc:  # (nothing of the batch that held it was appended)
        raise UsageError(f"a record too large for its shard: {exc} (see --ring-size); the {count:,} records "
                         "before its batch were appended (no checkpoint marks them)") from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    disk, files = _dir_bytes(root, len(stats["shards"]))
    summary = {
        "root": root,
        "records": count,
        "bytes_ingested": raw_bytes,
        "bytes_on_disk": disk,
        "segment_files": files,
        "compression_ratio": (raw_bytes / (disk - disk_before)) if disk > disk_before else None,
        "per_shard": {str(s): per_shard.get(s, 0) for s in range(len(stats["shards"]))},
        "shard_next_ids": [s["next_id"] for s in stats["shards"]],
        "checkpoints": [c.decode() for c in checkpoints],
        "elapsed_s": round(elapsed, 3),
        "records_per_s": round(count / elapsed) if elapsed > 0 else None,
        "interrupted": stop["requested"],
    }
    if args.json:
        emit_json(summary)
    else:
        if stop["requested"]:
            print(f"interrupted: {count:,} records were appended and acknowledged before stopping; "
                  f"checkpoint {checkpoints[-1].decode()} marks the spot")
        ratio = f"{raw_bytes / (disk - disk_before):.2f}x" if disk > disk_before else "-"
        table([
            ["records", f"{count:,}"],
            ["bytes ingested", size(raw_bytes)],
            ["bytes on disk (all segments)", f"{size(disk)} in {files} segment files"],
            ["compression ratio", ratio],
            ["checkpoints", f"{len(checkpoints)} (last {checkpoints[-1].decode()})"],
            ["elapsed", f"{elapsed:.2f} s"],
            ["rate", f"{rate(count / elapsed) if elapsed else '-'} records/s, {raw_bytes / elapsed / 1048576:.1f} MB/s"],
        ], header=["ingest summary", ""])
        print()
        table([[s, f"{per_shard.get(s, 0):,}", f"{st['next_id']:,}"] for s, st in enumerate(stats["shards"])],
              header=["shard", "this run", "total entries"])
    return 128 + stop["signal"] if stop["requested"] else 0

