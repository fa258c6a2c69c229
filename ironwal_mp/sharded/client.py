"""``ShardedWal``: the handle every appending or reading process holds.

It routes keys itself (the router is a pure function recorded in MANIFEST), copies payloads
straight into the owning shard's shared-memory ring, and reads straight from segment files.
Only control requests (checkpoints, pruning, compaction, attach/detach) go to the coordinator,
over POSIX message queues.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union
from zlib import crc32

from .. import errors as E
from ..engine.checkpoint_log import CheckpointData, CheckpointLog, check_checkpoint_id, check_keep_latest_n
from ..engine.frame import encode_entries
from ..engine.layout import check_flag, check_id
from ..engine.rootkind import check_sharded_root
from ..engine.rootlock import RootLock, lock_owner
from ..ipc import control as C
from ..ipc import messages as M
from ..ipc import ring_layout as L
from ..ipc.leftovers import clear_leftovers
from ..ipc.names import Names
from ..ipc.queues import Queue
from ..ipc.fdlimit import ensure_descriptors
from ..ipc.ring import Ring, pid_alive
from ..options import SyncMode, WalOptions, options_to_dict
from .manifest import check_shard_count, read_manifest, recorded_shard_count
from .reads import ShardReader
from .router import _crc32_v1, get_router

import json
import logging

import posix_ipc

log = logging.getLogger("ironwal_mp.client")

#: default ring size per shard: 16 shards fit a 64 MiB /dev/shm several times over
DEFAULT_RING_SIZE = 1 << 20
DEFAULT_TIMEOUT = 30.0
DEFAULT_FLUSH_INTERVAL = C.DEFAULT_FLUSH_US / 1e6
#: a starting coordinator gets at least this long (recovery may take a while) before it is killed
START_WAIT_S = 60.0
#: how long LOCK held in a killed coordinator's name is waited for (its dying children's copies)
KILLED_LOCK_WAIT_S = 5.0


@dataclass(frozen=True)
class PruneStats:
    """What ``prune_before_checkpoint`` removed: shards that lost a segment, and segments in all."""

    shards_pruned: int
    segments_deleted: int


@dataclass(frozen=True)
class CompactionStats:
    """What ``compact_checkpoints`` did to ``checkpoints.log``: records before and after, and
    the bytes the rewrite saved."""

    checkpoints_before: int
    checkpoints_after: int
    bytes_reclaimed: int


class _Attachment:
    """This process's connection to one running WAL, shared by its handles."""

    def __init__(self, root: str, names: Names, timeout: float) -> None:
        self.root = root
        self.names = names
        self.timeout = timeout
        self.ctl = C.ControlBlock(names)
        self.coordinator_pid = self.ctl.coordinator_pid
        self.epoch = self.ctl.epoch  # (this coordinator run's identity: a pid may be reused)
        self.shard_count = self.ctl.f[C.SHARD_COUNT]
        #: the mode the WAL was started with: what connect() appends in unless told otherwise
        self.sync_mode = SyncMode(C.SYNC_NAMES.get(self.ctl.f[C.SYNC_MODE], SyncMode.STRICT.value))
        try:
            ensure_descriptors(self.shard_count)
        except BaseException:
            self.ctl.close()
            raise
        self.rings = [Ring(names, s) for s in range(self.shard_count)]
        for ring in self.rings:
            ring.liveness = self.check_alive
            ring.epoch = self.epoch  # publish only while this coordinator has it open
        self.requests = Queue(names.coordinator_queue)
        self.token = secrets.randbits(63) or 1
        self.replies: Optional[Queue] = None  # created on the first control request
        self.req_lock = threading.Lock()
        self.req_id = 0
        self.refs = 0
        self.started: Optional[subprocess.Popen] = None
        self.closed = False
        self.reader: Optional[ShardReader] = None

    def check_open(self) -> None:
        """WalClosedError if this handle is closed or the coordinator says it is stopping."""
        if self.closed:
            raise E.WalClosedError("this ShardedWal handle is closed")
        if self.ctl.f[C.STATE] in (C.ST_CLOSING, C.ST_CLOSED):
            raise E.WalClosedError(f"the coordinator of {self.root} has stopped")

    def check_alive(self) -> None:
        """check_open(), and WalClosedError if the coordinator process is gone."""
        self.check_open()
        if not pid_alive(self.coordinator_pid):
            raise E.WalClosedError(f"the coordinator of {self.root} has stopped")

    def request(self, kind: int, body: Dict[str, Any], timeout: Optional[float] = None,
                reply_wait: Optional[float] = None) -> Dict[str, Any]:
        """Send a control request to the coordinator and return its answer (or raise its error).

        The answer is awaited ``reply_wait`` seconds, by default at least 120 (a checkpoint's
        prepare may take the workers' whole timeout)."""
        timeout = self.timeout if timeout is None else timeout
        with self.req_lock:
            # (whether the coordinator process lives is checked while waiting, not here: reading
            # /proc costs more than a checkpoint's own work on some machines; a dead one is
            # found within the first 0.1 s of waiting)
            self.check_open()
            if self.replies is None:
                # the coordinator registers (pid, queue) with the first request, to remove the
                # queue should this process die without closing
                self.replies = Queue(self.names.client_queue(self.token), create=True)
            self.req_id += 1
            req = self.req_id
            body = dict(body, reply=self.token, pid=os.getpid())
            self.requests.send(M.Message(kind, os.getpid(), req, body), timeout, alive=self.check_alive)
            deadline = time.monotonic() + (max(timeout, 120.0) if reply_wait is None else reply_wait)
            while True:
                msg = self.replies.receive(0.1)
                if msg is not None and msg.req_id == req:
                    break
                if msg is None:
                    if kind != M.SHUTDOWN:
                        self.check_alive()
                    elif not pid_alive(self.coordinator_pid):
                        return {}
                    if time.monotonic() > deadline:
                        raise E.WorkerFailedError(
                            f"the coordinator (pid {self.coordinator_pid}) did not answer a control request in time")
        if msg.kind == M.ERROR:
            raise M.error_from_body(msg.body)
        return msg.body

    def close_objects(self) -> None:
        """Close what this process attached. Other threads may still be inside calls: each
        wait among them sees ``closed`` within a poll and raises WalClosedError first."""
        self.closed = True
        if self.reader is not None:
            self.reader.close()
        for ring in self.rings:
            # (the mapping itself is left to reference counting: a thread may be on the
            # append fast path, which is not counted; see Ring.close)
            ring.close(release_memory=False)
        # a thread waiting for a reply holds req_lock and gives up within 0.1 s of `closed`
        locked = self.req_lock.acquire(timeout=5.0)
        try:
            self.requests.close()
            if self.replies is not None:
                self.replies.unlink()
                self.replies.close()
        finally:
            if locked:
                self.req_lock.release()
        # (left mapped like the rings: a thread past check_open() may still read it)
        self.ctl.close(release_memory=False)


