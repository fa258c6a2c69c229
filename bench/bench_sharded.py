"""Throughput and latency of the sharded layer (ShardedWal, 16 shards), as ratios to references
measured in the same run.

    .venv/bin/python bench/bench_sharded.py [--quick] [--json] [--dir DIR]
    .venv/bin/python bench/bench_sharded.py --profile 300000   # cProfile of one ASYNC producer

Every figure and every reference is measured ``--repeats`` times (5, or 3 with --quick),
round-robin: each round runs all of them once, in an order rotated from round to round, so
that noise on a shared machine hits them alike. Reported: the median over the rounds, and the
median of the per-round ratios to a reference measured in the same round.

Each figure runs on a fresh ShardedWal (16 shards, default ring size and worker count) in a
fresh directory, started by this process; producers are separate processes (this script run
with --producer) that connect() to it, prepare their keys and values, say "ready", and start
together on "go". They report their own counts and clocks (CLOCK_MONOTONIC, shared by all
processes), so a figure is total entries over the span from the first start to the last end.
Opening, connecting and closing are outside the timed region. 100-byte random
(incompressible) values; keys from 100,000 users, a different sample per producer and thread.

Figures:
  ASYNC Np xB    N producer processes (1, 2), each calling append (B=1) or
                 append_batch_for_key with B values (100, 1000) for the time budget.
                 "acknowledged": entries / the append loop; "durable": entries / (the loop +
                 a final sync()). The aims apply to the acknowledged rate.
  STRICT 16t     16 threads in one producer process, each appending one entry at a time.
  STRICT 4px4t   4 producer processes x 4 threads, the same.
  checkpoint     median latency of create_checkpoint (``--checkpoints`` calls, 20 ms apart) on
                 an ASYNC WAL while one producer appends a light load (10,000 entries/s).

References:
  F  one process framing each 100-byte record (the engine's 32-byte header with its CRC32)
     and os.write-ing it to one O_APPEND file: the best a single process does without this layer
  P  16 threads, each doing os.write + fdatasync of 100 bytes on its own file: the disk's
     limit for 16 concurrent durable appenders (total calls/s)
  S  one os.write + fdatasync of 100 bytes (median latency of one call)
  B  a burst: 100 bytes written to each of 16 files, then all 16 fdatasynced at once from a pool
     of 16 threads (median latency of the burst): what a checkpoint would pay, with per-file
     fdatasyncs, when every shard has unsynced entries at its cut (before its own record's fsync
     and HEAD's rename)
  G  the same burst made durable by one syncfs(2): what it pays with the default group sync

Aims (each a ratio in the same run): ASYNC 1p x1 acknowledged >= 1.5x F; ASYNC 1p x1000
acknowledged >= 4x F; STRICT with 16 appenders (both layouts) >= 0.8x P; checkpoint <= 8x S.

"Where the time goes" (per figure, medians): CPU per entry of the producers and of the WAL's
own processes (coordinator + workers), and how long their threads waited for a CPU (run queue,
from /proc/PID/task/*/schedstat) -- on a shared machine, the second says how much of a figure
is other people's load; the share of the producers' loop they spent on a CPU; entries per
frame and per fsync and the mean length of a worker's fsync pass (from stats()); for ASYNC,
"CPU vs F": F's CPU per record over the producers' CPU per entry, the ratio the figure would
have if F and each producer had a CPU to themselves.

Diagnosis: --only KEY,... runs some measurements and prints their raw samples as JSON;
--verbose prints each measurement's wall time; --profile N runs cProfile in one producer.

This is a measurement, not a test: a missed aim is reported, not failed. The exit status is 2
only if a process or an IPC object of a benchmark WAL was left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
import time
import zlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from _common import (  # bench/_common.py: helpers shared with bench_engine.py
    add_common_arguments,
    ENTRY_SIZE,
    OPEN_FLAGS,
    Config,
    fdatasync,
    fmt_rate,
    fmt_ratio,
    machine_info,
    measure,
    round_robin,
    scratch_dir,
    spread,
)
from ironwal_mp import CompressionType, ShardedWal, SyncMode, WalClosedError, WalOptions
from ironwal_mp.engine.frame import CRC_FIELDS, HEADER, MAGIC
from ironwal_mp.engine.group_sync import syncfs
from ironwal_mp.ipc.names import Names, processes_of

SHARDS = 16
USERS = 100_000
POOL_SIZE = 1000
KEYS_PER_PRODUCER = 50_000
CHUNK_ENTRIES = 1000  # a producer looks at the clock once per this many entries
ASYNC_BATCHES = (1, 100, 1000)
ASYNC_PRODUCERS = (1, 2)
P_THREADS = 16
LOAD_RATE = 10_000  # entries/s of the light load under the checkpoint figure
CHECKPOINT_GAP_S = 0.02
STARTUP_TIMEOUT_S = 60.0

HERE = os.path.dirname(os.path.abspath(__file__))


# =================================================================================================
# producer side (this file run with --producer SPEC): connects, waits for "go", appends, reports
# =================================================================================================


def _say(obj: Any) -> None:
    sys.stdout.write((obj if isinstance(obj, str) else json.dumps(obj)) + "\n")
    sys.stdout.flush()


def sched(pid: int) -> Tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of all threads of ``pid``, from
    /proc/PID/task/*/schedstat (0, 0 where that is not available)."""
    run = wait = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0, 0.0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as fh:
                a, b = fh.read().split()[:2]
            run += int(a)
            wait += int(b)
        except (OSError, ValueError):
            continue
    return run / 1e9, wait / 1e9


