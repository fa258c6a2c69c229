"""Argument parsing and dispatch for ``ironwal-mp``; maps errors to exit codes."""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from .. import errors as E
from .output import EXIT_FINDING, EXIT_OK, EXIT_USAGE, UsageError

SYNC_CHOICES = ["strict", "batch_only", "async"]
ROOT_HELP = "WAL directory (default ./wal_data)"
JSON_HELP = "print the result as JSON"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ironwal-mp", description="ironwal_mp: a durable, sharded write-ahead log")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("ingest", help="append records to a sharded WAL (the main job)",
                       description="Append JSON lines, CSV or raw lines (or a synthetic ledger stream when no "
                                   "input is given) to a sharded WAL, with periodic checkpoints.")
    s.add_argument("input", nargs="?", help="input file, '-' for stdin; none: a synthetic ledger event stream")
    s.add_argument("--root", default="./wal_data", help="WAL directory (default ./wal_data)")
    s.add_argument("--format", choices=["jsonl", "csv", "raw"], help="input format (default: from the file name)")
    s.add_argument("--key", help="JSON field or CSV column to route by (raw lines route by the whole line)")
    s.add_argument("--shards", type=int, default=16, help="shard count (default 16)")
    s.add_argument("--workers", type=int, help="worker processes (default min(shards, cpus))")
    s.add_argument("--sync", choices=SYNC_CHOICES, default="async", help="sync mode (default async)")
    s.add_argument("--batch", type=int, default=1000, help="records per append_batch call (default 1000)")
    s.add_argument("--ring-size", type=int, help="bytes of shared-memory ring per shard, a power of two from 4096 to 2**31: "
                                                 "a record must fit in one (default 1 MiB; only when ingest starts the WAL)")
    s.add_argument("--checkpoint-every", type=int, metavar="N", help="write a checkpoint every N records")
    s.add_argument("--records", type=int, default=None, help="synthetic records to generate (default 1,000,000)")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")

    s = sub.add_parser("serve", help="run the coordinator in the foreground for connect()ing jobs")
    s.add_argument("--root", required=True, help="WAL directory")
    s.add_argument("--shards", type=int, required=True, help="shard count (a WAL that exists must have this one)")
    s.add_argument("--workers", type=int, help="worker processes (default min(shards, cpus))")
    s.add_argument("--sync", choices=SYNC_CHOICES, default="strict",
                   help="sync mode of jobs that connect() without choosing one (default strict)")
    s.add_argument("--ring-size", type=int, help="bytes of shared-memory ring per shard (a power of two, 4096 to 2**31)")
    s.add_argument("--flush-interval", type=float, metavar="SECONDS",
                   help="longest an ASYNC entry stays unsynced under continuous load (default 0.1)")
    s.add_argument("--no-idle-flush", action="store_true",
                   help="do not fsync as soon as the rings go quiet (fewer fsyncs at light load)")

    s = sub.add_parser("checkpoint", help="create, list, show, prune before, or compact checkpoints")
    csub = s.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, help_ in (("create", "create a checkpoint"), ("show", "show one checkpoint ('latest' for the newest)"),
                        ("prune", "delete segments below a checkpoint's offsets")):
        c = csub.add_parser(name, help=help_)
        c.add_argument("id", help="checkpoint id (UTF-8 text)")
        c.add_argument("--root", default="./wal_data", help=ROOT_HELP)
        c.add_argument("--json", action="store_true", help=JSON_HELP)
    c = csub.add_parser("list", help="list checkpoints, oldest first")
    c.add_argument("--root", default="./wal_data", help=ROOT_HELP)
    c.add_argument("--json", action="store_true", help=JSON_HELP)
    c = csub.add_parser("compact", help="keep only the newest checkpoints in checkpoints.log")
    c.add_argument("--keep", type=int, default=10, help="checkpoints to keep, newest first (default 10)")
    c.add_argument("--root", default="./wal_data", help=ROOT_HELP)
    c.add_argument("--json", action="store_true", help=JSON_HELP)

    s = sub.add_parser("replay", help="write entries to stdout")
    s.add_argument("--root", default="./wal_data", help=ROOT_HELP)
    s.add_argument("--from-checkpoint", metavar="ID", help="start after checkpoint ID ('latest' for the newest)")
    s.add_argument("--shard", type=int, help="only this shard")
    s.add_argument("--json", action="store_true", help="one JSON object per entry, with shard and id")

    for name, help_ in (("inspect", "describe what is on disk"), ("verify", "check every frame, CRC and index file"),
                        ("repair", "run recovery offline and report what changed")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("path", nargs="?", default="./wal_data",
                       help="a WAL directory (sharded or engine) or one stream's (default ./wal_data)")
        s.add_argument("--json", action="store_true", help=JSON_HELP)

    s = sub.add_parser("stats", help="live per-shard statistics of a running WAL")
    s.add_argument("--root", default="./wal_data", help=ROOT_HELP)
    s.add_argument("--watch", action="store_true", help="refresh in place until Ctrl-C")
    s.add_argument("--interval", type=float, default=1.0, help="seconds between samples (default 1)")
    s.add_argument("--json", action="store_true", help=JSON_HELP)
    for command in (sub, csub):  # (each names its own parser, for _refuse_extras)
        for parser in command.choices.values():
            parser.set_defaults(own_parser=parser)
    return p


def _refuse_extras(args: argparse.Namespace, extras: List[str]) -> None:
    """Exit with the command's own usage for arguments it does not take (argparse would show
    the top-level usage, which does not say what the command takes)."""
    hint = ""
    dirs = [e for e in extras if not e.startswith("-") and os.path.isdir(e)]
    if hasattr(args, "root") and dirs:
        hint = f" (the WAL directory is given with --root, as in --root {dirs[0]})"
    args.own_parser.error(f"unrecognized arguments: {' '.join(extras)}{hint}")


def _check_numbers(args) -> None:
    """UsageError for a numeric option out of its range (said before anything starts)."""
    from ..sharded.manifest import MAX_SHARDS

    if getattr(args, "shards", None) is not None and not 1 <= args.shards <= MAX_SHARDS:
        raise UsageError(f"--shards must be between 1 and {MAX_SHARDS}, got {args.shards}")
    for name, low in (("batch", 1), ("records", 0), ("checkpoint_every", 1), ("keep", 1)):
        value = getattr(args, name, None)
        if value is not None and value < low:
            raise UsageError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
    ring_size = getattr(args, "ring_size", None)
    if ring_size is not None:
        from ..ipc.ring_layout import check_capacity

        try:
            check_capacity(ring_size)
        except ValueError as exc:  # said here, not as a traceback from inside the coordinator
            raise UsageError(f"--ring-size: {exc}") from None
    interval = getattr(args, "interval", None)
    if interval is not None and not 0 < interval <= 86400:
        raise UsageError(f"--interval must be a positive number of seconds, at most a day (86400), got {interval}")


def main(argv: Optional[List[str]] = None) -> int:
    args, extras = build_parser().parse_known_args(argv)
    if extras:
        _refuse_extras(args, extras)
    if sys.stdout is None:  # started with descriptor 1 closed (`>&-`): refused before anything is done
        print(f"ironwal-mp {args.command}: error: standard output is closed", file=sys.stderr)
        return EXIT_USAGE
    try:
        _check_numbers(args)
        if args.command in ("ingest", "serve"):
            from .locate import check_sharded_root

            check_sharded_root(args.root)
        if args.command == "ingest":
            from . import ingest

            if args.records is None:
                args.records = ingest.DEFAULT_RECORDS
            elif args.input is not None:
                raise UsageError("--records only applies to the synthetic stream (no input file)")
            return ingest.run(args)
        if args.command == "serve":
            from . import serve

            return serve.run(args)
        if args.command == "checkpoint":
            from . import checkpoints

            return checkpoints.run(args)
        if args.command == "replay":
            from . import replay

            return replay.run(args)
        if args.command in ("inspect", "verify", "repair"):
            from . import audit

            return getattr(audit, args.command)(args)
        if args.command == "stats":
            from . import stats

            return stats.run(args)
    except UsageError as exc:
        print(f"ironwal-mp {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (E.ShardCountMismatchError, E.InvalidCheckpointIdError, E.ConfigError) as exc:
        print(f"ironwal-mp {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (E.CheckpointNotFoundError, E.NoCheckpointsError, E.CheckpointExistsError, E.ManifestError) as exc:
        print(f"ironwal-mp {args.command}: {exc}", file=sys.stderr)
        return EXIT_FINDING
    except E.WalError as exc:
        print(f"ironwal-mp {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FINDING
    except KeyboardInterrupt:
        print(f"ironwal-mp {args.command}: aborted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # (the reader went away: `| head`); a verdict reached still counts
        return getattr(args, "verdict", EXIT_OK)
    except OSError as exc:  # e.g. stdout on a full disk, or a LOCK that is a directory
        print(f"ironwal-mp {args.command}: {exc}", file=sys.stderr)
        try:
            sys.stdout.close()  # (what it could not write is not tried again at exit)
        except OSError:
            pass
        return EXIT_FINDING
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