_attachments: Dict[str, _Attachment] = {}


class _Registry:
    """Serialises opening and releasing attachments in this process.

    A handle freed by the garbage collector releases its attachment from a finalizer, which
    may run inside an open or a release on the same thread (any allocation can trigger a
    collection): that release is deferred until the lock is let go instead of deadlocking.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: Optional[int] = None
        self._deferred: List[_Attachment] = []

    def __enter__(self) -> None:
        self._lock.acquire()
        self._owner = threading.get_ident()

    def __exit__(self, *exc: object) -> None:
        self._owner = None
        self._lock.release()
        while self._deferred and self._owner is None:
            try:
                _release(self._deferred.pop())
            except Exception as err:  # (the section's own outcome stands)
                log.warning("releasing a collected handle failed: %s", err)

    def held_here(self) -> bool:
        return self._owner == threading.get_ident()

    def defer(self, att: _Attachment) -> None:
        self._deferred.append(att)


_registry = _Registry()


def _after_fork_in_child() -> None:
    # the child shares the parent's queues and lock-holder identity; give it its own
    global _registry
    _registry = _Registry()  # first: what follows allocates, and a collection may release a handle
    pid = os.getpid()
    for att in list(_attachments.values()):
        for ring in att.rings:
            ring._pid = pid
            ring._busy = []  # the parent's threads inside waits are not the child's
        att.started = None
        att.req_lock = threading.Lock()
        att.token = secrets.randbits(63) or 1
        att.replies = None  # the parent's queue is the parent's
        if att.reader is not None:  # its locks may be held by parent threads that are not here
            att.reader = att.reader.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _running(names: Names) -> Optional[C.ControlBlock]:
    ctl = C.ControlBlock.try_open(names)
    if ctl is None:
        return None
    if ctl.state == C.ST_READY and pid_alive(ctl.coordinator_pid):
        return ctl
    ctl.close()
    return None


def _attach(root: str, timeout: float) -> Optional[_Attachment]:
    """Attach to the coordinator running for ``root`` (None if there is none)."""
    att = _attachments.get(root)
    if att is not None and not att.closed:
        ctl = _running(att.names)
        if ctl is not None:
            same = ctl.epoch == att.epoch  # not a successor's (even one with a reused pid)
            ctl.close()
            if same:
                return att
    names = Names(root)
    ctl = _running(names)
    if ctl is None:
        return None
    ctl.close()
    try:
        att = _Attachment(root, names, timeout)
    except posix_ipc.ExistentialError:
        return None  # it shut down while we attached
    except (E.WalError, OSError, ValueError) as exc:
        if isinstance(exc, E.WalClosedError):
            return None
        raise
    _attachments[root] = att
    return att


def service_args(shard_count: int, workers: Optional[int], ring_size: int, flush_interval: float,
                 idle_flush: bool) -> List[str]:
    """The coordinator's command-line options for these settings (validated by the caller)."""
    args = ["--shards", str(shard_count), "--ring-size", str(ring_size),
            "--flush-interval-us", str(round(flush_interval * 1e6))]
    if workers:
        args += ["--workers", str(workers)]
    if not idle_flush:
        args.append("--no-idle-flush")
    return args


