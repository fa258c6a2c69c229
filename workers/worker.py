"""The shard worker: ring -> engine frames -> fsync (group commit) -> watermarks.

One process owns whole shards. For each it opens the shard's engine stream (recovering its
tail), resumes the ring where the disk ends, then loops: take each run of published records as
one frame payload, write it through the engine, and fsync when somebody waits for durability
(or the flush interval passes), publishing the durable id and waking the waiters. Control
messages from the coordinator (prepare, truncate, stop) are served between passes.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

import posix_ipc

from ironwal_mp.engine.group_sync import GroupSyncer
from ironwal_mp.engine.stream import Stream
from ironwal_mp.engine.wal import Wal
from ironwal_mp.errors import WalError, WorkerFailedError
from ironwal_mp.ipc import messages as M
from ironwal_mp.ipc import ring_layout as L
from ironwal_mp.ipc import control as C
from ironwal_mp.ipc.fdlimit import ensure_descriptors
from ironwal_mp.ipc.control import ControlBlock
from ironwal_mp.ipc.names import Names
from ironwal_mp.ipc.queues import Queue
from ironwal_mp.ipc.ring import Ring
from ironwal_mp.options import options_from_dict
from ironwal_mp.sharded.manifest import shard_stream

log = logging.getLogger("ironwal_mp.worker")

#: longest sleep when idle: bounds how late a coordinator's death or a flush is noticed
IDLE_WAIT_S = 0.05
#: with the idle flush on, dirty shards are fsynced once the worker has had nothing to write
#: for this long (the rings went quiet); else, the flush interval after they were written
IDLE_FLUSH_S = 0.0002
#: after a small pass, wait this long for more records so frames grow (fewer, larger writes)
GATHER_S = 0.0005
#: a prepare gives up if the records below its cut cannot be drained in this long
PREPARE_DRAIN_S = 20.0
#: bytes kept of each string of a start-up ERROR: the coordinator reads P_wrep only once it
#: sees the worker dead, so the message must fit the queue's free parts (the log has it whole)
START_ERROR_TEXT = 1024


class ShardState:
    """One owned shard: its ring and its engine stream."""

    def __init__(self, shard: int, ring: Ring, stream: Stream) -> None:
        self.shard = shard
        self.ring = ring
        self.h = ring.header
        self.stream = stream
        self.dirty_since = 0.0  # monotonic time of the oldest written-but-not-durable frame


class Worker:
    def __init__(self, root: str, shards: List[int], index: int, opts_dict: dict) -> None:
        self.root = root
        self.index = index
        self.names = Names(root)
        self.opts = options_from_dict(opts_dict)
        ctl = ControlBlock(self.names)
        # the coordinator that started us; if it died before we got here, getppid() already differs
        self.parent = ctl.coordinator_pid
        if os.getppid() != self.parent:
            # a worker whose coordinator died while it started may find a successor's control
            # block: those shards are (about to be) another worker's, so touch nothing
            ctl.close()
            raise WorkerFailedError(
                f"this worker's parent (pid {os.getppid()}) is not the coordinator of {root} "
                f"(pid {self.parent}): refusing to open shards another worker may own")
        # written-but-not-durable entries are fsynced at most this long after they were written
        self.flush_interval = (ctl.f[C.FLUSH_US] or C.DEFAULT_FLUSH_US) / 1e6
        self.idle_flush = not ctl.f[C.IDLE_FLUSH_OFF]
        epoch = ctl.epoch
        ctl.close()
        ensure_descriptors(len(shards))
        self.wal = Wal(self.opts, lock=False)  # the coordinator holds <root>/LOCK for us
        self.shards: Dict[int, ShardState] = {}
        for shard in shards:
            ring = Ring(self.names, shard)
            ring.epoch = epoch
            stream = self.wal.open_stream(shard_stream(shard))
            self.shards[shard] = ShardState(shard, ring, stream)
        self.commands = Queue(self.names.worker_queue(index))
        self.replies = Queue(self.names.worker_replies)
        self.wake = next(iter(self.shards.values())).ring.data_ready
        self.pool = ThreadPoolExecutor(max_workers=min(8, len(shards))) if len(shards) > 1 else None
        self.syncer = GroupSyncer(self.opts.group_sync, self.pool)
        self.stopping = False
        self.gather = self.opts.write_buffer_size
        self._stopped = False

    # --- start --------------------------------------------------------------------------

    def resume(self) -> None:
        """Line each ring up with what the disk holds, then open it for producers."""
        for st in self.shards.values():
            h, ring, on_disk = st.h, st.ring, st.stream.next_id
            # a worker killed inside a prune deleted files without telling readers (the bump in
            # the TRUNCATE handler's finally never ran): they would go on serving pruned entries
            # from descriptors of deleted files; one bump per start makes them list the files again
            h[L.PRUNES] += 1
            if on_disk > L.SEQ_LIMIT:  # (crafted files only: ids start at 0)
                log.warning("shard %d: its files reach id %d, the last u64 id, which a ring cannot "
                            "show: it is not readable through the sharded layer, and appends are refused",
                            st.shard, on_disk - 1)
                on_disk = L.SEQ_LIMIT
            h[L.WORKER_PID] = os.getpid()
            ring.reset_view_lock()
            ring.acquire()
            try:
                tail, next_seq, _, _ = ring.published()
                head, head_seq = ring.restore_head()
                action, why = L.resume_action(h[L.STATE], head_seq, next_seq, head < tail, on_disk)
                if action == "fail":  # (under the lock: nothing is published into it after this)
                    ring.set_state(L.ST_FAILED)
                elif action == "fresh":
                    if h[L.STATE] != L.ST_NEW:
                        log.warning("shard %d: ring ids %d..%d are all on disk, which reaches %d; "
                                    "starting the ring afresh", st.shard, head_seq, next_seq, on_disk)
                    base = L.slot_base(h[L.GEN])
                    h[base + L.NEXT_SEQ] = on_disk
                    # every change to a slot moves GEN (by 2 here: the same slot stays current),
                    # so a producer's cached copy of the slot is known to be stale
                    h[L.GEN] += 2
                    ring.set_head(tail, on_disk)
            finally:
                ring.release()
            if action == "fail":  # readers see what the files hold; writers get WorkerFailedError
                self._publish_durable(st, st.stream.view())
                self._fail(st, WalError(f"shard {st.shard}: cannot resume: {why}. To accept the loss "
                                        f"instead, stop the WAL and remove /dev/shm{ring.names.ring(st.shard)}"),
                           L.ERR_CANNOT_RESUME)
                continue
            if action == "resume":
                skipped = ring.skip_records(on_disk)
                h[L.RESTARTS] += 1
                log.info("shard %d: resumed at id %d (skipped %d records already on disk)", st.shard, on_disk, skipped)
            h[L.WRITTEN_SEQ] = on_disk
            self._publish_durable(st, st.stream.view())
            h[L.ERRNO] = 0
            ring.set_state(L.ST_OPEN)

    # --- the loop -----------------------------------------------------------------------

    def run(self) -> int:
        self.resume()
        while not self.stopping:
            wrote = 0
            for st in self.shards.values():
                wrote += self._drain(st)
            waited = self._durable_waiters()  # somebody blocks on this pass: no gathering after it
            self._sync_if_needed()
            self._serve_commands()
            if os.getppid() != self.parent:
                log.warning("coordinator %d is gone: draining and stopping", self.parent)
                self.stop()
                break
            if wrote == 0:
                self._sleep()
            elif wrote < self.gather and not waited:
                self._pause(GATHER_S)
        return 0

    def _drain(self, st: ShardState) -> int:
        """Write every published run of records of one shard; return the bytes written."""
        ring, h, stream = st.ring, st.h, st.stream
        if h[L.STATE] == L.ST_FAILED:
            return 0
        written = 0
        while True:
            s = ring.next_slice()
            if s is None:
                return written
            if s.offset + s.length > ring.capacity:  # never write a frame from a torn view
                self._fail(st, WalError(f"ring slice {s} runs past the end of the ring"))
                return written
            if s.count:
                payload = bytes(ring.data[s.offset : s.offset + s.length])
                try:
                    first = stream.append_payload(payload, s.count, trusted=True)
                except (WalError, OSError) as exc:
                    self._fail(st, exc)
                    return written
                if first != s.first_seq:
                    self._fail(st, WalError(f"ring id {s.first_seq} was written as id {first}"))
                    return written
                h[L.FRAMES] += 1
                h[L.ENTRIES] += s.count
                h[L.BYTES_WRITTEN] += s.length
                written += s.length
                if not st.dirty_since:
                    st.dirty_since = time.monotonic()
            ring.consume(s)
            h[L.WRITTEN_SEQ] = s.first_seq + s.count

    def _durable_waiters(self) -> bool:
        return any(st.h[L.DUR_WAITERS] for st in self.shards.values())

    def _dirty(self) -> List[ShardState]:
        """Shards with written entries that are not durable yet (a failed shard is never synced)."""
        return [st for st in self.shards.values()
                if st.h[L.WRITTEN_SEQ] > st.h[L.DURABLE_SEQ] and st.h[L.STATE] != L.ST_FAILED]

    def _sync_if_needed(self, force: bool = False) -> None:
        now = time.monotonic()
        due = [st for st in self._dirty()
               if force or st.h[L.DUR_WAITERS] or now - st.dirty_since >= self.flush_interval]
        if due:
            self.sync(due)

    def sync(self, states: List[ShardState]) -> None:
        """Make the given shards durable together (group_sync), then publish their durable ids."""
        views = [st.stream.view() for st in states]
        started = time.perf_counter_ns()
        results = self.syncer.sync([st.stream for st in states])
        elapsed = time.perf_counter_ns() - started
        for st, view, err in zip(states, views, results):
            if err is not None:
                self._fail(st, err)
                continue
            st.h[L.FSYNCS] += 1
            st.h[L.FSYNC_NS] += elapsed
            st.h[L.LAST_FSYNC_NS] = elapsed
            st.dirty_since = 0.0
            self._publish_durable(st, view)

    def _publish_durable(self, st: ShardState, view) -> None:
        seg = view.segments[-1] if view.segments else view.next_id
        next_id = min(view.next_id, L.SEQ_LIMIT)  # (u64 fields: see resume)
        st.ring.set_view(seg, view.active_size, next_id)
        st.h[L.DURABLE_SEQ] = next_id
        st.ring.wake_durable_waiters()

    def _fail(self, st: ShardState, exc: BaseException, code: int = 0) -> None:
        log.error("shard %d failed: %s", st.shard, exc)
        st.h[L.ERRNO] = code or L.error_errno(getattr(exc, "errno", None)) or errno.EIO
        st.ring.set_state(L.ST_FAILED)
        st.ring.wake_durable_waiters()
        for _ in range(8):
            st.ring.space_free.release()

    def _sleep(self) -> None:
        """Wait for a publish or a command; flush dirty shards once the rings have gone quiet
        (idle flush), or else when their flush interval is up."""
        dirty = self._dirty()
        if not dirty:
            wait = IDLE_WAIT_S
        elif self.idle_flush:
            wait = IDLE_FLUSH_S
        else:
            due = min(st.dirty_since for st in dirty) + self.flush_interval
            wait = max(0.0, min(IDLE_WAIT_S, due - time.monotonic()))
        for st in self.shards.values():
            st.h[L.SLEEPING] = 1
        try:
            # re-check after raising the flag, or a publish in between would go unnoticed. The
            # flag stores must be visible before the re-check's loads (x86 may pass a load
            # ahead of an earlier store): a semaphore post is a locked instruction, a full
            # barrier; the try-wait takes the post back. (Producers get theirs from the
            # ring-lock release between their publish and their look at the flag.)
            self.wake.release()
            self._pause(0)
            if any(st.ring.next_slice() is not None for st in self.shards.values()):
                return
            woken = self._pause(wait)
        finally:
            for st in self.shards.values():
                st.h[L.SLEEPING] = 0
        if dirty and not woken:
            # nothing arrived: make what was written durable now rather than a flush interval
            # later, so ASYNC data is exposed to a crash briefly and checkpoints find it synced
            self._sync_if_needed(force=self.idle_flush)

    def _pause(self, seconds: float) -> bool:
        """Wait on the wake semaphore (posted by sleeping-aware producers and after every
        command); return whether it was posted."""
        try:
            self.wake.acquire(seconds)
            return True
        except (posix_ipc.BusyError, posix_ipc.SignalError):  # the timeout, or a signal
            return False

    # --- commands -----------------------------------------------------------------------

    def _serve_commands(self) -> None:
        while True:
            try:
                msg = self.commands.receive(0)
            except ValueError as exc:  # a malformed part: drop it, keep serving
                log.warning("dropped a control message: %s", exc)
                continue
            if msg is None:
                return
            self._handle(msg)

    def _reply(self, kind: int, req_id: int, body: dict) -> None:
        try:
            self.replies.send(M.Message(kind, self.index, req_id, body), alive=self._coordinator_alive)
        except WalError as exc:
            # the coordinator is gone (the loop notices) or has not read for the queue's limit:
            # its request times out there. Serving the rings goes on either way.
            log.warning("reply %s to request %d lost: %s", M.KIND_NAMES.get(kind, kind), req_id, exc)

    def _coordinator_alive(self) -> None:
        if os.getppid() != self.parent:
            raise WalError("coordinator is gone")

    def _handle(self, msg: M.Message) -> None:
        if msg.kind == M.PREPARE:
            cuts = {int(k): v for k, v in msg.body["cuts"].items()}
            try:
                durable = self.prepare(cuts)
            except (WalError, OSError) as exc:
                self._reply(M.FAILED, msg.req_id, {"error": str(exc)})
                return
            self._reply(M.PREPARED, msg.req_id, {"durable": durable})
        elif msg.kind == M.TRUNCATE:
            deleted = {}
            try:
                for shard, below in msg.body["offsets"].items():
                    st = self.shards[int(shard)]
                    before = st.stream.segment_count
                    try:
                        deleted[int(shard)] = st.stream.truncate(below)
                    finally:  # (also when it failed after deleting some)
                        if st.stream.segment_count != before:
                            st.h[L.PRUNES] += 1  # readers elsewhere drop their files of those segments
            except (WalError, OSError) as exc:
                self._reply(M.FAILED, msg.req_id, {"error": str(exc)})
                return
            self._reply(M.TRUNCATED, msg.req_id, {"deleted": deleted})
        elif msg.kind == M.STOP:
            self.stop()  # no reply: the coordinator waits for this process to exit
        # COMMIT and ABORT need no action: prepare only made data durable, which stays true

    def prepare(self, cuts: Dict[int, int]) -> Dict[int, int]:
        """Make every id below each shard's cut durable; return the durable ids."""
        deadline = time.monotonic() + PREPARE_DRAIN_S
        for shard, cut in cuts.items():
            st = self.shards[shard]
            while st.h[L.WRITTEN_SEQ] < cut:
                if st.h[L.STATE] == L.ST_FAILED:
                    raise WalError(f"shard {shard} has failed")
                if time.monotonic() > deadline or self.stopping or os.getppid() != self.parent:
                    raise WalError(f"shard {shard}: ids below the cut {cut} never reached the ring's head")
                if not self._drain(st):
                    time.sleep(0.0005)
        due = [self.shards[s] for s, cut in cuts.items() if self.shards[s].h[L.DURABLE_SEQ] < cut]
        if due:
            self.sync(due)
        out = {}
        for shard, cut in cuts.items():
            h = self.shards[shard].h
            if h[L.STATE] == L.ST_FAILED or h[L.DURABLE_SEQ] < cut:
                raise WalError(f"shard {shard} could not be made durable up to id {cut}")
            out[shard] = h[L.DURABLE_SEQ]
        return out

    def stop(self) -> None:
        """Close the rings to producers, drain what they published, fsync, and mark closed."""
        if self._stopped:
            return
        self._stopped = True
        self.stopping = True
        for st in self.shards.values():
            st.ring.acquire()
            if st.h[L.STATE] == L.ST_OPEN:
                st.ring.set_state(L.ST_CLOSING)
            st.ring.release()
        for st in self.shards.values():
            self._drain(st)
        self._sync_if_needed(force=True)
        for st in self.shards.values():
            if st.h[L.STATE] != L.ST_FAILED:
                st.ring.set_state(L.ST_CLOSED)
            st.ring.wake_durable_waiters()
            for _ in range(8):
                st.ring.space_free.release()

    def close(self) -> None:
        self.syncer.close()
        if self.pool:
            self.pool.shutdown()
        try:
            self.wal.close()  # (stop() has synced; an error here was the shard's to report)
        except WalError as exc:
            log.error("closing the shards' files: %s", exc)
        finally:
            for st in self.shards.values():
                st.ring.close()
            self.commands.close()
            self.replies.close()


