"""Measurement helpers shared by the benchmarks in bench/ (engine and sharded layer).

Nothing here checks a figure: these are the timing loop, the round-robin schedule, the machine
description and the small statistics and formatting helpers that every benchmark reports with.
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import argparse
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar

ENTRY_SIZE = 100
FRAME_HEADER = 32  # engine frame header
LENGTH_PREFIX = 4  # engine per-entry length prefix

fdatasync = getattr(os, "fdatasync", os.fsync)
OPEN_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)

T = TypeVar("T")


# --- a time-budgeted measurement ---------------------------------------------------------------
#
# A configuration knows how to set itself up in a fresh directory and returns (chunk, teardown):
# ``chunk()`` performs ``ops_per_chunk`` operations; the timing loop calls it until the budget is
# spent. An "op" is one call: one append / one batch / one write / one commit.


class Config:
    def __init__(
        self,
        key: str,
        label: str,
        entries_per_op: int,
        ops_per_chunk: int,
        max_ops: int,
        setup: Callable[[str], Tuple[Callable[[], None], Callable[[], None]]],
    ) -> None:
        self.key = key
        self.label = label
        self.entries_per_op = entries_per_op
        self.ops_per_chunk = ops_per_chunk
        self.max_ops = max_ops
        self.setup = setup


def add_common_arguments(ap: "argparse.ArgumentParser", quick_takes: str, budget_help: str) -> None:
    """The options both benchmarks share: --quick, --dir, --json, --repeats, --budget."""
    ap.add_argument("--quick", action="store_true", help=f"3 rounds with shorter measurements (under ~{quick_takes})")
    ap.add_argument("--dir", default=None, help="parent of the scratch directory (default: bench/out/ beside this file)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")
    ap.add_argument("--repeats", type=int, default=None, help="rounds (default 5, 3 with --quick)")
    ap.add_argument("--budget", type=float, default=None, help=budget_help)


def measure(cfg: Config, parent: str, budget: float) -> Dict[str, float]:
    """Run ``cfg`` in a fresh directory under ``parent`` for ``budget`` seconds (GC off)."""
    d = tempfile.mkdtemp(prefix=cfg.key.replace(":", "_") + "-", dir=parent)
    try:
        chunk, teardown = cfg.setup(d)
        try:
            chunk()  # warm-up, untimed
            gc.collect()
            gc.disable()
            try:
                per_chunk = cfg.ops_per_chunk
                ops = 0
                perf = time.perf_counter
                c0 = time.thread_time()
                t0 = perf()
                deadline = t0 + budget
                while True:
                    chunk()
                    ops += per_chunk
                    t1 = perf()
                    if t1 >= deadline or ops >= cfg.max_ops:
                        break
                cpu = time.thread_time() - c0
            finally:
                gc.enable()
        finally:
            teardown()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    elapsed = t1 - t0
    return {"ops": ops, "seconds": elapsed, "ops_per_s": ops / elapsed, "entries_per_s": ops * cfg.entries_per_op / elapsed,
            "cpu_s": cpu}


def round_robin(keys: Sequence[str], repeats: int, run_one: Callable[[str], T], progress: bool) -> Dict[str, List[T]]:
    """Run every key once per round, in an order rotated from round to round; samples per key."""
    samples: Dict[str, List[T]] = {k: [] for k in keys}
    n = len(keys)
    for r in range(repeats):
        if progress:
            print(f"  round {r + 1}/{repeats} ...", file=sys.stderr, flush=True)
        shift = (r * max(1, n // repeats + 1)) % n  # rotate the order from round to round
        for i in range(n):
            key = keys[(i + shift) % n]
            samples[key].append(run_one(key))
    return samples


@contextlib.contextmanager
def scratch_dir(parent_arg: Optional[str], here: str, prefix: str) -> Iterator[str]:
    """A fresh scratch directory under ``parent_arg`` (default: bench/out/), removed afterwards
    (and bench/out/ too if this created it)."""
    parent = os.path.abspath(parent_arg or os.path.join(here, "out"))
    created_parent = not os.path.exists(parent)
    os.makedirs(parent, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if created_parent:
            try:
                os.rmdir(parent)
            except OSError:
                pass


# --- reporting ---------------------------------------------------------------------------------


def machine_info(path: str) -> Dict[str, object]:
    info: Dict[str, object] = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "sqlite": sqlite3.sqlite_version,
        "dir": path,
    }
    try:
        st = os.statvfs(path)
        info["free_gb"] = round(st.f_bavail * st.f_frsize / 1e9, 1)
    except OSError:
        pass
    fs = None
    try:
        out = subprocess.run(["df", "-PT", path], capture_output=True, text=True, timeout=5).stdout.splitlines()
        if len(out) >= 2:
            cols = out[1].split()
            fs = {"device": cols[0], "type": cols[1], "mount": cols[-1]}
    except (OSError, subprocess.SubprocessError):
        pass
    if fs is None:  # fall back on the longest mount point that holds the path
        try:
            best = ("", "", "")
            real = os.path.realpath(path)
            with open("/proc/mounts") as f:
                for line in f:
                    dev, mnt, typ = line.split()[:3]
                    if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best[1]):
                        best = (dev, mnt, typ)
            if best[1]:
                fs = {"device": best[0], "type": best[2], "mount": best[1]}
        except OSError:
            pass
    info["filesystem"] = fs
    return info


def median_of(samples: List[Dict[str, float]], field: str) -> float:
    return statistics.median(s[field] for s in samples)


def paired_ratio(samples: Dict[str, List[Dict[str, float]]], key: str, ref: str, field: str, ref_field: str) -> float:
    """Median over the rounds of (this round's figure / this round's reference)."""
    return statistics.median(a[field] / b[ref_field] for a, b in zip(samples[key], samples[ref]))


def spread(samples: List[Dict[str, float]], field: str) -> float:
    """(max - min) / median, a rough noise gauge."""
    values = [s[field] for s in samples]
    return (max(values) - min(values)) / statistics.median(values)


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def fmt_ratio(x: float) -> str:
    return f"{x:.3f}x" if x < 10 else f"{x:.1f}x"