def _start(root: str, opts: WalOptions, service: List[str], timeout: float) -> subprocess.Popen:
    """Start a coordinator for ``root`` and wait until it is ready (or says why not)."""
    names = Names(root)
    token = secrets.randbits(63) or 1
    notify = Queue(names.client_queue(token), create=True)
    env = dict(os.environ, IRONWAL_MP_OPTIONS=json.dumps(options_to_dict(opts)))
    import coordinator as _coordinator_pkg

    project = os.path.dirname(os.path.dirname(os.path.abspath(_coordinator_pkg.__file__)))
    env["PYTHONPATH"] = project + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "coordinator", "--root", root, *service,
           "--notify", f"{token:x}", "--starter", str(os.getpid())]
    proc: Optional[subprocess.Popen] = None
    try:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, close_fds=True, start_new_session=True)
        deadline = time.monotonic() + max(timeout, START_WAIT_S)
        while True:
            msg = notify.receive(0.05)
            if msg is not None:
                break
            # Another coordinator's sweep of stale objects (one starting at the same time, or one
            # shutting down) may have removed this queue, and with it the answer: look for it
            ctl = _running(names)
            if ctl is not None:
                ours = ctl.coordinator_pid == proc.pid
                ctl.close()
                if ours:
                    msg = M.Message(M.READY, 0, 0, {})
                    break
            if proc.poll() is not None:
                msg = notify.receive(0)  # its ERROR may have come in since the wait above
                if msg is not None:
                    break
                owner = lock_owner(root)
                if proc.returncode == M.EXIT_LOCKED or (owner is not None and owner[0] != proc.pid):
                    raise _locked_error(root, owner)
                # killed (or crashed) while starting: nothing cleared what it created, and its
                # workers, orphaned, exit by themselves; the leftover pass waits for them
                _clear_after_killed_start(root, names, [names.client_queue(token)], proc.pid)
                raise E.WorkerFailedError(f"the coordinator exited with status {proc.returncode} while starting")
            if time.monotonic() > deadline:
                _kill_start(proc, root, names, keep=[names.client_queue(token)])
                raise E.WorkerFailedError("the coordinator did not start in time (it was killed; rings "
                                          "holding acknowledged records are kept for the next open)")
    except BaseException:
        # (Ctrl-C, or any error while waiting: a coordinator nobody is starter of would run on)
        if proc is not None and proc.poll() is None:
            _kill_start(proc, root, names, keep=[names.client_queue(token)])
        raise
    finally:
        notify.unlink()
        notify.close()
    if msg.kind == M.ERROR:
        proc.wait()
        raise M.error_from_body(msg.body)
    return proc


def _kill_start(proc: subprocess.Popen, root: str, names: Names, keep: List[str]) -> None:
    """Kill a coordinator that is still starting, with its workers, and clear what it left."""
    try:  # the coordinator leads its own process group: its workers go with it
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass
    proc.wait()
    _clear_after_killed_start(root, names, keep, proc.pid)


def _clear_after_killed_start(root: str, names: Names, keep: List[str], dead_pid: int) -> None:
    """Do the clean-up a start-up does, for what the coordinator ``dead_pid`` left behind.

    It may have created objects, and rings of an earlier run may hold acknowledged records:
    the same pass as the coordinator's start keeps those and removes the rest. Skipped when
    another process holds LOCK (its coordinator's start-up does the same). LOCK still held in
    the dead coordinator's name is waited for: a worker it was spawning, killed between fork
    and exec, holds a copy of its descriptor until that child is gone.
    """
    lock = RootLock(root, role="coordinator")  # (an opener meanwhile waits for it, as for a start)
    deadline = time.monotonic() + KILLED_LOCK_WAIT_S
    while True:
        try:
            lock.acquire()
            break
        except E.WalLockedError:
            owner = lock_owner(root)  # (None: released just now, try again)
            if time.monotonic() > deadline or (owner is not None and owner[0] != dead_pid):
                return
            if owner is not None:
                time.sleep(0.01)
        except OSError:
            return
    try:
        for ring in clear_leftovers(root, names, 0, keep=keep).values():
            ring.close()
    except (E.WalError, OSError) as exc:
        log.warning("could not clear what the killed coordinator of %s left: %s", root, exc)
    finally:
        lock.release()