def _coordinator_gone(root: str) -> bool:
    """Whether the coordinator that started this process is gone: our parent is no longer the
    one the control block names, or the block itself was removed (a coordinator, alive, is
    always the parent of its workers and keeps its block until they have exited)."""
    ctl = ControlBlock.try_open(Names(root))
    if ctl is None:
        return True
    try:
        return ctl.coordinator_pid != os.getppid()
    finally:
        ctl.close()


def _report_start_error(root: str, index: int, exc: WalError) -> None:
    """Tell the coordinator why this worker could not open its shards (an ERROR on the reply
    queue, PROTOCOL §10), so that a start fails with that error (a full disk: DiskFullError),
    not only with this process's exit status. Best effort: the exit is what it waits on."""
    try:
        replies = Queue(Names(root).worker_replies)
    except posix_ipc.Error:
        return
    try:
        body = M.error_body(exc, text_limit=START_ERROR_TEXT)
        replies.send(M.Message(M.ERROR, index, 0, body), timeout=1.0)
    except (WalError, posix_ipc.Error):
        pass
    finally:
        replies.close()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers", description="ironwal_mp shard worker")
    parser.add_argument("--root", required=True)
    parser.add_argument("--shards", required=True, help="comma-separated shard numbers")
    parser.add_argument("--index", type=int, required=True, help="this worker's number")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("IRONWAL_MP_LOG", "WARNING"),
                        format=f"worker {args.index} [%(process)d] %(levelname)s %(message)s")
    # Ctrl-C and a service manager's SIGTERM reach every process of the group: the coordinator
    # decides (it sends STOP); a worker also stops when its coordinator is gone
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})  # (inherited blocked)
    opts = json.loads(os.environ["IRONWAL_MP_OPTIONS"])
    root = os.path.abspath(args.root)
    try:
        worker = Worker(root, [int(s) for s in args.shards.split(",")], args.index, opts)
    except Exception as exc:
        if _coordinator_gone(root):
            # (killed while starting: its objects may be gone too; the next start clears the rest)
            log.warning("the coordinator of %s is gone while this worker started; exiting (%s)", root, exc)
            return 1
        if not isinstance(exc, WalError):
            raise  # (a bug: its traceback is what helps)
        log.error("cannot open shards %s: %s", args.shards, exc)
        _report_start_error(root, args.index, exc)
        return 1
    try:
        worker.run()  # (it returns only through stop(): a STOP, or the coordinator gone)
    finally:
        worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