def _thread_sched() -> Tuple[float, float]:
    """sched() of the calling thread only."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/schedstat", "rb") as fh:
            a, b = fh.read().split()[:2]
        return int(a) / 1e9, int(b) / 1e9
    except (OSError, ValueError):
        return 0.0, 0.0


def _keys(seed: int, n: int) -> List[bytes]:
    rng = random.Random(seed)
    return [b"user-%07d" % u for u in rng.sample(range(USERS), min(n, USERS))]


def producer_main(spec: Dict[str, Any]) -> int:
    from ironwal_mp import connect

    mode = SyncMode[spec["mode"]]
    threads, batch, seed = spec["threads"], spec["batch"], spec["seed"]
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    parent = os.getppid()
    while True:  # started beside the WAL, to overlap interpreter start-ups: wait until it is up
        try:
            wal = connect(spec["root"], sync_mode=mode)
            break
        except WalClosedError:
            if time.monotonic() > deadline or os.getppid() != parent:
                raise
            time.sleep(0.01)
    try:
        rng = random.Random(seed)
        pool = [rng.randbytes(ENTRY_SIZE) for _ in range(POOL_SIZE)]
        if spec.get("profile"):
            return _produce_profiled(wal, pool, seed, spec["profile"])
        if spec.get("rate"):
            return _produce_load(wal, pool, seed, spec["rate"])
        if threads > 1 or mode is SyncMode.STRICT:
            return _produce_threads(wal, pool, seed, threads, spec["budget"])
        return _produce_loop(wal, pool, seed, batch, spec["budget"])
    finally:
        wal.close()


def _wait_go() -> bool:
    _say("ready")
    return sys.stdin.readline().strip() == "go"


def _produce_loop(wal: ShardedWal, pool: List[bytes], seed: int, batch: int, budget: float) -> int:
    """One thread, ASYNC: single appends or batches for one key, for ``budget`` seconds."""
    keys = _keys(seed, KEYS_PER_PRODUCER)
    if batch == 1:
        pairs = [(k, pool[i % POOL_SIZE]) for i, k in enumerate(keys)]
        chunks = [pairs[i : i + CHUNK_ENTRIES] for i in range(0, len(pairs), CHUNK_ENTRIES)]
        append = wal.append

        def run_chunk(chunk: List[Tuple[bytes, bytes]]) -> None:
            for k, v in chunk:
                append(k, v)

    else:
        value_lists = [[pool[(s + j) % POOL_SIZE] for j in range(batch)] for s in range(0, POOL_SIZE, 100)]
        calls = [(k, value_lists[i % len(value_lists)]) for i, k in enumerate(keys[:5000])]
        per = max(1, CHUNK_ENTRIES // batch)
        chunks = [calls[i : i + per] for i in range(0, len(calls) - per + 1, per)]
        append_batch = wal.append_batch_for_key

        def run_chunk(chunk: List[Tuple[bytes, List[bytes]]]) -> None:
            for k, vs in chunk:
                append_batch(k, vs)

    entries_per_chunk = len(chunks[0]) * batch
    run_chunk(chunks[0])  # warm-up (untimed)
    if not _wait_go():
        return 1
    gc.collect()
    gc.disable()
    now, me = time.monotonic, os.getpid()
    n = 0
    c0 = sched(me)
    t0 = now()
    deadline = t0 + budget
    done = False
    while not done:
        for chunk in chunks:
            run_chunk(chunk)
            n += entries_per_chunk
            if now() >= deadline:
                done = True
                break
    t1 = now()
    c1 = sched(me)
    gc.enable()
    wal.sync()
    t2 = now()
    _say({"entries": n, "t0": t0, "t_loop": t1, "t_sync": t2, "cpu_s": c1[0] - c0[0], "runq_s": c1[1] - c0[1]})
    return 0


def _produce_threads(wal: ShardedWal, pool: List[bytes], seed: int, threads: int, budget: float) -> int:
    """``threads`` threads, each appending one entry at a time until told to stop."""
    keys = [_keys(seed * 100 + t, 2000) for t in range(threads)]
    counts = [0] * threads
    cpu = [(0.0, 0.0)] * threads
    errors: List[BaseException] = []
    stop = [False]
    go = threading.Event()
    append = wal.append

    def run(t: int) -> None:
        ks = keys[t]
        nk = len(ks)
        n = 0
        go.wait()
        c0 = _thread_sched()
        try:
            while not stop[0]:
                append(ks[n % nk], pool[n % POOL_SIZE])
                n += 1
        except BaseException as exc:  # reported, not swallowed
            errors.append(exc)
        c1 = _thread_sched()
        counts[t] = n
        cpu[t] = (c1[0] - c0[0], c1[1] - c0[1])

    append(keys[0][0], pool[0])  # warm-up (untimed)
    workers = [threading.Thread(target=run, args=(t,), daemon=True) for t in range(threads)]
    for w in workers:
        w.start()
    if not _wait_go():
        stop[0] = True
        go.set()
        return 1
    t0 = time.monotonic()
    go.set()
    time.sleep(budget)
    stop[0] = True
    for w in workers:
        w.join()
    t1 = time.monotonic()
    if errors:
        raise errors[0]
    n = sum(counts)
    _say({"entries": n, "t0": t0, "t_loop": t1, "t_sync": t1, "cpu_s": sum(c[0] for c in cpu),
          "runq_s": sum(c[1] for c in cpu), "per_thread": counts})
    return 0


def _produce_load(wal: ShardedWal, pool: List[bytes], seed: int, rate: int) -> int:
    """A steady light load of single appends (``rate`` per second) until "stop" on stdin."""
    keys = _keys(seed, KEYS_PER_PRODUCER)
    stop = [False]
    append = wal.append
    if not _wait_go():
        return 1

    def watch() -> None:
        sys.stdin.readline()  # "stop" (or EOF: the benchmark is gone)
        stop[0] = True

    threading.Thread(target=watch, daemon=True).start()
    tick = 0.001
    per_tick = max(1, int(rate * tick))
    n = 0
    t0 = time.monotonic()
    next_t = t0
    while not stop[0]:
        for _ in range(per_tick):
            append(keys[n % KEYS_PER_PRODUCER], pool[n % POOL_SIZE])
            n += 1
        next_t += tick
        delay = next_t - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    t1 = time.monotonic()
    _say({"entries": n, "t0": t0, "t_loop": t1, "t_sync": t1, "cpu_s": 0.0, "runq_s": 0.0})
    return 0


def _produce_profiled(wal: ShardedWal, pool: List[bytes], seed: int, n: int) -> int:
    import cProfile
    import io
    import pstats

    keys = _keys(seed, KEYS_PER_PRODUCER)
    append = wal.append
    for i in range(1000):  # warm-up
        append(keys[i], pool[i % POOL_SIZE])
    if not _wait_go():
        return 1
    prof = cProfile.Profile()
    t0 = time.monotonic()
    prof.enable()
    for i in range(n):
        append(keys[i % KEYS_PER_PRODUCER], pool[i % POOL_SIZE])
    prof.disable()
    t1 = time.monotonic()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).strip_dirs().sort_stats("tottime").print_stats(15)
    _say({"entries": n, "t0": t0, "t_loop": t1, "t_sync": t1, "cpu_s": 0.0, "runq_s": 0.0, "profile": out.getvalue()})
    return 0


# =================================================================================================
# benchmark side: the WAL under test, its producers, the references
# =================================================================================================


class Producer:
    """One producer process, spoken to line by line over its stdin/stdout."""

    def __init__(self, spec: Dict[str, Any]) -> None:
        cmd = [sys.executable, os.path.abspath(__file__), "--producer", json.dumps(spec)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        self._buf = b""

    def read_line(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"producer {self.proc.pid} said nothing in {timeout:.0f}s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError(f"producer {self.proc.pid} exited (status {self.proc.wait()})")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def send(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]

    def result(self, timeout: float) -> Dict[str, Any]:
        return json.loads(self.read_line(timeout))

    def kill(self) -> None:
        """Kill this producer (and only it)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def finish(self) -> None:
        """Wait for a clean exit; kill this producer (and only it) if it does not exit."""
        try:
            self.proc.stdin.close()  # type: ignore[union-attr]
        except OSError:
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()  # type: ignore[union-attr]