def _locked_error(root: str, owner: Optional[Tuple[int, str]]) -> E.WalLockedError:
    pid, role = owner if owner is not None else (-1, "")
    who = f"process {pid}" if pid > 0 else "another process"
    if role == "wal":
        return E.WalLockedError(f"{root} is open by {who} as a plain Wal (or a repair), not by a coordinator: "
                                "close that first")
    return E.WalLockedError(f"{root} is being started by {who}")


def _wait_for_starter(root: str, timeout: float) -> bool:
    """While another process's coordinator holds ``root`` and is not ready yet, wait; False
    at once if the holder is not a coordinator (it will not become one: waiting is no use)."""
    names = Names(root)
    deadline = time.monotonic() + max(timeout, 60.0)
    while time.monotonic() < deadline:
        owner = lock_owner(root)
        if owner is None:
            return True
        if owner[1] == "wal" or owner[0] == os.getpid():
            return False
        ctl = _running(names)
        if ctl is not None:
            ctl.close()
            return True
        time.sleep(0.05)
    return True


def _open(opts: WalOptions, shard_count: Optional[int], service: List[str], timeout: float,
          start: bool) -> _Attachment:
    # (the real path, as the IPC names use: two spellings of one WAL share one attachment)
    root = os.path.realpath(os.fspath(opts.root_path))
    with _registry:
        for attempt in range(3):
            att = _attach(root, timeout)
            if att is None and start and not service:
                raise E.ConfigError("shard_count", f"{root} holds no sharded WAL yet (no MANIFEST or shard "
                                                   "directories): give the shard count to create one")
            if att is None and start:
                try:
                    proc = _start(root, opts, service, timeout)
                except E.WalLockedError:
                    if not _wait_for_starter(root, timeout):  # (held, and not by a starting coordinator)
                        raise
                    continue  # another process started it meanwhile: attach to that
                try:
                    att = _attach(root, timeout)
                    if att is None:
                        raise E.WorkerFailedError(f"the coordinator for {root} stopped right after starting")
                    if att.coordinator_pid == proc.pid:  # (else ours is gone and another serves)
                        att.started = proc
                    else:
                        proc.wait()
                except BaseException:
                    # it serves, but this process holds no handle that would ever stop it
                    if att is None or att.started is None:
                        proc.terminate()  # (a clean shut-down: SIGTERM is its stop signal)
                        _wait_or_kill(proc)
                        cached = _attachments.get(root)  # (also one cached before `att` was set)
                        if cached is not None and cached.refs == 0 and cached.coordinator_pid == proc.pid:
                            cached.close_objects()
                            del _attachments[root]
                    raise
            if att is None:
                raise E.WalClosedError(
                    f"no coordinator is running for {root}: open it with ShardedWal(opts, shard_count) "
                    "or run `ironwal-mp serve`"
                )
            if shard_count is not None and att.shard_count != shard_count:
                if att.refs == 0 and att.started is None:  # attached for this call alone
                    att.close_objects()
                    _attachments.pop(root, None)
                raise E.ShardCountMismatchError(shard_count, att.shard_count)
            att.refs += 1
            return att
        raise E.WalLockedError(f"{root} is held by a coordinator that does not answer")


