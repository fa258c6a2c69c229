"""``ironwal-mp serve``: run the coordinator in the foreground for jobs that ``connect()``."""

from __future__ import annotations

import json
import os
import sys

from .. import WalOptions
from ..options import SyncMode, options_to_dict
from ..errors import ConfigError
from ..sharded.client import (DEFAULT_FLUSH_INTERVAL, DEFAULT_RING_SIZE, check_flush_interval, check_workers,
                              service_args)
from ..sharded.manifest import open_manifest
from .output import EXIT_FINDING, EXIT_OK, UsageError


def run(args) -> int:
    root = os.path.abspath(args.root)
    flush = DEFAULT_FLUSH_INTERVAL if args.flush_interval is None else args.flush_interval
    try:
        check_flush_interval(flush)
    except ConfigError as exc:
        raise UsageError(f"--flush-interval: {exc}") from None
    if args.workers is not None:
        try:
            check_workers(args.workers)
        except ConfigError as exc:
            raise UsageError(f"--workers: {exc}") from None
    opts = WalOptions(root_path=root, sync_mode=SyncMode[args.sync.upper()])
    open_manifest(root, args.shards, create=False)  # a shard-count mismatch is a usage error, said first
    os.environ["IRONWAL_MP_OPTIONS"] = json.dumps(options_to_dict(opts))
    from coordinator.coordinator import main as coordinator_main

    print(f"serving {root} with {args.shards} shards (pid {os.getpid()}); "
          f"jobs attach with ironwal_mp.connect({root!r}); Ctrl-C or SIGTERM stops it", flush=True)
    code = coordinator_main(["--root", root, *service_args(args.shards, args.workers, args.ring_size or DEFAULT_RING_SIZE,
                                                          flush, not args.no_idle_flush)])
    if code != 0:  # (the coordinator has logged why: another holds LOCK, a bad MANIFEST, ...)
        print(f"serve: the coordinator for {root} did not start (status {code}); nothing was changed",
              file=sys.stderr, flush=True)
        return EXIT_FINDING
    print("stopped: rings drained, files fsynced, IPC objects removed", flush=True)
    return EXIT_OK