class Bench:
    def __init__(self, scratch: str, compression: CompressionType, budget: float, ref_budget: float,
                 checkpoints: int, workers: Optional[int]) -> None:
        self.scratch = scratch
        self.compression = compression
        self.budget = budget
        self.ref_budget = ref_budget
        self.checkpoints = checkpoints
        self.workers = workers
        self.roots: List[str] = []  # every WAL root used, for the leftover check
        self.seed = 0
        rng = random.Random(1)
        self.pool = [rng.randbytes(ENTRY_SIZE) for _ in range(POOL_SIZE)]

    # --- the WAL under test and its producers -------------------------------------------------

    @contextlib.contextmanager
    def fresh_wal(self, mode: SyncMode, producers: List[Dict[str, Any]]) -> Iterator[Tuple[ShardedWal, List[Producer]]]:
        """A new WAL in a new directory, with its producers (each the keyword arguments of a
        spec) ready to go; afterwards the producers are finished, the WAL closed, the directory
        deleted. The producers start first and connect once the WAL is up."""
        d = tempfile.mkdtemp(prefix=f"wal-{mode.name.lower()}-", dir=self.scratch)
        root = os.path.join(d, "wal")
        self.roots.append(root)
        procs: List[Producer] = []
        wal: Optional[ShardedWal] = None
        try:
            procs = [Producer(self._spec(root, mode, **kw)) for kw in producers]
            try:
                wal = ShardedWal(WalOptions(root_path=root, sync_mode=mode, compression=self.compression), SHARDS,
                                 workers=self.workers)
            except BaseException:
                for p in procs:
                    p.kill()
                clean_root(root)  # a coordinator killed while starting leaves its IPC objects
                raise
            for p in procs:
                if p.read_line(STARTUP_TIMEOUT_S) != "ready":
                    raise RuntimeError("producer did not get ready")
            yield wal, procs
        finally:
            for p in procs:
                p.finish()
            if wal is not None:
                wal.close()
            shutil.rmtree(d, ignore_errors=True)

    def _spec(self, root: str, mode: SyncMode, **kw: Any) -> Dict[str, Any]:
        self.seed += 1
        spec = {"root": root, "mode": mode.name, "threads": 1, "batch": 1, "budget": self.budget,
                "seed": self.seed, "rate": 0, "profile": 0}
        spec.update(kw)
        return spec

    def run_load(self, mode: SyncMode, procs: int, threads: int, batch: int) -> Dict[str, float]:
        """One figure: ``procs`` producers on a fresh WAL; totals over the common span."""
        with self.fresh_wal(mode, [dict(threads=threads, batch=batch)] * procs) as (wal, producers):
            stats0 = wal.stats()
            service = [stats0["coordinator_pid"], *stats0["worker_pids"]]
            svc0 = [sched(pid) for pid in service]
            for p in producers:
                p.send("go")
            results = [p.result(self.budget * 4 + 60) for p in producers]
            svc1 = [sched(pid) for pid in service]
            stats1 = wal.stats()
        n = sum(r["entries"] for r in results)
        t0 = min(r["t0"] for r in results)
        loop = max(r["t_loop"] for r in results) - t0
        durable = max(r["t_sync"] for r in results) - t0

        def total(field: str) -> int:
            return sum(s[field] for s in stats1["shards"]) - sum(s[field] for s in stats0["shards"])

        frames, fsyncs = total("frames"), total("fsyncs")
        fsync_us = sum(x["fsync_avg_us"] * x["fsyncs"] for x in stats1["shards"]) - sum(
            x["fsync_avg_us"] * x["fsyncs"] for x in stats0["shards"])
        svc_cpu = sum(b[0] - a[0] for a, b in zip(svc0, svc1))
        svc_runq = sum(b[1] - a[1] for a, b in zip(svc0, svc1))
        return {
            "entries": n,
            "seconds": loop,
            "acked_per_s": n / loop,
            "durable_per_s": n / durable,
            "sync_s": durable - loop,
            "producer_cpu_us": sum(r["cpu_s"] for r in results) / n * 1e6,
            "producer_runq_us": sum(r["runq_s"] for r in results) / n * 1e6,
            "producer_cpu_share": sum(r["cpu_s"] for r in results) / sum(r["t_loop"] - r["t0"] for r in results),
            "service_cpu_us": svc_cpu / n * 1e6,
            "service_runq_us": svc_runq / n * 1e6,
            "service_cpu_s": svc_cpu,
            "sync_call_us": fsync_us / fsyncs if fsyncs else 0.0,
            "entries_per_frame": total("entries") / frames if frames else 0.0,
            "fsyncs": fsyncs,
            "entries_per_fsync": n / fsyncs if fsyncs else 0.0,
            "per_producer_per_s": [r["entries"] / (r["t_loop"] - r["t0"]) for r in results],
        }

    def run_checkpoints(self) -> Dict[str, float]:
        with self.fresh_wal(SyncMode.ASYNC, [dict(rate=LOAD_RATE, budget=0)]) as (wal, (load,)):
            load.send("go")
            time.sleep(0.2)
            latencies = []
            perf = time.perf_counter
            for i in range(self.checkpoints):
                time.sleep(CHECKPOINT_GAP_S)
                t = perf()
                wal.create_checkpoint(b"bench-%04d" % i)
                latencies.append(perf() - t)
            load.send("stop")
            res = load.result(60)
        return {
            "median_s": statistics.median(latencies),
            "min_s": min(latencies),
            "max_s": max(latencies),
            "latencies_s": latencies,
            "load_per_s": res["entries"] / (res["t_loop"] - res["t0"]),
        }

    # --- references ---------------------------------------------------------------------------

    def ref_frame_write(self) -> Dict[str, float]:
        """F: frame each 100-byte record (32-byte header with CRC32) and os.write it."""
        items = self.pool

        def setup(d: str):
            fd = os.open(os.path.join(d, "frames.dat"), OPEN_FLAGS, 0o644)
            os.fsync(fd)
            pack, fields, crc, write = HEADER.pack, CRC_FIELDS.pack, zlib.crc32, os.write
            state = [0]

            def chunk() -> None:
                seq = state[0]
                for p in items:
                    n = len(p)
                    write(fd, pack(MAGIC, crc(p, crc(fields(seq, 1, 0, n))), seq, 1, 0, n, n) + p)
                    seq += 1
                state[0] = seq

            def teardown() -> None:
                try:
                    fdatasync(fd)
                finally:
                    os.close(fd)

            return chunk, teardown

        cfg = Config("ref:F", "F", 1, len(items), 10_000_000, setup)
        return measure(cfg, self.scratch, self.ref_budget)

    def ref_parallel_fsync(self) -> Dict[str, float]:
        """P: 16 threads, each os.write + fdatasync of 100 bytes on its own file."""
        d = tempfile.mkdtemp(prefix="ref_P-", dir=self.scratch)
        fds = []
        try:
            for i in range(P_THREADS):
                fd = os.open(os.path.join(d, f"f{i:02d}.dat"), OPEN_FLAGS, 0o644)
                fds.append(fd)
                os.write(fd, self.pool[i])
                os.fsync(fd)
            counts = [0] * P_THREADS
            stop = [False]
            go = threading.Event()

            def run(i: int) -> None:
                fd, buf, write = fds[i], self.pool[i], os.write
                n = 0
                go.wait()
                while not stop[0]:
                    write(fd, buf)
                    fdatasync(fd)
                    n += 1
                counts[i] = n

            threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(P_THREADS)]
            for t in threads:
                t.start()
            t0 = time.perf_counter()
            go.set()
            time.sleep(self.budget)
            stop[0] = True
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - t0
        finally:
            for fd in fds:
                os.close(fd)
            shutil.rmtree(d, ignore_errors=True)
        n = sum(counts)
        return {"ops": n, "seconds": elapsed, "ops_per_s": n / elapsed}

    def ref_single_fsync(self) -> Dict[str, float]:
        """S: one os.write + fdatasync of 100 bytes; per-call latencies."""
        d = tempfile.mkdtemp(prefix="ref_S-", dir=self.scratch)
        try:
            fd = os.open(os.path.join(d, "one.dat"), OPEN_FLAGS, 0o644)
            try:
                os.write(fd, self.pool[0])
                os.fsync(fd)
                perf, write, buf = time.perf_counter, os.write, self.pool[1]
                lat = []
                for _ in range(5):  # warm-up
                    write(fd, buf)
                    fdatasync(fd)
                start = perf()
                deadline = start + self.ref_budget
                while True:
                    t = perf()
                    write(fd, buf)
                    fdatasync(fd)
                    t1 = perf()
                    lat.append(t1 - t)
                    if t1 >= deadline:
                        break
            finally:
                os.close(fd)
        finally:
            shutil.rmtree(d, ignore_errors=True)
        return {"ops": len(lat), "median_s": statistics.median(lat), "mean_s": (t1 - start) / len(lat)}

    def ref_burst_fsync(self) -> Dict[str, float]:
        """B: write 100 bytes to each of 16 files, then fdatasync all 16 at once; per-burst latencies."""
        return self._burst(lambda pool, fds: list(pool.map(fdatasync, fds)))

    def ref_burst_syncfs(self) -> Dict[str, float]:
        """G: the same burst made durable by one syncfs of the filesystem (group sync's way)."""
        return self._burst(lambda pool, fds: syncfs(fds[0]))

    def _burst(self, sync_all: Callable[[ThreadPoolExecutor, List[int]], object]) -> Dict[str, float]:
        d = tempfile.mkdtemp(prefix="ref_B-", dir=self.scratch)
        fds: List[int] = []
        try:
            with ThreadPoolExecutor(max_workers=SHARDS) as pool:
                for i in range(SHARDS):
                    fd = os.open(os.path.join(d, f"b{i:02d}.dat"), OPEN_FLAGS, 0o644)
                    fds.append(fd)
                    os.write(fd, self.pool[i])
                    os.fsync(fd)
                perf, write = time.perf_counter, os.write
                lat = []
                deadline = perf() + self.ref_budget
                while True:
                    for i, fd in enumerate(fds):
                        write(fd, self.pool[i])
                    t = perf()
                    sync_all(pool, fds)
                    t1 = perf()
                    lat.append(t1 - t)
                    if t1 >= deadline and len(lat) >= 20:
                        break
        finally:
            for fd in fds:
                os.close(fd)
            shutil.rmtree(d, ignore_errors=True)
        return {"ops": len(lat), "median_s": statistics.median(lat)}

    # --- the schedule -------------------------------------------------------------------------

    def jobs(self) -> Dict[str, Tuple[str, Callable[[], Dict[str, float]]]]:
        out: Dict[str, Tuple[str, Callable[[], Dict[str, float]]]] = {
            "ref:F": ("F  frame + os.write, 1 process", self.ref_frame_write),
            "ref:P": (f"P  {P_THREADS} threads x (write + fdatasync)", self.ref_parallel_fsync),
            "ref:S": ("S  write + fdatasync", self.ref_single_fsync),
            "ref:B": (f"B  burst: {SHARDS} files fdatasynced at once", self.ref_burst_fsync),
            "ref:G": (f"G  burst: {SHARDS} files, one syncfs", self.ref_burst_syncfs),
        }
        for procs in ASYNC_PRODUCERS:
            for batch in ASYNC_BATCHES:
                out[f"async:{procs}p:{batch}"] = (
                    f"ASYNC {procs} producer{'s' if procs > 1 else ''} x{batch}",
                    lambda procs=procs, batch=batch: self.run_load(SyncMode.ASYNC, procs, 1, batch),
                )
        out["strict:1x16"] = ("STRICT 16 threads, 1 process", lambda: self.run_load(SyncMode.STRICT, 1, 16, 1))
        out["strict:4x4"] = ("STRICT 4 processes x 4 threads", lambda: self.run_load(SyncMode.STRICT, 4, 4, 1))
        out["checkpoint"] = (f"checkpoint, {SHARDS} shards, light load", self.run_checkpoints)
        return out