class ShardedWal:
    """A sharded, multiprocess WAL: ``shard_count`` engine streams written by worker processes.

    The first ``ShardedWal`` for a directory starts its coordinator (which starts the workers);
    later ones, in this or other processes, attach to it. The handle is thread-safe and
    picklable (it re-attaches where it is unpickled). ``shard_count=None`` takes the running
    coordinator's count, else the one the directory's MANIFEST records (ConfigError for a
    directory that holds no sharded WAL yet).
    """

    def __init__(
        self,
        opts: WalOptions,
        shard_count: Optional[int],
        *,
        workers: Optional[int] = None,
        ring_size: int = DEFAULT_RING_SIZE,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        idle_flush: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
        _start: bool = True,
        _coordinators_sync: bool = False,
    ) -> None:
        if not isinstance(opts, WalOptions):
            raise TypeError(f"expected WalOptions, not {type(opts).__name__}")
        if shard_count is not None:
            check_shard_count(shard_count)
        if workers is not None:
            check_workers(workers)
        try:
            L.check_capacity(ring_size)
        except (ValueError, TypeError) as exc:
            raise E.ConfigError("ring_size", str(exc)) from None
        check_flush_interval(flush_interval)
        check_timeout(timeout)
        if not isinstance(idle_flush, bool):
            raise E.ConfigError("idle_flush", f"must be True or False, got {idle_flush!r}")
        self.options = opts
        self.root = os.path.abspath(os.fspath(opts.root_path))
        if _start:
            check_sharded_root(self.root)  # (an engine WAL, a stream, a file: refused before anything starts)
        self._timeout = timeout
        count = shard_count if shard_count is not None or not _start else recorded_shard_count(self.root)
        service = service_args(count, workers, ring_size, flush_interval, idle_flush) if count else []
        self._att = _open(opts, shard_count, service, timeout, _start)
        if _coordinators_sync:
            self.options = opts = opts.replace(sync_mode=self._att.sync_mode)
        self._closed = False
        self._close_lock = threading.RLock()  # (reentrant: a signal handler may close during close)
        try:
            self._bind()
        except BaseException:
            _release(self._att)  # (for a starter: the last reference stops the coordinator)
            raise

    def _bind(self) -> None:
        att = self._att
        manifest = read_manifest(self.root)
        self._route = get_router(manifest.router if manifest else "crc32-v1")
        self._n = att.shard_count
        self._rings = att.rings
        mode = self.options.sync_mode
        self._strict = mode is SyncMode.STRICT
        self._appenders = [ring.make_appender(self._strict, self._timeout) for ring in att.rings]
        self._sync_batches = mode in (SyncMode.STRICT, SyncMode.BATCH_ONLY)
        if att.reader is None:
            att.reader = ShardReader(self.root, att.rings, self.options)
        # the hot path as a closure on the instance: no bound method is built per call and
        # every name it needs is a local (see ShardedWal.append for the contract)
        self.append = _make_append(self._route, self._n, self._appenders, self._rings, self._strict, self._timeout)
        self._finalizer = weakref.finalize(self, _release_from_gc, att)  # runs once: close() or GC

    # --- pickling: re-attach in the receiving process ----------------------------------------

    def __reduce__(self):
        self._check()  # (a closed handle would come back open)
        # the absolute root: the receiving process may run in another directory
        return (_reconnect, (options_to_dict(self.options.replace(root_path=self.root)), self._timeout))

    # --- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> "ShardedWal":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Detach; the last handle of the process that started the WAL shuts it down cleanly.

        Returns once that is done, also to a caller that found another thread closing."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self.append = _closed_append  # type: ignore[method-assign]
            # a closure fetched earlier (``app = wal.append``) refuses too
            self._appenders[:] = [_closed_publish] * len(self._appenders)
            self._finalizer()

    @property
    def closed(self) -> bool:
        return self._closed

    def _check(self) -> None:
        if self._closed:
            raise E.WalClosedError("this ShardedWal handle is closed")

    # --- appends ----------------------------------------------------------------------------

    @property
    def shard_count(self) -> int:
        return self._n

    def shard_for(self, key: bytes) -> int:
        """The shard ``key`` routes to (stable across processes and runs)."""
        return self._route(_as_bytes(key, "key"), self._n)

    def append(self, key: bytes, value: bytes) -> Tuple[int, int]:
        """Append ``value`` to the shard ``key`` routes to; return ``(shard_id, seq_id)``.

        An open handle shadows this with the closure bound at attach time (``_make_append``),
        and a closed one with a stub that raises WalClosedError; this body is never the path.
        """
        return _closed_append(key, value)

    def append_batch_for_key(self, key: bytes, values: Iterable[bytes]) -> List[Tuple[int, int]]:
        """Append ``values`` atomically (one frame) to ``key``'s shard."""
        self._check()
        shard = self.shard_for(key)
        items = [_as_bytes(v, "value") for v in values]
        if not items:
            return []
        seq = self._publish(shard, items)
        return [(shard, seq + i) for i in range(len(items))]

    def append_batch(self, items: Iterable[Tuple[bytes, bytes]]) -> List[Tuple[int, int]]:
        """Append ``(key, value)`` pairs; return ``(shard, seq)`` for each, in input order.

        Each shard's part of the batch is one frame (atomic on that shard); the parts are
        published one shard after another, then (STRICT, BATCH_ONLY) waited for together.
        Bad arguments (types, a part too large for its ring) are refused before anything is
        published. An error after that (a failed worker, a timeout, a close) carries
        ``published``: per input position, the ``(shard, seq)`` already published (written
        unless that shard's worker fails, so not to be appended again), else None.
        """
        self._check()
        groups: Dict[int, List[int]] = {}
        values: List[bytes] = []
        for i, item in enumerate(items):
            if isinstance(item, (bytes, bytearray, memoryview, str)):
                raise TypeError("append_batch takes (key, value) pairs")
            try:
                key, value = item
            except (TypeError, ValueError):
                raise TypeError("append_batch takes (key, value) pairs") from None
            values.append(_as_bytes(value, "value"))
            groups.setdefault(self.shard_for(key), []).append(i)
        blocks = {shard: encode_entries([values[i] for i in positions]) for shard, positions in groups.items()}
        for shard, block in blocks.items():
            self._rings[shard].check_block_size(len(block))
        out: List[Optional[Tuple[int, int]]] = [None] * len(values)
        waits: List[Tuple[int, int]] = []  # (shard, id to be durable up to), registered waiters
        try:
            for shard, positions in groups.items():
                first = self._rings[shard].publish(blocks[shard], len(positions), self._sync_batches, self._timeout)
                for k, i in enumerate(positions):
                    out[i] = (shard, first + k)
                if self._sync_batches:
                    waits.append((shard, first + len(positions)))
            while waits:  # (each wait takes its registration back, whatever happens)
                shard, upto = waits.pop(0)
                self._rings[shard].wait_durable(upto, self._timeout)
        except BaseException as exc:
            for shard, _ in waits:
                try:
                    self._rings[shard].unregister_durable(self._timeout)
                except Exception:  # (never in place of the error: a count left over goes stale)
                    pass
            if isinstance(exc, E.WalError):
                exc.published = out  # type: ignore[attr-defined]  (all None: nothing was published)
            raise
        return out  # type: ignore[return-value]

    def _publish(self, shard: int, values: Sequence[bytes]) -> int:
        return self._publish_block(shard, encode_entries(values), len(values))

    def _publish_block(self, shard: int, block: bytes, count: int) -> int:
        ring = self._rings[shard]
        seq = ring.publish(block, count, self._sync_batches, self._timeout)
        if self._sync_batches:
            _wait_published(ring, shard, seq, count, self._timeout)
        return seq

    def sync(self) -> None:
        """Return once everything appended so far (by anyone) is durable on every shard."""
        self._check()
        for ring in self._rings:
            ring.wait_durable(ring.next_seq(self._timeout), self._timeout, registered=False)

    # --- reads ------------------------------------------------------------------------------

    def _check_shard(self, shard_id: int) -> None:
        if isinstance(shard_id, bool) or not isinstance(shard_id, int):
            raise TypeError(f"shard_id must be an int, not {type(shard_id).__name__}")
        if not 0 <= shard_id < self._n:
            raise E.InvalidIdError(f"shard_id {shard_id} is out of range (0..{self._n - 1})")

    def get(self, shard_id: int, seq_id: int) -> Optional[bytes]:
        """The durable entry ``seq_id`` of a shard, or None (absent, not yet durable, pruned)."""
        self._check()
        self._check_shard(shard_id)
        check_id(seq_id, "seq_id")
        return self._att.reader.get(shard_id, seq_id)

    def iter_shard(self, shard_id: int, start_id: int = 0, *,
                   with_ids: bool = False) -> Iterator[Union[bytes, Tuple[int, bytes]]]:
        """A shard's durable entries from ``start_id`` (or the first kept one) on; ``(seq_id,
        entry)`` pairs if ``with_ids`` (a prune may move the first kept id between calls)."""
        self._check()
        self._check_shard(shard_id)
        check_id(start_id, "start_id")
        check_flag(with_ids, "with_ids")
        return self._att.reader.iter(shard_id, start_id, with_ids)

    def first_id(self, shard_id: int) -> Optional[int]:
        """The shard's first durable id still kept (pruning moves it up), or None if it has
        none: where ``iter_shard(shard_id, 0)`` starts."""
        self._check()
        self._check_shard(shard_id)
        return self._att.reader.view(shard_id)[0].first_id

    # --- checkpoints ------------------------------------------------------------------------

    def create_checkpoint(self, checkpoint_id: bytes) -> CheckpointData:
        """A consistent cut across all shards, durable when this returns, under ``checkpoint_id``.

        A call that raised WalClosedError or WorkerFailedError because the coordinator died or
        did not answer may still have taken effect: ``load_checkpoint(checkpoint_id)`` tells."""
        self._check()
        user_id = check_checkpoint_id(checkpoint_id)
        body = self._att.request(M.CHECKPOINT, {"id": user_id})
        return CheckpointData(body["id"], body["timestamp"], self._n, tuple(body["offsets"]))

    def _log(self) -> CheckpointLog:
        return CheckpointLog(self.root, repair=False)

    def load_latest_checkpoint(self) -> Tuple[bytes, CheckpointData]:
        """``(id, data)`` of the newest checkpoint (the one ``HEAD`` names); NoCheckpointsError."""
        self._check()
        data = self._log().latest()
        return data.user_id, data

    def load_checkpoint(self, checkpoint_id: bytes) -> CheckpointData:
        """The checkpoint with this id: offsets per shard, timestamp, shard count."""
        self._check()
        return self._log().get(check_checkpoint_id(checkpoint_id))

    def list_checkpoints(self) -> List[Tuple[bytes, int]]:
        """``[(id, timestamp)]`` of every checkpoint the log holds, oldest first."""
        self._check()
        return self._log().list()

    @property
    def checkpoint_count(self) -> int:
        """How many checkpoints the log holds."""
        self._check()
        return len(self._log())

    def prune_before_checkpoint(self, checkpoint_id: bytes) -> PruneStats:
        """Delete whole segments below the checkpoint's offsets on every shard."""
        self._check()
        body = self._att.request(M.PRUNE, {"id": check_checkpoint_id(checkpoint_id)})
        return PruneStats(body["shards_pruned"], body["segments_deleted"])

    def compact_checkpoints(self, keep_latest_n: int = 10) -> CompactionStats:
        """Rewrite checkpoints.log keeping the newest ``keep_latest_n`` records."""
        self._check()
        check_keep_latest_n(keep_latest_n)
        # (more than any log holds means all of them; msgpack carries at most 64 bits)
        body = self._att.request(M.COMPACT, {"keep": min(keep_latest_n, 1 << 32)})
        return CompactionStats(body["before"], body["after"], body["reclaimed"])

    # --- observation ------------------------------------------------------------------------

    def stats(self) -> Dict[str, Any]:
        """Per-shard ids, ring fill and worker counters, read from shared memory."""
        self._check()
        att = self._att
        shards = []
        for ring in self._rings:
            h = ring.header
            # durable, written, then next: each read no earlier than the one it must not pass
            durable, written = h[L.DURABLE_SEQ], h[L.WRITTEN_SEQ]
            base = L.slot_base(h[L.GEN])
            tail, next_seq = h[base + L.TAIL], h[base + L.NEXT_SEQ]
            fsyncs = h[L.FSYNCS]
            shards.append({
                "shard": ring.shard,
                "next_id": next_seq,
                "written_id": written,
                "durable_id": durable,
                "ring_used": max(0, tail - h[L.HEAD]),
                "ring_capacity": ring.capacity,
                "fsyncs": fsyncs,
                "fsync_avg_us": (h[L.FSYNC_NS] / fsyncs / 1000) if fsyncs else 0.0,
                "last_fsync_us": h[L.LAST_FSYNC_NS] / 1000,
                "frames": h[L.FRAMES],
                "entries": h[L.ENTRIES],
                "bytes": h[L.BYTES_WRITTEN],
                "worker_pid": h[L.WORKER_PID],
                "worker_restarts": max(0, h[L.RESTARTS]),
                "state": L.STATE_NAMES.get(h[L.STATE], str(h[L.STATE])),
            })
        return {
            "root": self.root,
            "shard_count": self._n,
            "coordinator_pid": att.coordinator_pid,
            "worker_pids": att.ctl.worker_pids(),
            "flush_interval": (att.ctl.f[C.FLUSH_US] or C.DEFAULT_FLUSH_US) / 1e6,
            "idle_flush": not att.ctl.f[C.IDLE_FLUSH_OFF],
            "sync_mode": self.options.sync_mode.value,  # (this handle's)
            "state": {C.ST_STARTING: "starting", C.ST_READY: "ready", C.ST_CLOSING: "closing",
                      C.ST_CLOSED: "closed"}.get(att.ctl.state, "unknown"),
            "shards": shards,
        }


