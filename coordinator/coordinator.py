"""The coordinator's event loop: start-up, requests, checkpoints, supervision, shut-down."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from typing import Dict, List, Optional, Set

import posix_ipc

from ironwal_mp import errors as E
from ironwal_mp.engine import layout
from ironwal_mp.engine.checkpoint_log import CheckpointData, CheckpointLog, check_checkpoint_id
from ironwal_mp.engine.rootlock import RootLock
from ironwal_mp.ipc import control as C
from ironwal_mp.ipc import messages as M
from ironwal_mp.ipc import ring_layout as L
from ironwal_mp.ipc.fdlimit import ensure_descriptors
from ironwal_mp.ipc.leftovers import clear_leftovers
from ironwal_mp.ipc.names import Names
from ironwal_mp.ipc.queues import Queue
from ironwal_mp.ipc.ring import Ring, pid_alive
from ironwal_mp.ipc.shm_room import check_room
from ironwal_mp.options import options_from_dict
from ironwal_mp.sharded.manifest import confirm_manifest, discard_unused_manifest, open_manifest

from .barrier import Barrier
from .supervisor import MAX_BACKOFF_S, Supervisor, assign_shards

log = logging.getLogger("ironwal_mp.coordinator")
#: clients' reply queues kept open (each is a descriptor); beyond this the oldest is closed
MAX_OPEN_REPLY_QUEUES = 64

TICK_S = 0.05
#: signals that shut the WAL down (see Coordinator._take_stop_signals)
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
PREPARE_TIMEOUT_S = 30.0
START_TIMEOUT_S = 60.0
KEPT_WAIT_S = 30.0  # longest wait for kept rings' records to be durable before READY
STOP_TIMEOUT_S = 60.0


class StartupError(Exception):
    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class Coordinator:
    def __init__(self, root: str, shard_count: int, workers: int, ring_size: int,
                 opts_json: str, starter: int = 0, notify: Optional[int] = None,
                 flush_us: int = C.DEFAULT_FLUSH_US, idle_flush: bool = True) -> None:
        self.root = root
        self.shard_count = shard_count
        self.names = Names(root)
        self.opts = options_from_dict(json.loads(opts_json))
        self.starter = starter
        self.notify = notify  # the starting client's queue token: never removed as stale
        self.assignment = assign_shards(shard_count, workers)
        self.worker_of = [0] * shard_count
        for w, shards in enumerate(self.assignment):
            for s in shards:
                self.worker_of[s] = w
        self.ring_size = ring_size
        self.flush_us = flush_us
        self.idle_flush = idle_flush
        self.env = dict(os.environ, IRONWAL_MP_OPTIONS=opts_json)
        self.lock = RootLock(root, role="coordinator")
        self.rings: List[Ring] = []
        self.kept: Dict[int, Ring] = {}  # rings of an earlier run still holding records
        self.ctl: Optional[C.ControlBlock] = None
        self.requests: Optional[Queue] = None
        self.worker_replies: Optional[Queue] = None
        self.start_errors: Dict[int, Exception] = {}  # worker -> why it last could not open its shards
        self.worker_queues: List[Queue] = []
        self.wakes: list = []
        self.supervisor: Optional[Supervisor] = None
        self.ckpt_log: Optional[CheckpointLog] = None
        self.clients: Dict[int, int] = {}  # queue token -> pid
        self._reply_queues: Dict[int, Queue] = {}  # token -> open reply queue (while registered)
        self.stopping = False
        self._new_manifest = False  # this start wrote MANIFEST and is not ready yet
        self._req = 0
        self._last_check = 0.0

    # --- start-up ---------------------------------------------------------------------------

    def start(self) -> None:
        try:
            ensure_descriptors(self.shard_count)  # (before MANIFEST: a refusal writes nothing)
            layout.make_dirs(self.root)
            self.lock.acquire()
            _, self._new_manifest = open_manifest(self.root, self.shard_count)
            self.ckpt_log = CheckpointLog(self.root, group_sync=self.opts.group_sync)
        except (E.WalError, OSError, ValueError, TypeError) as exc:
            raise StartupError(exc) from exc
        try:
            self._clear_leftovers()
            # (before any object is made: rings past the free memory would be allocated until
            # the OOM killer came; kept rings exist already)
            check_room(sum(1 for s in range(self.shard_count) if s not in self.kept), self.ring_size)
            self._create_ipc()
        except (E.WalError, OSError) as exc:
            raise StartupError(exc) from exc
        self.supervisor = Supervisor(self.root, self.assignment, self.env)
        try:
            self.supervisor.start_all()
        except OSError as exc:  # e.g. EAGAIN/ENOMEM from fork
            raise StartupError(E.WorkerFailedError(f"cannot start the worker processes: {exc}")) from exc
        self._publish_workers()  # at once: a successor must find them even if we die starting
        self._wait_workers_open()
        self._wait_kept_durable()
        try:  # (before READY: once anyone may write, the shard count binds every later start)
            confirm_manifest(self.root)
        except (E.WalError, OSError) as exc:
            raise StartupError(exc) from exc
        self._new_manifest = False  # (the WAL's now, whatever follows)
        self.ctl.f[C.STATE] = C.ST_READY

    def _clear_leftovers(self) -> None:
        """Wait out workers a crashed coordinator left draining, then drop its IPC objects.

        Rings that still hold published records are kept: their workers resume from them.
        """
        keep = [self.names.client_queue(self.notify)] if self.notify is not None else []
        self.kept = clear_leftovers(self.root, self.names, self.shard_count, keep=keep)

    def _create_ipc(self) -> None:
        self.ctl = C.ControlBlock(self.names, create=True)
        f = self.ctl.f
        f[C.SHARD_COUNT] = self.shard_count
        f[C.WORKERS] = len(self.assignment)
        f[C.RING_CAPACITY] = self.ring_size
        f[C.FLUSH_US] = self.flush_us
        f[C.IDLE_FLUSH_OFF] = 0 if self.idle_flush else 1
        f[C.STARTED_NS] = time.time_ns()
        f[C.STARTER_PID] = self.starter
        f[C.SYNC_MODE] = C.SYNC_CODES[self.opts.sync_mode.value]
        for s, w in enumerate(self.worker_of):
            f[C.WORKER_OF_SHARD + s] = w
        for w in range(len(self.assignment)):
            self.wakes.append(posix_ipc.Semaphore(self.names.worker_wake(w), posix_ipc.O_CREAT, initial_value=0))
        for shard in range(self.shard_count):
            ring = self.kept.get(shard)
            if ring is None:
                ring = Ring(self.names, shard, capacity=self.ring_size, worker=self.worker_of[shard], create=True)
            else:
                ring.header[L.WORKER_IDX] = self.worker_of[shard]
                if ring.data_ready is None:  # (opened without it as a leftover: _wait_kept_durable wakes)
                    ring.data_ready = posix_ipc.Semaphore(self.names.worker_wake(self.worker_of[shard]))
            self.rings.append(ring)
        self.requests = Queue(self.names.coordinator_queue, create=True)
        self.worker_replies = Queue(self.names.worker_replies, create=True)
        self.worker_queues = [Queue(self.names.worker_queue(w), create=True) for w in range(len(self.assignment))]

    def _wait_workers_open(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        # (a shard its worker could not resume is failed, not pending: the others serve)
        epoch = self.ctl.epoch  # (open means open under this run's epoch: set_state stores it second)
        while not all(r.header[L.STATE] == L.ST_FAILED or (r.header[L.STATE] == L.ST_OPEN and
                                                            r.header[L.OPEN_EPOCH] == epoch) for r in self.rings):
            dead = self.supervisor.dead()
            if dead:
                self._take_start_errors()
                said = [self.start_errors[w] for w in dead if w in self.start_errors]  # (a reason beats a status)
                raise StartupError(said[0] if said else E.WorkerFailedError(
                    f"worker {dead[0]} exited with status {self.supervisor.procs[dead[0]].returncode} while starting"))
            if time.monotonic() > deadline:
                raise StartupError(E.WorkerFailedError("workers did not start in time"))
            time.sleep(0.005)

    def _wait_kept_durable(self) -> None:
        """Wait until the records of kept rings are durable: they were acknowledged by an earlier
        run, and reads stop at the durable id, so an open that returned sooner would not yet
        show them (a failed shard is skipped: the others serve). Past KEPT_WAIT_S the start
        goes on: a backlog of huge rings on a slow disk must not fail the open (its client
        gives up at START_WAIT_S), and those records become readable as they are synced.
        A ring kept beyond this run's shard count (``clear_leftovers`` never drops records) is
        no worker's: it stays as it is, closed, for an open with the count it was written with."""
        deadline = time.monotonic() + KEPT_WAIT_S

        def workers_alive() -> None:
            dead = self.supervisor.dead()
            if dead:
                raise StartupError(E.WorkerFailedError(
                    f"worker {dead[0]} exited with status {self.supervisor.procs[dead[0]].returncode} "
                    "while writing the records kept from an earlier run"))

        for shard, ring in self.kept.items():
            if shard >= self.shard_count or ring.header[L.STATE] == L.ST_FAILED:
                continue
            ring.liveness = workers_alive
            try:
                ring.wait_durable(ring.next_seq(), max(0.0, deadline - time.monotonic()), registered=False)
            except E.WorkerFailedError as exc:
                if ring.header[L.STATE] == L.ST_FAILED:
                    log.error("shard %d failed while writing the records kept from an earlier run: %s",
                              ring.shard, exc)
                else:
                    log.warning("shard %d: the records kept from an earlier run are not all durable after "
                                "%.0f s; serving anyway (they can be read once synced)", ring.shard, KEPT_WAIT_S)
            finally:
                ring.liveness = None

    def _publish_workers(self) -> None:
        for w, pid in enumerate(self.supervisor.pids()):
            self.ctl.f[C.WORKER_PIDS + w] = pid

    # --- loop -------------------------------------------------------------------------------

    def serve(self) -> None:
        while not self.stopping:
            try:
                msg = self.requests.receive(TICK_S)
            except ValueError as exc:  # a malformed message must not stop the WAL
                log.warning("dropped a control message: %s", exc)
                msg = None
            if msg is not None:
                self._handle(msg)
            self._supervise()

    def _take_stop_signals(self) -> None:
        """Shut down on SIGTERM or SIGINT, unless a client started this WAL and is alive and
        did not send it: then the starter decides (a service manager's stop signals every
        process of the service at once, and the starter may be finishing a batch and a
        checkpoint; it closes the WAL after, and the WAL stops if the starter dies)."""
        while True:
            info = signal.sigtimedwait(STOP_SIGNALS, 0)
            if info is None:
                return
            name = signal.Signals(info.si_signo).name
            if not self.starter or info.si_pid == self.starter or not pid_alive(self.starter):
                log.warning("%s from pid %d: shutting down", name, info.si_pid)
                self.stopping = True
            else:
                log.warning("%s from pid %d ignored: this WAL stops when the process that started it "
                            "(pid %d) closes it or exits", name, info.si_pid, self.starter)

    def _supervise(self) -> None:
        self._take_stop_signals()
        self._restart_dead()
        if self.stopping:
            return
        now = time.monotonic()
        if now - self._last_check < 0.25:
            return
        self._last_check = now
        if self.starter and not pid_alive(self.starter):
            log.warning("the process that started this WAL (%d) is gone: shutting down", self.starter)
            self.stopping = True
        gone = [t for t, pid in self.clients.items() if not pid_alive(pid)]
        for token in gone:
            del self.clients[token]
            self._forget_queue(token)
            Queue.unlink_name(self.names.client_queue(token))
        if gone:
            self.ctl.set_clients(list((p, t) for t, p in self.clients.items()))

    def _restart_dead(self, wait_s: float = 0.0) -> List[int]:
        """Restart the dead workers whose back-off is over, waiting up to ``wait_s`` for it, and
        fail the shards of those given up on; return the workers still down."""
        deadline = time.monotonic() + wait_s
        while True:
            down = []
            dead = self.supervisor.dead()
            if dead:
                self._take_start_errors()
            for w in dead:
                if self.stopping:
                    return self.supervisor.dead()
                if not self.supervisor.due(w):
                    down.append(w)  # backing off: it keeps dying right after starting
                    continue
                if self.supervisor.gave_up(w):
                    self._fail_worker(w)
                    continue
                self._drain_commands(w)
                self.start_errors.pop(w, None)  # (the new one tells its own, if it fails too)
                self.supervisor.restart(w)
                self._publish_workers()
            if not down or time.monotonic() >= deadline:
                return down
            time.sleep(0.01)

    def _drain_commands(self, w: int) -> None:
        """Drop requests queued for a dead worker (its answers were given on its behalf)."""
        while True:
            try:
                if self.worker_queues[w].receive(0) is None:
                    return
            except ValueError:
                continue  # a fragment of a message the dead one had begun to read

    def _take_start_errors(self) -> None:
        """Read the errors of workers that could not open their shards (ERROR on the reply
        queue, PROTOCOL §10). Called only with no request to the workers under way: any other
        reply read here is a late one of a request already answered, and is dropped."""
        while True:
            try:
                msg = self.worker_replies.receive(0)
            except ValueError:
                continue
            if msg is None:
                return
            self._keep_start_error(msg)

    def _keep_start_error(self, msg: M.Message) -> bool:
        """Keep ``msg`` in ``start_errors`` if it is a worker's start-up ERROR (``req_id`` 0);
        say whether it was one (it answers no request)."""
        if msg.kind != M.ERROR or msg.req_id != 0:
            return False
        if 0 <= msg.sender < len(self.supervisor.procs):
            self.start_errors[msg.sender] = M.error_from_body(msg.body)
        return True

    def _fail_worker(self, w: int) -> None:
        """A worker that cannot stay up: fail its shards so clients get an error, not a hang
        (saying why, when the worker said why: a full disk is told as such)."""
        proc = self.supervisor.procs[w]
        why = self.start_errors.get(w)
        log.error("worker %d keeps exiting at start (status %s%s); its shards %s are failed",
                  w, proc.returncode if proc else "?", f": {why}" if why else "", self.assignment[w])
        code = L.error_errno(getattr(why, "errno", None)) or L.ERR_GAVE_UP
        for shard in self.assignment[w]:
            ring = self.rings[shard]
            ring.header[L.ERRNO] = code
            ring.set_state(L.ST_FAILED)
            ring.wake_durable_waiters()
            for _ in range(8):
                ring.space_free.release()
        self.supervisor.procs[w] = None

    def _reply(self, msg: M.Message, kind: int, body: dict) -> None:
        token = msg.body.get("reply")
        if token is None:
            return
        q = self._reply_queues.get(token)
        if q is None:
            try:
                q = Queue(self.names.client_queue(token))
            except Exception:
                return  # the client went away
            if token in self.clients:  # kept open until the client detaches or dies
                if len(self._reply_queues) >= MAX_OPEN_REPLY_QUEUES:  # the oldest makes room
                    self._forget_queue(next(iter(self._reply_queues)))
                self._reply_queues[token] = q
        try:
            q.send(M.Message(kind, 0, msg.req_id, body), timeout=5.0)
        except E.WalError:
            log.warning("client queue %x is full; dropping a reply", token)
        finally:
            if self._reply_queues.get(token) is not q:
                q.close()

    def _forget_queue(self, token: int) -> None:
        q = self._reply_queues.pop(token, None)
        if q is not None:
            q.close()

    def _error(self, msg: M.Message, exc: BaseException) -> None:
        self._reply(msg, M.ERROR, M.error_body(exc))

    def _handle(self, msg: M.Message) -> None:
        token, pid = msg.body.get("reply"), msg.body.get("pid")
        if not (isinstance(token, int) and 0 < token < 1 << 63 and isinstance(pid, int) and 0 < pid < 1 << 32):
            if token is not None or pid is not None:
                log.warning("dropped a request with a malformed reply address")
            return
        if msg.kind != M.DETACH and self.clients.get(token) != pid:
            self.clients[token] = pid  # any request registers its reply queue for clean-up
            self.ctl.set_clients(list((p, t) for t, p in self.clients.items())[: C.MAX_CLIENTS])
        try:
            if msg.kind == M.ATTACH:
                self._reply(msg, M.OK, {"shard_count": self.shard_count})
            elif msg.kind == M.DETACH:
                self.clients.pop(token, None)
                self.ctl.set_clients(list((p, t) for t, p in self.clients.items()))
                self._reply(msg, M.OK, {})
                self._forget_queue(token)
            elif msg.kind == M.PING:
                self._reply(msg, M.OK, {"pid": os.getpid()})
            elif msg.kind == M.CHECKPOINT:
                result = self.checkpoint(msg.body["id"])
                self._reply(msg, M.OK, result)
                self._tell_committed(result["id"])
            elif msg.kind == M.PRUNE:
                self._reply(msg, M.OK, self.prune(msg.body["id"]))
            elif msg.kind == M.COMPACT:
                before, after, reclaimed = self.ckpt_log.compact(msg.body["keep"])
                self._reply(msg, M.OK, {"before": before, "after": after, "reclaimed": reclaimed})
            elif msg.kind == M.SHUTDOWN:
                if msg.body.get("pid") != self.starter or not self.starter:
                    raise E.WalError("only the process that started this WAL shuts it down by request "
                                     "(a WAL run by `serve` stops on SIGTERM or Ctrl-C)")
                self.stopping = True
                self._reply(msg, M.OK, {})
            else:
                raise E.WalError(f"unknown request kind {msg.kind}")
        except Exception as exc:  # no single request may stop the WAL: the caller gets the error
            if not isinstance(exc, E.WalError):
                log.exception("request %s failed", M.KIND_NAMES.get(msg.kind, msg.kind))
            self._error(msg, exc)

    # --- checkpoints ----------------------------------------------------------------------

    def cut(self) -> List[int]:
        """Every shard's next id at one instant: all ring locks held at once, in shard order."""
        taken = []
        try:
            for ring in self.rings:
                ring.acquire()
                taken.append(ring)
            return [ring.next_seq_locked() for ring in self.rings]
        finally:
            for ring in reversed(taken):
                ring.release()

    def _new_req(self) -> int:
        self._req += 1
        return self._req

    def _ask_workers(self, kind: int, per_worker: Dict[int, dict]) -> int:
        req = self._new_req()
        for w, body in per_worker.items():
            self.worker_queues[w].send(M.Message(kind, 0, req, body))
            self.wakes[w].release()
        return req

    def _await(self, on_reply, done, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            reply = self.worker_replies.receive(min(TICK_S, max(0.0, deadline - time.monotonic())))
            if reply is not None:
                # (a worker restarted before this request may fail its start meanwhile: its
                # reason is kept for _fail_worker, not lost to a request that ignores it)
                if not self._keep_start_error(reply):
                    on_reply(reply)
                continue
            for w in self.supervisor.dead():
                how = self.supervisor.exit_status(w)
                on_reply(M.Message(M.FAILED, w, -1, {"died": True, "error": f"worker {w} died ({how})"}))
            if time.monotonic() > deadline:
                on_reply(None)
                return

    def _unable_to_answer(self) -> Optional[str]:
        """Why a request to every worker cannot be served now, or None.

        A worker found dead is restarted first (after its back-off, if it exited soon after a
        start), so a request made right after a worker crashed is served, not refused. A worker
        still down, or one given up on (its shards failed), would never answer: its requests
        would wait in its queue, and enough of them fill it and stall the coordinator.
        """
        down = self._restart_dead(wait_s=MAX_BACKOFF_S + 0.1)
        if down:
            return f"workers {down} are down and being restarted; try again"
        failed = [r.shard for r in self.rings if r.header[L.STATE] == L.ST_FAILED]
        if failed:
            return f"shards {failed} have failed"
        return None

    def _start_barrier(self, user_id: bytes, cuts: List[int]) -> Barrier:
        """Phase two begins: ask every worker to make its shards durable up to the cut."""
        why = self._unable_to_answer()
        if why is not None:
            raise E.CheckpointAbortedError(f"checkpoint {user_id!r} aborted: {why}")
        barrier = Barrier(self._req + 1, cuts, self.worker_of)
        req = self._ask_workers(M.PREPARE, {w: {"cuts": c} for w, c in barrier.prepare_requests().items()})
        assert req == barrier.req_id
        return barrier

    def _finish_barrier(self, user_id: bytes, barrier: Barrier) -> CheckpointData:
        """Collect the answers: every worker PREPARED, or the checkpoint aborts."""

        def on_reply(reply: Optional[M.Message]) -> None:
            if reply is None:
                barrier.on_timeout()
            elif reply.kind == M.PREPARED:
                barrier.on_prepared(reply.sender, reply.req_id, {int(k): v for k, v in reply.body["durable"].items()})
            elif reply.kind == M.FAILED:
                if reply.body.get("died"):
                    barrier.on_worker_died(reply.sender, reply.body.get("error"))
                else:
                    barrier.on_failed(reply.sender, reply.req_id, reply.body.get("error", "?"))

        self._await(on_reply, lambda: barrier.done, PREPARE_TIMEOUT_S)
        if not barrier.done:
            barrier.on_timeout()
        if barrier.error is not None:
            down = set(self.supervisor.dead())  # (a restarted worker starts with an empty queue)
            self._ask_workers(M.ABORT, {w: {} for w in barrier.by_worker if w not in down})
            raise E.CheckpointAbortedError(f"checkpoint {user_id!r} aborted: {barrier.error}")
        return CheckpointData(user_id, time.time_ns(), self.shard_count, tuple(barrier.offsets))

    def checkpoint(self, raw_id: bytes) -> dict:
        user_id = check_checkpoint_id(raw_id)
        if user_id in self.ckpt_log:
            raise E.CheckpointExistsError(
                f"checkpoint {user_id!r} already exists; an id is not reused while the log holds it "
                f"(a create_checkpoint that got no answer may have written it: load_checkpoint shows it)")
        barrier = self._start_barrier(user_id, self.cut())
        head = None
        try:
            # HEAD's replacement is written while the workers prepare, once the PREPAREs are out
            head = self.ckpt_log.prepare_head(user_id)
            data = self._finish_barrier(user_id, barrier)
        except BaseException:
            if head is None:  # the barrier was never awaited: its PREPAREs still need an end
                self._ask_workers(M.ABORT, {w: {} for w in barrier.by_worker})
            else:
                self.ckpt_log.discard_head(head)
            raise
        self.ckpt_log.append(data, head)
        return {"id": user_id, "timestamp": data.timestamp, "offsets": list(data.offsets)}

    def _tell_committed(self, user_id: bytes) -> None:
        """COMMIT to the workers, after the caller has its answer: a notification only."""
        try:
            self._ask_workers(M.COMMIT, {w: {} for w in set(self.worker_of)})
        except Exception as exc:  # (the caller has had its answer: nothing may reply again)
            log.warning("checkpoint %r committed, but telling the workers failed: %s", user_id, exc)

    def prune(self, raw_id: bytes) -> dict:
        data = self.ckpt_log.get(check_checkpoint_id(raw_id))
        if data.shard_count != self.shard_count:  # (a log written elsewhere: its offsets are not ours)
            raise E.ShardCountMismatchError(
                self.shard_count, data.shard_count,
                f"checkpoint {data.user_id!r} records {data.shard_count} shards, this WAL has {self.shard_count}; "
                "nothing was pruned")
        why = self._unable_to_answer()
        if why is not None:
            raise E.WorkerFailedError(f"nothing was pruned: {why}")
        per_worker: Dict[int, dict] = {}
        for shard, off in enumerate(data.offsets):
            per_worker.setdefault(self.worker_of[shard], {"offsets": {}})["offsets"][shard] = off
        req = self._ask_workers(M.TRUNCATE, per_worker)
        waiting = set(per_worker)
        sent_to = {w: self.supervisor.restarts[w] for w in per_worker}  # which process of each was asked
        resent: Set[int] = set()
        deleted: Dict[int, int] = {}
        errors: List[str] = []

        def after_a_death() -> None:
            # Truncation is idempotent, and a restart drops what was queued for the dead process,
            # so a worker that died during the prune is restarted and its successor asked again,
            # once; a worker given up on, still backing off or dying again fails the prune.
            self._restart_dead(wait_s=MAX_BACKOFF_S + 0.1)
            dead = set(self.supervisor.dead())
            for w in sorted(waiting):
                restarted = self.supervisor.restarts[w] != sent_to[w]
                if restarted and w not in resent:
                    resent.add(w)
                    sent_to[w] = self.supervisor.restarts[w]
                    self.worker_queues[w].send(M.Message(M.TRUNCATE, 0, req, per_worker[w]))
                    self.wakes[w].release()
                elif restarted or w in dead or self.supervisor.procs[w] is None:
                    if w in resent:
                        errors.append(f"worker {w} died again after a restart")
                    elif self.supervisor.procs[w] is None:
                        errors.append(f"worker {w} died and was given up on (its shards are failed)")
                    else:
                        errors.append(f"worker {w} died ({self.supervisor.exit_status(w)}) and is not restarted yet")
                    waiting.discard(w)

        def on_reply(reply: Optional[M.Message]) -> None:
            if reply is None:
                errors.append(f"workers {sorted(waiting)} did not answer")
                waiting.clear()
            elif reply.sender not in waiting:
                return
            elif reply.req_id == req and reply.kind == M.TRUNCATED:
                deleted.update({int(k): v for k, v in reply.body["deleted"].items()})
                waiting.discard(reply.sender)
            elif reply.kind == M.FAILED and reply.body.get("died"):
                after_a_death()
            elif reply.kind == M.FAILED and reply.req_id == req:
                errors.append(reply.body.get("error", "?"))
                waiting.discard(reply.sender)

        self._await(on_reply, lambda: not waiting, PREPARE_TIMEOUT_S)
        if errors:
            raise E.WorkerFailedError("prune failed: " + "; ".join(errors))
        return {"shards_pruned": sum(1 for n in deleted.values() if n), "segments_deleted": sum(deleted.values())}

    # --- shut-down ----------------------------------------------------------------------------

    def shutdown(self) -> None:
        if not self.lock.held:
            return  # never touch the objects of a coordinator we did not replace
        if self.ctl is None:
            # failed before creating anything (refused MANIFEST, bad checkpoint log...): what is
            # there is an earlier run's, maybe rings of acknowledged records; the next start sorts it
            for ring in self.kept.values():
                ring.close()
            self._forget_new_manifest()
            self.lock.release()
            return
        if self.ctl is not None:
            self.ctl.f[C.STATE] = C.ST_CLOSING
        if self.supervisor is not None:
            for w, q in enumerate(self.worker_queues):
                try:
                    q.send(M.Message(M.STOP, 0, 0, {}), timeout=1.0)
                    self.wakes[w].release()
                except E.WalError:
                    pass
            self.supervisor.wait_all(STOP_TIMEOUT_S)
        # (kept rings not yet taken into self.rings, should creating the rest have failed)
        self.kept = {s: r for s, r in self.kept.items() if r not in self.rings}
        for ring in self.rings:
            ring.acquire()
            try:
                failed = ring.header[L.STATE] == L.ST_FAILED
                unresumable = failed and ring.header[L.ERRNO] == L.ERR_CANNOT_RESUME
                if not failed:
                    ring.set_state(L.ST_CLOSED)
                tail = ring.published()[0]
            finally:
                ring.release()
            head, _ = ring.restore_head()
            if head < tail:  # a worker died before draining: keep its records for the next open
                log.error("shard %d: %d bytes of acknowledged records are not on disk yet; their ring is "
                          "kept and the next open writes them", ring.shard, tail - head)
                self.kept[ring.shard] = ring
            elif unresumable:  # it alone remembers which ids were handed out (Worker.resume)
                log.error("shard %d could not resume; its ring is kept for the next open", ring.shard)
                self.kept[ring.shard] = ring
            ring.wake_durable_waiters()
        if self.ctl is not None:
            self.ctl.f[C.STATE] = C.ST_CLOSED
        self._remove_ipc()
        self._forget_new_manifest()
        self.lock.release()

    def _forget_new_manifest(self) -> None:
        """After a failed start, take back the MANIFEST it wrote if nothing else was made: a
        retry (perhaps with another shard count) then finds a directory with no sharded WAL."""
        if not self._new_manifest:
            return
        self._new_manifest = False
        try:
            discard_unused_manifest(self.root)
        except OSError as exc:
            log.warning("could not remove the MANIFEST a failed start wrote in %s: %s", self.root, exc)

    def _remove_ipc(self) -> None:
        for ring in self.rings:
            if ring.shard not in self.kept:
                ring.unlink()
            ring.close()
        for q in [self.requests, self.worker_replies, *self.worker_queues]:
            if q is not None:
                q.unlink()
                q.close()
        for token in list(self._reply_queues):
            self._forget_queue(token)
        for token in self.clients:
            Queue.unlink_name(self.names.client_queue(token))
        for sem in self.wakes:
            try:
                sem.unlink()
            except Exception:
                pass
        if self.ctl is not None:
            self.ctl.unlink()
        self.names.remove_all(keep=[r for s in self.kept for r in Ring.object_names(self.names, s)])


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coordinator", description="ironwal_mp coordinator")
    parser.add_argument("--root", required=True)
    parser.add_argument("--shards", type=int, required=True)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--ring-size", type=int, required=True)
    parser.add_argument("--flush-interval-us", type=int, default=C.DEFAULT_FLUSH_US,
                        help="longest time an ASYNC entry stays written but not fsynced")
    parser.add_argument("--no-idle-flush", action="store_true",
                        help="workers do not fsync as soon as their rings go quiet")
    parser.add_argument("--notify", type=lambda s: int(s, 16), default=None, help="client queue token to tell READY/ERROR")
    parser.add_argument("--starter", type=int, default=0, help="pid whose exit shuts this WAL down")
    args = parser.parse_args(argv)
    if not 0 <= args.workers <= C.MAX_WORKERS:  # (the control block's worker table)
        parser.error(f"--workers must be in 1..{C.MAX_WORKERS} (0: one per CPU), got {args.workers}")
    try:  # (before anything is written: a bad size would fail only once MANIFEST and LOCK exist)
        L.check_capacity(args.ring_size)
    except ValueError as exc:
        parser.error(f"--ring-size: {exc}")
    logging.basicConfig(level=os.environ.get("IRONWAL_MP_LOG", "WARNING"),
                        format="coordinator [%(process)d] %(levelname)s %(message)s")
    root = os.path.abspath(args.root)
    workers = args.workers or min(args.shards, os.cpu_count() or 1, C.MAX_WORKERS)
    coord = Coordinator(root, args.shards, workers, args.ring_size,
                        os.environ.get("IRONWAL_MP_OPTIONS", json.dumps({"root_path": root})), args.starter,
                        args.notify, max(100, args.flush_interval_us), not args.no_idle_flush)
    notify = M.Message(M.READY, 0, 0, {})

    def tell(kind: int, body: dict) -> None:
        if args.notify is None:
            return
        try:
            q = Queue(coord.names.client_queue(args.notify))
            q.send(M.Message(kind, 0, 0, body), timeout=5.0)
            q.close()
        except Exception:
            pass

    # stop signals are taken by the loop (_take_stop_signals), which can see who sent them;
    # the workers this process starts inherit the mask, and unblock (and ignore) them
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        try:
            coord.start()
        except StartupError as exc:
            err = exc.error
            tell(M.ERROR, M.error_body(err))
            if args.notify is None:  # started by hand: nobody else would see why
                log.error("cannot serve %s: %s: %s", root, type(err).__name__, err)
            return M.EXIT_LOCKED if isinstance(err, E.WalLockedError) else 1
        tell(M.READY, {"shard_count": coord.shard_count, "workers": len(coord.assignment), "pid": os.getpid()})
        del notify
        coord.serve()
        return 0
    finally:
        try:
            coord.shutdown()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)  # (serve runs this in the CLI's process)


if __name__ == "__main__":
    sys.exit(main())