# =================================================================================================
# analysis and report
# =================================================================================================

# (figure key, field, label suffix, reference key, reference field, aim: (op, value) or None)
ROWS: List[Tuple[str, str, str, str, str, Optional[Tuple[str, float]]]] = []
for _p in ASYNC_PRODUCERS:
    for _b in ASYNC_BATCHES:
        _aim = (">=", 1.5) if (_p, _b) == (1, 1) else (">=", 4.0) if (_p, _b) == (1, 1000) else None
        ROWS.append((f"async:{_p}p:{_b}", "acked_per_s", "acknowledged", "ref:F", "entries_per_s", _aim))
        ROWS.append((f"async:{_p}p:{_b}", "durable_per_s", "durable", "ref:F", "entries_per_s", None))
ROWS.append(("strict:1x16", "acked_per_s", "appends/s", "ref:P", "ops_per_s", (">=", 0.8)))
ROWS.append(("strict:4x4", "acked_per_s", "appends/s", "ref:P", "ops_per_s", (">=", 0.8)))
ROWS.append(("checkpoint", "median_s", "latency", "ref:S", "median_s", ("<=", 8.0)))
ROWS.append(("checkpoint", "median_s", "latency", "ref:B", "median_s", None))
ROWS.append(("checkpoint", "median_s", "latency", "ref:G", "median_s", None))