def _make_append(route, n: int, appenders: list, rings: list, strict: bool, timeout: float):
    """The append closure: route, publish, and with STRICT wait until durable."""
    # the one router there is today is inlined (a call less); another one's result is < n
    hash_key = crc32 if route is _crc32_v1 else (lambda key: route(key, n))

    def append(key: bytes, value: bytes, _hash=hash_key, _bytes=bytes) -> Tuple[int, int]:
        if type(key) is not _bytes:
            key = _as_bytes(key, "key")
        if type(value) is not _bytes:
            value = _as_bytes(value, "value")
        shard = _hash(key) % n
        return shard, appenders[shard](value)

    if not strict:
        return append

    def append_strict(key: bytes, value: bytes) -> Tuple[int, int]:
        shard, seq = append(key, value)
        _wait_published(rings[shard], shard, seq, 1, timeout)
        return shard, seq

    return append_strict


def _wait_published(ring, shard: int, seq: int, count: int, timeout: float) -> None:
    """Wait until ids ``seq``.. ``seq + count`` of a shard are durable. An error says, in its
    ``published``, that they were published all the same (written unless the worker fails)."""
    try:
        ring.wait_durable(seq + count, timeout)
    except E.WalError as exc:
        exc.published = [(shard, seq + i) for i in range(count)]  # type: ignore[attr-defined]
        raise


