"""Helpers for tests/test_sharded.py and tests/test_sharded_model.py.

The functions here run in child processes started with multiprocessing's 'spawn' context (a
fresh interpreter imports this module by name; pytest puts tests/ on sys.path and spawn passes
sys.path on). They must stay importable without pytest fixtures.

A note on budgets: Linux accounts POSIX message queues per user against RLIMIT_MSGQUEUE
(819200 bytes by default), charging each queue its full capacity. A running WAL holds 2 + one
queue per worker, and every attached process that makes a control request one more (its reply
queue). With 8 KiB messages that allowed only nine queues per user in all; with the 1 KiB
messages used now about seventy (test_many_attached_processes holds that).
"""

from __future__ import annotations

import os
import time
import zlib
from typing import List, Optional, Tuple

from ironwal_mp import CheckpointExistsError, SyncMode, connect
from ironwal_mp.ipc.names import Names
from ironwal_mp.ipc.names import processes_of as processes_mentioning
from ironwal_mp.ipc.ring import pid_alive


# --- leak checks (the wal_root fixture's, for tests that make their own directories) ----------




def wait_gone(root: str, limit_s: float = 30.0) -> List[Tuple[int, str]]:
    """Wait (bounded) for every coordinator/worker of ``root`` to exit; return those left."""
    deadline = time.monotonic() + limit_s
    while processes_mentioning(root) and time.monotonic() < deadline:
        time.sleep(0.05)
    return processes_mentioning(root)


def cleanup_root(root: str) -> Tuple[List[Tuple[int, str]], List[str]]:
    """Kill what is left of ``root``'s WAL and remove its IPC objects; return (procs, objects)."""
    procs = wait_gone(root)
    leftovers = Names(root).leftovers()
    for pid, _ in procs:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    Names(root).remove_all()
    return procs, leftovers