REF_FIELD = {"ref:F": "entries_per_s", "ref:P": "ops_per_s", "ref:S": "median_s", "ref:B": "median_s",
             "ref:G": "median_s"}


def analyse(labels: Dict[str, str], samples: Dict[str, List[Dict[str, Any]]]) -> Dict[str, Any]:
    refs = {}
    for key, field in REF_FIELD.items():
        s = samples[key]
        refs[key] = {"label": labels[key], "field": field, "median": statistics.median(x[field] for x in s),
                     "spread": spread(s, field), "values": [x[field] for x in s]}
    refs["ref:S"]["median_mean_s"] = statistics.median(x["mean_s"] for x in samples["ref:S"])
    f = samples["ref:F"]
    refs["ref:F"]["cpu_us"] = statistics.median(x["cpu_s"] / x["ops"] * 1e6 for x in f)
    refs["ref:F"]["cpu_share"] = statistics.median(x["cpu_s"] / x["seconds"] for x in f)
    rows = []
    for key, field, what, ref, ref_field, aim in ROWS:
        s = samples[key]
        ratio = statistics.median(a[field] / b[ref_field] for a, b in zip(s, samples[ref]))
        row: Dict[str, Any] = {
            "figure": key, "label": f"{labels[key]} {what}".strip(), "field": field,
            "median": statistics.median(x[field] for x in s), "spread": spread(s, field),
            "values": [x[field] for x in s], "reference": ref, "ratio": ratio,
        }
        if aim is not None:
            op, value = aim
            row["aim"] = f"{op} {value:g}x"
            row["met"] = ratio >= value if op == ">=" else ratio <= value
        rows.append(row)
    details = {}
    for key, s in samples.items():
        if key.startswith(("async:", "strict:")):
            details[key] = {f: statistics.median(x[f] for x in s) for f in (
                "producer_cpu_us", "producer_runq_us", "producer_cpu_share", "service_cpu_us", "service_runq_us",
                "entries_per_frame", "entries_per_fsync", "sync_call_us", "sync_s", "entries")}
            details[key]["per_producer_per_s"] = [statistics.median(v) for v in zip(*(x["per_producer_per_s"] for x in s))]
            if key.startswith("async:") and all(x["producer_cpu_us"] > 0 for x in s):
                # F's CPU per record / the producers' CPU per entry, per round: the acknowledged ratio
                # each would reach with a CPU of its own (noise on a shared machine mostly cancels)
                details[key]["cpu_ratio_vs_F"] = statistics.median(
                    (b["cpu_s"] / b["ops"]) / (a["producer_cpu_us"] / 1e6) * int(key.split(":")[1][:-1])
                    for a, b in zip(s, samples["ref:F"]))
        elif key == "checkpoint":
            details[key] = {"min_ms": min(x["min_s"] for x in s) * 1e3, "max_ms": max(x["max_s"] for x in s) * 1e3,
                            "load_per_s": statistics.median(x["load_per_s"] for x in s),
                            # every shard dirty at the cut: a burst (one syncfs, the default group sync),
                            # then one sync for the record, HEAD and its rename together (at least an S)
                            "floor_ms": statistics.median(g["median_s"] + s1["median_s"] for g, s1 in
                                                          zip(samples["ref:G"], samples["ref:S"])) * 1e3}
    return {"references": refs, "figures": rows, "details": details}