def check_workers(workers: object) -> None:
    """ConfigError unless ``workers`` is an int in 1..MAX_WORKERS (the control block's table)."""
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= C.MAX_WORKERS:
        raise E.ConfigError("workers", f"must be an int in 1..{C.MAX_WORKERS}, got {workers!r}")


#: the longest timeout: more would overflow the semaphore and queue waits it is passed to
MAX_TIMEOUT_S = 365 * 86400


def check_timeout(seconds: object) -> None:
    """ConfigError unless ``seconds`` is a positive number of seconds, at most MAX_TIMEOUT_S."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds <= MAX_TIMEOUT_S:
        raise E.ConfigError("timeout", f"must be a positive number of seconds up to {MAX_TIMEOUT_S}, got {seconds!r}")


def check_flush_interval(seconds: object) -> None:
    """ConfigError unless ``seconds`` is a number of seconds in 0.0001..3600."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0.0001 <= seconds <= 3600:
        raise E.ConfigError("flush_interval", f"must be seconds in 0.0001..3600, got {seconds!r}")


def _closed_append(key: bytes, value: bytes) -> Tuple[int, int]:
    raise E.WalClosedError("this ShardedWal handle is closed")


def _closed_publish(value: bytes) -> int:
    raise E.WalClosedError("this ShardedWal handle is closed")