def cmdline(pid: int) -> List[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        return [a.decode() for a in fh.read().split(b"\0") if a]


def alive(pid: int) -> bool:
    return pid_alive(pid)


# --- keys ------------------------------------------------------------------------------------


def key_for_shard(shard: int, n: int, tag: str = "k") -> bytes:
    """A key that routes to ``shard`` of ``n`` (crc32-v1)."""
    i = 0
    while True:
        key = f"{tag}-{shard}-{i}".encode()
        if zlib.crc32(key) % n == shard:
            return key
        i += 1


def chain_key(producer: int, i: int, avoid: int, n: int) -> bytes:
    """Key of entry ``i`` of a producer's chain: routes anywhere but shard ``avoid``."""
    j = 0
    while True:
        key = f"p{producer}-{i}-{j}".encode()
        if zlib.crc32(key) % n != avoid:
            return key
        j += 1


# --- child process bodies ------------------------------------------------------------------------


def child_routing(root: str, keys: List[bytes]) -> dict:
    """connect(); route ``keys`` and append each one; report what was seen."""
    with connect(root, sync_mode=SyncMode.STRICT) as wal:
        out = {
            "pid": os.getpid(),
            "shard_count": wal.shard_count,
            "shard_for": [wal.shard_for(k) for k in keys],
            "appends": [wal.append(k, b"child:" + k) for k in keys],
        }
        out["shards"] = [list(wal.iter_shard(s)) for s in range(wal.shard_count)]
        return out


def child_open(root: str, shard_count: int, mode: str) -> Tuple[str, str, tuple]:
    """Try to open (or start) the WAL with a given shard count; report the outcome."""
    from ironwal_mp import ShardedWal, WalOptions

    try:
        wal = ShardedWal(WalOptions(root_path=root, sync_mode=mode), shard_count)
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        extra = (getattr(exc, "expected", None), getattr(exc, "found", None))
        return type(exc).__name__, str(exc), extra
    try:
        return "opened", "", (wal.shard_count,)
    finally:
        wal.close()


def pool_task(wal, tag: int, count: int) -> List[Tuple[int, int, bytes]]:
    """Runs in a pool process with a *pickled* ShardedWal handle."""
    out = []
    for i in range(count):
        value = b"pool-%d-%d" % (tag, i)
        shard, seq = wal.append(b"key-%d-%d" % (tag, i), value)
        out.append((shard, seq, value))
    items = [(b"bkey-%d-%d" % (tag, i), b"pool-b-%d-%d" % (tag, i)) for i in range(count)]
    for (shard, seq), (_k, v) in zip(wal.append_batch(items), items):
        out.append((shard, seq, v))
    return out


def producer(root: str, mode: str, idx: int, rounds: int, out_q) -> None:
    """Mixed appends (single, batch, batch-for-key); send back every acknowledged entry."""
    acks: List[Tuple[int, int, bytes]] = []
    error: Optional[str] = None
    try:
        with connect(root, sync_mode=SyncMode(mode)) as wal:
            for r in range(rounds):
                kind = r % 3
                if kind == 0:
                    v = b"P%d-r%d-single" % (idx, r)
                    s, q = wal.append(b"P%d-%d" % (idx, r), v)
                    acks.append((s, q, v))
                elif kind == 1:
                    items = [(b"P%d-%d-%d" % (idx, r, j), b"P%d-r%d-b%d" % (idx, r, j)) for j in range(1 + r % 17)]
                    for (s, q), (_k, v) in zip(wal.append_batch(items), items):
                        acks.append((s, q, v))
                else:
                    values = [b"P%d-r%d-k%d" % (idx, r, j) for j in range(1 + r % 5)]
                    for (s, q), v in zip(wal.append_batch_for_key(b"P%d-key-%d" % (idx, r % 7), values), values):
                        acks.append((s, q, v))
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        error = f"{type(exc).__name__}: {exc}"
    out_q.put((idx, acks, error))


def chain_producer(root: str, mode: str, idx: int, n: int, stop, progress, out_q, max_len: int) -> None:
    """A causal chain: entry i is appended only after entry i-1 returned; consecutive entries go
    to different shards. ``progress.value`` is i+1 once entry i was acknowledged."""
    acks: List[Tuple[int, int]] = []
    error: Optional[str] = None
    try:
        with connect(root, sync_mode=SyncMode(mode)) as wal:
            prev = -1
            i = 0
            while i < max_len and not stop.is_set():
                s, q = wal.append(chain_key(idx, i, prev, n), b"chain:%d:%d" % (idx, i))
                acks.append((s, q))
                progress.value = i + 1
                prev = s
                i += 1
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        error = f"{type(exc).__name__}: {exc}"
    out_q.put((idx, acks, error))


def attached_then_append(root: str, ready, go, out_q) -> None:
    """Attach, say so, wait for ``go``, then try to append and report what happened."""
    try:
        wal = connect(root, sync_mode=SyncMode.STRICT)
    except Exception as exc:  # noqa: BLE001
        ready.set()
        out_q.put(("connect", type(exc).__name__, str(exc)))
        return
    ready.set()
    go.wait(120)
    try:
        wal.append(b"late", b"late")
        out_q.put(("append", "ok", ""))
    except Exception as exc:  # noqa: BLE001
        out_q.put(("append", type(exc).__name__, str(exc)))
    finally:
        wal.close()


def attached_member(root: str, idx: int, barrier, out_q) -> None:
    """Attach, make a control request (so this process holds a reply queue), wait until every
    member is attached at once, then append; report the outcome."""
    try:
        with connect(root, sync_mode=SyncMode.STRICT) as wal:
            data = wal.create_checkpoint(b"member-%d" % idx)
            barrier.wait(120)
            s, q = wal.append(b"member-%d" % idx, b"m%d" % idx)
            try:
                wal.create_checkpoint(b"shared")
                won = True
            except CheckpointExistsError:
                won = False
            out_q.put((idx, "ok", (s, q, data.user_id, won)))
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        try:
            barrier.abort()
        except Exception:  # noqa: BLE001
            pass
        out_q.put((idx, type(exc).__name__, str(exc)))



def close_under_threads(root: str, rounds: int) -> dict:
    """Close this process's handles while its other threads append and wait (run in a child).

    The WAL runs on (another process started it). Per round: STRICT threads contend for one
    shard's lock and wait for durability, ASYNC threads fill the small ring and wait for
    space; on even rounds the workers are stopped (SIGSTOP) so that every thread is inside a
    semaphore wait when the handles close. Returns how each thread ended, by tag.
    """
    import signal
    import threading

    from ironwal_mp import WalClosedError

    outcomes: dict = {}
    for r in range(rounds):
        strict = connect(root, sync_mode=SyncMode.STRICT)
        fast = connect(root, sync_mode=SyncMode.ASYNC)
        workers = strict.stats()["worker_pids"]
        started = threading.Barrier(9)

        def run(wal, tag: str) -> None:
            started.wait()
            try:
                while True:
                    wal.append(b"same-key", tag.encode() * 40)
            except WalClosedError:
                outcomes[tag] = outcomes.get(tag, 0) + 1
            except BaseException as exc:  # noqa: BLE001 - reported to the test
                outcomes[tag] = repr(exc)

        threads = [threading.Thread(target=run, args=(strict if i < 4 else fast, f"{'sa'[i >= 4]}{i}"))
                   for i in range(8)]
        for t in threads:
            t.start()
        started.wait()
        if r % 2 == 0:
            for pid in workers:
                os.kill(pid, signal.SIGSTOP)
        time.sleep(0.2)
        try:
            fast.close()
            strict.close()
            for t in threads:
                t.join(60)
                if t.is_alive():
                    outcomes["hung"] = outcomes.get("hung", 0) + 1
            if r % 2 == 0:  # the workers cannot have cleared them: every waiter took itself back
                from ironwal_mp.ipc import ring_layout as L

                left = sum(ring.header[L.DUR_WAITERS] + ring.header[L.SPACE_WAITERS] for ring in strict._rings)
                outcomes["waiters left"] = outcomes.get("waiters left", 0) + left
        finally:
            for pid in workers:
                os.kill(pid, signal.SIGCONT)
    return outcomes