def _fmt_value(field: str, v: float) -> str:
    return f"{v * 1e3:.2f} ms" if field.endswith("_s") and not field.endswith("per_s") else f"{fmt_rate(v)} /s"


def print_report(info: Dict[str, Any], settings: Dict[str, Any], result: Dict[str, Any]) -> None:
    refs, rows, details = result["references"], result["figures"], result["details"]
    fs = info.get("filesystem") or {}
    print(f"ironwal_mp sharded benchmark: ShardedWal, {SHARDS} shards, {ENTRY_SIZE}-byte values, "
          f"keys over {USERS:,} users")
    print(f"machine: {info['cpu_count']} CPUs ({info['cpus_usable']} usable), {info['implementation']} "
          f"{info['python']}, {info['platform']}")
    print(f"code: {info.get('code', '?')}   load average (1 min) before/after the run: "
          f"{settings['loadavg'][0]:.2f} / {settings['loadavg'][1]:.2f}")
    print(f"dir: {info['dir']}  filesystem: {fs.get('type', '?')} on {fs.get('device', '?')} "
          f"(mount {fs.get('mount', '?')}), {info.get('free_gb', '?')} GB free")
    print(f"run: {settings['repeats']} rounds, round-robin, {settings['budget_s']} s per load, "
          f"{settings['ref_budget_s']} s per F/S/B/G reference, {settings['checkpoints']} checkpoints per round, "
          f"compression={settings['compression']}, workers={settings['workers'] or 'default'}; "
          "figures are medians, ratios are medians of per-round ratios; spread = (max-min)/median")
    print()
    print("References")
    for key, r in refs.items():
        extra = f"   (mean {r['median_mean_s'] * 1e3:.3f} ms)" if key == "ref:S" else ""
        if key == "ref:F":
            extra = f"   ({r['cpu_us']:.2f} us CPU per record, on a CPU {r['cpu_share']:.0%} of its loop)"
        value = f"{r['median'] * 1e3:.3f} ms" if key in ("ref:S", "ref:B", "ref:G") else f"{fmt_rate(r['median'])} /s"
        print(f"  {r['label']:<40} {value:>14}  spread {r['spread']:>4.0%}{extra}")
    print()
    w = 48
    print(f"  {'figure':<{w}} {'median':>14} {'ref':>4} {'ratio':>9}  {'aim':<8} {'result':<7} {'spread':>6}")
    for row in rows:
        ref = row["reference"].split(":")[1]
        aim = row.get("aim", "-")
        met = "-" if "met" not in row else ("met" if row["met"] else "NOT MET")
        print(f"  {row['label']:<{w}} {_fmt_value(row['field'], row['median']):>14} {ref:>4} "
              f"{fmt_ratio(row['ratio']):>9}  {aim:<8} {met:<7} {row['spread']:>5.0%}")
    print()
    print("Where the time goes (medians; us per entry unless said): producers' CPU, their wait for a CPU (run queue),")
    print("their share of the loop spent on a CPU; the same for the WAL's processes (coordinator + workers);")
    print("entries per frame and per fsync; mean duration of a worker's fsync pass (sync() over its due shards);")
    print("CPU vs F: F's CPU per record / the producers' CPU per entry (x producers): the acknowledged ratio if")
    print("each producer and F had a CPU of their own, i.e. with the machine's other load taken out")
    print(f"  {'figure':<14} {'prod CPU':>9} {'prod runq':>9} {'on CPU':>7} {'WAL CPU':>9} {'WAL runq':>9} "
          f"{'ent/frame':>9} {'ent/fsync':>9} {'fsync pass':>10} {'sync()':>7} {'CPU vs F':>8}  per producer /s")
    for key, d in details.items():
        if key == "checkpoint":
            continue
        per = ", ".join(fmt_rate(x) for x in d["per_producer_per_s"])
        sync = f"{d['sync_s'] * 1e3:.0f} ms" if key.startswith("async") else "-"
        print(f"  {key:<14} {d['producer_cpu_us']:>9.2f} {d['producer_runq_us']:>9.2f} {d['producer_cpu_share']:>6.0%} "
              f"{d['service_cpu_us']:>9.2f} {d['service_runq_us']:>9.2f} {d['entries_per_frame']:>9.1f} "
              f"{d['entries_per_fsync']:>9.1f} {d['sync_call_us'] / 1e3:>7.2f} ms {sync:>7} "
              f"{fmt_ratio(d['cpu_ratio_vs_F']) if 'cpu_ratio_vs_F' in d else '-':>8}  {per}")
    c = details.get("checkpoint")
    if c:
        print(f"  checkpoint: fastest {c['min_ms']:.2f} ms, slowest {c['max_ms']:.2f} ms over all rounds, "
              f"under a load of {fmt_rate(c['load_per_s'])} appends/s; with every shard unsynced at the cut "
              f"the disk alone needs at least G + S = {c['floor_ms']:.2f} ms")