def _wait_or_kill(proc: subprocess.Popen, timeout: float = 120.0) -> None:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _release_from_gc(att: _Attachment) -> None:
    """A handle's finalizer: release now, or once this thread lets go of the registry."""
    if _registry.held_here():
        _registry.defer(att)
    else:
        _release(att)


def _release(att: _Attachment) -> None:
    with _registry:
        att.refs -= 1
        if att.refs > 0 or att.closed:
            return
        try:
            if att.started is not None:
                try:
                    att.request(M.SHUTDOWN, {})
                except E.WalError:
                    # (no reply queue could be made, say): SIGTERM from its starter is a clean
                    # stop too, where waiting would end in a kill that leaves its IPC objects
                    if att.started.poll() is None:
                        att.started.terminate()
                except BaseException:  # (Ctrl-C in here: the handle is closed, so nothing else
                    if att.started.poll() is None:  # would stop what it started; SIGTERM does)
                        att.started.terminate()
                    raise
                _wait_or_kill(att.started)
            elif att.replies is not None:
                try:
                    att.request(M.DETACH, {}, timeout=5.0, reply_wait=5.0)  # (the coordinator reaps us anyway)
                except E.WalError:
                    pass
        finally:
            att.close_objects()
            if _attachments.get(att.root) is att:
                del _attachments[att.root]


def _reconnect(opts_dict: dict, timeout: float) -> ShardedWal:
    from ..options import options_from_dict

    return ShardedWal(options_from_dict(opts_dict), None, timeout=timeout, _start=False)  # type: ignore[arg-type]


def connect(root_path: "str | os.PathLike[str]", *, sync_mode: Optional[SyncMode] = None,
            timeout: float = DEFAULT_TIMEOUT) -> ShardedWal:
    """Attach to the WAL a running coordinator serves at ``root_path`` (WalClosedError if none).

    ``sync_mode=None`` appends in the mode the WAL was started with (its starter's, or
    ``serve --sync``), so jobs attached to one service agree on durability by default.
    """
    opts = WalOptions(root_path=root_path, sync_mode=SyncMode.STRICT if sync_mode is None else sync_mode)
    return ShardedWal(opts, None, timeout=timeout, _start=False,  # type: ignore[arg-type]
                      _coordinators_sync=sync_mode is None)


def _as_bytes(value: object, what: str) -> bytes:
    if type(value) is bytes:
        return value  # type: ignore[return-value]
    if isinstance(value, (bytes, bytearray, memoryview)):  # (subclasses too)
        return bytes(value)
    raise TypeError(f"{what} must be bytes, not {type(value).__name__}")