# =================================================================================================
# leftovers, profile mode, main
# =================================================================================================


def leftovers(roots: List[str]) -> List[str]:
    """IPC objects and live processes that belong to any of the benchmark's WAL roots."""
    found: List[str] = []
    for root in roots:
        found += Names(root).leftovers()
    seen = set()
    for root in roots:
        for pid, cmd in processes_of(root, roles=None):
            if pid not in seen:
                seen.add(pid)
                found.append(f"process {pid}: {cmd[:120]}")
    return found


def _root_pids(root: str) -> List[int]:
    return [int(x.split()[1].rstrip(":")) for x in leftovers([root]) if x.startswith("process ")]


def clean_root(root: str, timeout: float = 10.0) -> None:
    """Remove what a benchmark WAL left: wait for its processes (all started by this benchmark)
    to exit, kill those that do not, by pid, then unlink its IPC objects."""
    deadline = time.monotonic() + timeout
    while _root_pids(root) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in _root_pids(root):
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    Names(root).remove_all()


def wait_leftovers(roots: List[str], timeout: float = 10.0) -> List[str]:
    deadline = time.monotonic() + timeout
    while True:
        found = leftovers(roots)
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def timed(key: str, job: Callable[[], Dict[str, float]], verbose: bool) -> Dict[str, float]:
    t0 = time.perf_counter()
    out = job()
    if verbose:
        print(f"    {key:<16} {time.perf_counter() - t0:5.2f} s", file=sys.stderr, flush=True)
    return out


def code_version() -> str:
    """The commit measured, and whether the work tree differed from it."""
    try:
        out = subprocess.run(["git", "-C", HERE, "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def profile_producer(bench: Bench, n: int) -> None:
    with bench.fresh_wal(SyncMode.ASYNC, [dict(profile=n)]) as (_wal, (p,)):
        p.send("go")
        res = p.result(600)
    rate = res["entries"] / (res["t_loop"] - res["t0"])
    print(f"cProfile of one producer process: {n:,} ASYNC single appends of {ENTRY_SIZE} B to {SHARDS} shards "
          f"({fmt_rate(rate)}/s under the profiler); top 15 by tottime")
    print(res["profile"])


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(ap, "60 s", "seconds per load and for P (default 1.0, 0.4 with --quick)")
    ap.add_argument("--checkpoints", type=int, default=20, help="create_checkpoint calls per round (default 20)")
    ap.add_argument("--workers", type=int, default=None, help="worker processes (default: the library's, min(shards, CPUs))")
    ap.add_argument("--compression", choices=("lz4", "none"), default="lz4", help="compression (default: lz4, the library default)")
    ap.add_argument("--verbose", action="store_true", help="print each measurement's wall time to stderr")
    ap.add_argument("--only", default=None, help="comma-separated measurement keys (for diagnosis; aims need all)")
    ap.add_argument("--profile", type=int, metavar="N", default=None, help="only profile one producer's N ASYNC single appends")
    ap.add_argument("--producer", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.producer:
        return producer_main(json.loads(args.producer))

    repeats = args.repeats or (3 if args.quick else 5)
    budget = args.budget or (0.4 if args.quick else 1.0)
    ref_budget = budget / 2
    compression = CompressionType.LZ4 if args.compression == "lz4" else CompressionType.NONE

    bench: Optional[Bench] = None
    status = 0
    with scratch_dir(args.dir, HERE, "bench_sharded-") as scratch:
        try:
            bench = Bench(scratch, compression, budget, ref_budget, args.checkpoints, args.workers)
            if args.profile:
                profile_producer(bench, args.profile)
                return 0
            info = machine_info(scratch)
            info["code"] = code_version()
            jobs = bench.jobs()
            keys = list(jobs)
            if args.only:
                keys = [k for k in keys if k in args.only.split(",")]
            if not args.json:
                print(f"measuring {len(keys)} configurations x {repeats} rounds ...", file=sys.stderr, flush=True)
            load0 = os.getloadavg()[0]
            t0 = time.perf_counter()
            samples = round_robin(keys, repeats, lambda key: timed(key, jobs[key][1], args.verbose), progress=not args.json)
            wall = time.perf_counter() - t0
        finally:
            left = wait_leftovers(bench.roots) if bench is not None else []
            if left:
                print("LEFT BEHIND by the benchmark's WALs (now removed):\n  " + "\n  ".join(left), file=sys.stderr)
                for root in bench.roots:  # type: ignore[union-attr]
                    clean_root(root)
                status = 2
        settings = {"repeats": repeats, "budget_s": budget, "ref_budget_s": ref_budget, "checkpoints": args.checkpoints,
                    "compression": args.compression, "workers": args.workers, "shards": SHARDS,
                    "entry_size": ENTRY_SIZE, "wall_s": round(wall, 1),
                    "loadavg": [load0, os.getloadavg()[0]]}
        labels = {k: v[0] for k, v in jobs.items()}
        if any(k not in samples for k in [*REF_FIELD, *(r[0] for r in ROWS)]):  # --only: raw samples
            json.dump({"machine": info, "settings": settings, "samples": samples}, sys.stdout, indent=2)
            print()
            return status
        result = analyse(labels, samples)
        if args.json:
            json.dump({"machine": info, "settings": settings, **result, "samples": samples, "leftovers": left},
                      sys.stdout, indent=2)
            print()
        else:
            print_report(info, settings, result)
            print(f"\nleft behind (processes, /dev/shm and queue objects of the benchmark's WALs): "
                  f"{'none' if not left else len(left)}")
            print(f"(wall time {wall:.1f} s)")
    return status


if __name__ == "__main__":
    sys.exit(main())
