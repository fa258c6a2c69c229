"""A shard's ring in POSIX shared memory: producers publish records, the worker drains them.

The byte layout and all position arithmetic live in :mod:`ring_layout`; this module maps the
memory and implements the two sides of the protocol (docs/PROTOCOL.md, "Ring").

Producers serialise on the ring lock (a named semaphore). The holder records its pid, so a
producer killed while holding the lock can be detected and the lock repaired: a publish only
becomes visible with its final GEN store, so a dead holder's half-copied bytes are simply never
published. The worker is the single writer of the worker line; producers only read it.

Raising signal handlers. CPython runs a signal handler at the next call (or loop jump) of the
main thread, and a handler that raises (a timeout, KeyboardInterrupt) raises there. On the
paths appending processes run, the ring lock is therefore held by the pattern: ``acquire()``
stores HOLDER as its last step; the caller's ``try`` follows at once; the ``finally`` clears
HOLDER before anything else and calls nothing Python-level before posting the semaphore. An
exception can then leave the lock held only with HOLDER 0, which the next waiter repairs
after STUCK_S, never with this live pid recorded, which nobody would repair.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import struct
import time
from typing import Callable, Optional

import posix_ipc

from ..errors import RecordTooLargeError, SharedMemoryError, WalClosedError, WalIOError, WorkerFailedError
from . import ring_layout as L
from .names import Names, create_shm
from .trylock import open_trylock

_LEN = struct.Struct("<I")
_pack_len = _LEN.pack_into
_unpack_len = _LEN.unpack_from

#: how long one wait on a semaphore lasts before the waiter re-checks liveness
POLL_S = 0.05
#: a lock held this long with no holder recorded and no progress is taken as orphaned
STUCK_S = 1.0
#: a waiter count that stays unchanged with nobody able to wait, this long, is cleared
STALE_S = 1.0
#: how long close() waits for this process's other threads to leave the ring's semaphores
CLOSE_WAIT_S = 2.0
#: the least time a waiter waits for the lock to take itself back out of a count: its own
#: timeout may be spent (or zero), and a count left one too high makes the worker sync on
#: every pass until the stale-count clear
UNCOUNT_MIN_S = 2 * STUCK_S


#: where Linux keeps POSIX shared memory (a ring's name starts with "/")
_SHM_DIR = "/dev/shm"
#: descriptors this process holds a repair lock through (see Ring._repair_acquire)
_REPAIR_FDS: set = set()


def _close_repair_fds_in_child() -> None:
    """A child forked while a thread of its parent repairs must not keep that repair lock (an
    flock belongs to the open file description, which the fork shared)."""
    for fd in list(_REPAIR_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _REPAIR_FDS.clear()


os.register_at_fork(after_in_child=_close_repair_fds_in_child)


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child still "exists"; treat it as dead. The name in parentheses may itself
    # contain ") ", so the state letter follows the *last* one.
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b") ", 1)[1][:1] != b"Z"
    except (OSError, IndexError):
        return True


def _open_sem(name: str, create: bool, initial: int) -> posix_ipc.Semaphore:
    flags = posix_ipc.O_CREX if create else 0
    try:
        return posix_ipc.Semaphore(name, flags, initial_value=initial)
    except posix_ipc.ExistentialError:
        if create:  # stale object from a crashed run
            posix_ipc.unlink_semaphore(name)
            return posix_ipc.Semaphore(name, posix_ipc.O_CREX, initial_value=initial)
        raise


class Ring:
    """One shard's ring, attached in this process (create=True: the coordinator creates it)."""

    def __init__(
        self, names: Names, shard: int, *, capacity: int = 0, worker: int = 0, create: bool = False,
        wake: bool = True,
    ) -> None:
        self.shard = shard
        self.names = names
        name = names.ring(shard)
        if create:
            L.check_capacity(capacity)
            size = L.HEADER_BYTES + capacity
            try:
                shm = create_shm(name, size)  # (every page allocated: no SIGBUS later)
            except OSError as exc:
                raise _shm_error(name, size, exc) from exc
        else:
            shm = posix_ipc.SharedMemory(name)
            size = shm.size
        self._mm = mmap.mmap(shm.fd, size)  # (mmap keeps a descriptor of its own)
        st = os.fstat(shm.fd)
        shm.close_fd()
        #: the shared-memory file, and its identity, for the repair lock (see _repair_acquire)
        self._shm_path = _SHM_DIR + name
        self._shm_id = (st.st_dev, st.st_ino)
        self._h = memoryview(self._mm)[: L.HEADER_BYTES].cast("Q")
        self.data = memoryview(self._mm)[L.HEADER_BYTES :]
        h = self._h
        if create:
            h[L.MAGIC] = L.RING_MAGIC
            h[L.VERSION] = L.RING_VERSION
            h[L.CAPACITY] = capacity
            h[L.SHARD] = shard
            h[L.WORKER_IDX] = worker
            h[L.SLOT0 + L.WRAP_POS] = L.WRAP_NONE
            h[L.SLOT1 + L.WRAP_POS] = L.WRAP_NONE
            h[L.STATE] = L.ST_NEW
        elif h[L.MAGIC] != L.RING_MAGIC or h[L.VERSION] != L.RING_VERSION:
            raise SharedMemoryError(f"{name} is not an ironwal_mp ring of version {L.RING_VERSION}")
        self.capacity = h[L.CAPACITY]
        self.mask = self.capacity - 1
        self.lock = _open_sem(names.ring_lock(shard), create, 1)
        # one wake-up semaphore per worker, shared by its rings; the coordinator creates it
        # (a ring it creates, it may create it for); attachers never re-create a removed one
        # (``wake=False``: the coordinator looking at a leftover ring needs no wake-up)
        wake_flags = posix_ipc.O_CREAT if create else 0
        self.data_ready = (
            posix_ipc.Semaphore(names.worker_wake(h[L.WORKER_IDX]), wake_flags) if wake else None
        )
        self.space_free = _open_sem(names.space_free(shard), create, 0)
        self.durable_sem = _open_sem(names.durable(shard), create, 0)
        self._pid = os.getpid()
        self._stale_next = 0.0
        self._stale: Optional[tuple] = None
        self._unclaimed_since: Optional[float] = None
        #: called while waiting, to raise if the WAL is gone (set by the client)
        self.liveness: Optional[Callable[[], None]] = None
        #: the EPOCH of the coordinator this process serves or attached to (set by the worker
        #: and the client before use): records are published only into a ring open under it
        self.epoch = 0
        # One item per call of this process inside a semaphore wait (list.append and pop are
        # atomic under the GIL): close() must not sem_close under a waiting thread. The
        # single-record fast path never waits there and is not counted (see close()).
        self._busy: list = []
        self._closing = False
        self._sems_closed = False

    @property
    def header(self) -> memoryview:
        return self._h

    def close(self, release_memory: bool = True) -> None:
        """Detach from the ring's memory and semaphores.

        Other threads of this process may be waiting on its semaphores: they are told to stop
        (WalClosedError) and the semaphores are closed only once none is inside a wait (sem_close
        under a waiter is a use-after-free). ``release_memory=False`` leaves the mapping to
        reference counting, for callers whose other threads may still be on the append fast
        path (a view released under it would leave the ring lock held for good).
        """
        self._closing = True
        self.liveness = None  # (also breaks the client's ring <-> attachment cycle)
        deadline = time.monotonic() + CLOSE_WAIT_S
        while self._busy and time.monotonic() < deadline:
            time.sleep(0.001)
        if self._busy:
            return  # a thread is stuck inside a wait: leave all of it to the process's exit
        self._sems_closed = True
        for sem in (self.lock, self.data_ready, self.space_free, self.durable_sem):
            if sem is None:
                continue
            try:
                sem.close()
            except posix_ipc.Error:
                pass
        if not release_memory:
            return
        try:
            self._h.release()
            self.data.release()
            self._mm.close()
        except (BufferError, ValueError):
            pass  # a view is still exported somewhere; the mapping goes with the process

    def set_state(self, state: int) -> None:
        """Store ``state`` with its OPEN_EPOCH (this ring's ``epoch`` when OPEN, else 0), in
        the order that never shows an open epoch beside another state."""
        h = self._h
        if state == L.ST_OPEN:
            h[L.STATE] = state
            h[L.OPEN_EPOCH] = self.epoch
        else:
            h[L.OPEN_EPOCH] = 0
            h[L.STATE] = state

    def _closed_error(self) -> WalClosedError:
        return WalClosedError(f"shard {self.shard}: this process closed its handle on the ring")

    def _enter(self) -> None:
        """Count this call as inside the ring's semaphores (pair with ``_busy.pop()``)."""
        self._busy.append(None)
        if self._closing:  # (checked after counting: close() either waits for us or we see it)
            self._busy.pop()
            raise self._closed_error()

    @staticmethod
    def object_names(names: Names, shard: int) -> list[str]:
        """Names of the shared memory and semaphores of one shard's ring."""
        return [names.ring(shard), names.ring_lock(shard), names.space_free(shard), names.durable(shard)]

    @staticmethod
    def unlink_names(names: Names, shard: int) -> None:
        shm, *sems = Ring.object_names(names, shard)
        for fn, name in [(posix_ipc.unlink_shared_memory, shm)] + [(posix_ipc.unlink_semaphore, s) for s in sems]:
            try:
                fn(name)
            except posix_ipc.ExistentialError:
                pass

    def unlink(self) -> None:
        Ring.unlink_names(self.names, self.shard)

    # --- the ring lock ------------------------------------------------------------------

    def acquire(self, timeout: float = 30.0, cleanup: bool = False) -> None:
        """Take the ring lock; repair it if its holder died. Raises WorkerFailedError on timeout.

        ``cleanup``: the bookkeeping of a call already counted, which must still run (and may)
        after close() began: not refused for closing.
        """
        busy = self._busy
        busy.append(None)
        try:
            if self._closing and not cleanup:
                raise self._closed_error()
            try:
                self.lock.acquire(0)
            except posix_ipc.BusyError:
                self._acquire_wait(timeout, cleanup)
        finally:
            busy.pop()
        h = self._h  # (the pid last, and no call after it: see "Raising signal handlers" above)
        h[L.HOLDER] = self._pid
        h[L.LOCKS] += 1

    def release(self) -> None:
        """Release the lock (the worker's and coordinator's way; see "Raising signal handlers")."""
        self._h[L.HOLDER] = 0
        self.lock.release()

    def _repair_acquire(self) -> Optional[int]:
        """Take the repair lock and return the descriptor that holds it (close it to release);
        None if another repairer held it for POLL_S (the caller looks again on its next round),
        or if the ring's file was removed or replaced (a stale ring: nothing to repair).

        The repair lock is an exclusive flock on a fresh open of the ring's shared-memory file.
        The kernel drops it when its holder dies, so a repairer killed inside its repair blocks
        nobody, and a stopped or starved one is simply waited for. Each repair opens the file
        anew, so two threads of one process exclude each other too, and a child forked during a
        repair closes its copy at once (``_close_repair_fds_in_child``).
        """
        try:
            fd = os.open(self._shm_path, os.O_RDONLY | os.O_CLOEXEC)
            _REPAIR_FDS.add(fd)  # (at once: a fork from here on must close the child's copy)
        except FileNotFoundError:
            return None
        except OSError as exc:  # (EMFILE...)
            raise SharedMemoryError(exc.errno, f"shard {self.shard}: cannot open {self._shm_path} "
                                    f"to repair its ring lock: {exc.strerror}") from exc
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != self._shm_id:
                return None  # another run's ring under the same name
            deadline = time.monotonic() + POLL_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    got, fd = fd, -1
                    return got
                except BlockingIOError:
                    pass
                if self._closing:
                    raise self._closed_error()
                if time.monotonic() >= deadline:
                    return None
                time.sleep(0.0005)
        finally:
            if fd >= 0:
                _REPAIR_FDS.discard(fd)
                os.close(fd)

    def _progress(self) -> tuple[int, int, int, int]:
        h = self._h
        return h[L.GEN], h[L.LOCKS], h[L.REPAIRS], h[L.HOLDER]

    def _acquire_slow(self, timeout: float) -> None:
        """Wait for the lock, repairing it if its holder died.

        A dead holder is recognised by its recorded pid. A holder killed in the instants
        between taking the semaphore and recording its pid (or between clearing it and
        posting) leaves no pid: such a lock is repaired once it has stayed held with no
        progress at all (GEN, LOCKS, REPAIRS unchanged) for STUCK_S, unless a stopped process
        that maps the ring may be its live holder (see _paused_mapper).
        """
        self._enter()
        try:
            self._acquire_wait(timeout)
        finally:
            self._busy.pop()

    def _acquire_wait(self, timeout: float, cleanup: bool = False) -> None:
        now = time.monotonic()
        deadline = now + timeout
        seen, since = self._progress(), now
        while True:
            try:
                self.lock.acquire(POLL_S)
                return
            except (posix_ipc.BusyError, posix_ipc.SignalError):  # (a signal handler ran)
                pass
            if self._closing and not cleanup:
                raise self._closed_error()
            now = time.monotonic()
            state = self._progress()
            holder = state[3]
            if holder and not pid_alive(holder):
                self._repair_if(state, dead=holder)
            elif state != seen:
                seen, since = state, now
            elif holder == 0 and now - since >= STUCK_S:
                # a holder stopped (SIGSTOP, Ctrl-Z, a debugger) between taking the lock and
                # recording its pid is alive: releasing for it would let two in at once
                paused = _paused_mapper(self._shm_path)
                if paused is None:
                    self._repair_if(state, dead=0)
                else:
                    since = now
            live = self.liveness
            if live is not None and not cleanup:
                live()
            if now > deadline:
                paused = _paused_mapper(self._shm_path) if not holder else None
                raise WorkerFailedError(
                    f"shard {self.shard}: ring lock not obtained in {timeout:.0f}s "
                    f"(holder pid {holder or 'unknown'}"
                    + (f"; pid {paused} maps the ring and is stopped" if paused else "") + ")"
                )

    def repair_lock(self, dead_pid: int) -> bool:
        """Release the lock on behalf of ``dead_pid`` if it still holds it (once, whoever asks)."""
        return self._repair_if(self._progress(), dead=dead_pid)

    def _repair_if(self, seen: tuple[int, int, int, int], dead: int) -> bool:
        """Release the lock if nothing has changed since ``seen`` and it is still held.

        Serialised by the repair lock, and REPAIRS is part of ``seen``: a second repairer that
        observed the same state finds REPAIRS moved on and leaves the lock alone.
        """
        h = self._h
        fd = self._repair_acquire()
        if fd is None:
            return False
        try:
            now = self._progress()
            if dead and (now[3] != dead or pid_alive(dead)):
                return False
            if now[:3] != seen[:3] or now[3] != seen[3]:
                return False
            try:
                self.lock.acquire(0)  # free after all: nothing to repair
            except posix_ipc.BusyError:
                pass
            else:
                self.lock.release()
                return False
            # the dead holder's unpublished bytes are ignored: GEN still selects the old slot
            self._restore_wrap_invariant()
            h[L.HOLDER] = 0
            h[L.REPAIRS] += 1
            self.lock.release()
            return True
        finally:
            _REPAIR_FDS.discard(fd)
            os.close(fd)  # (drops the flock)

    # --- producer side --------------------------------------------------------------------

    def publish(self, block: bytes, count: int, strict: bool = False, timeout: float = 30.0) -> int:
        """Copy ``count`` encoded records into the ring and publish them; return the first id.

        Blocks while the ring is full (backpressure). With ``strict``, registers as a durable
        waiter in the same critical section (see :meth:`wait_durable`).
        """
        self._enter()
        try:
            return self._publish(block, count, strict, timeout)
        finally:
            self._busy.pop()

    def check_block_size(self, need: int) -> None:
        """RecordTooLargeError unless a block of ``need`` bytes fits the ring at all."""
        if need > self.capacity:
            raise RecordTooLargeError(
                need, self.capacity, f"shard {self.shard} ring block",
                f" (ring_size): its records with their {L.LENGTH_PREFIX}-byte length prefixes must fit, so a "
                f"single value can be at most {self.capacity - L.LENGTH_PREFIX} bytes; raise ring_size for larger ones")

    def _publish(self, block: bytes, count: int, strict: bool, timeout: float) -> int:
        need = len(block)
        cap = self.capacity
        self.check_block_size(need)
        h = self._h
        deadline = 0.0
        while True:
            self.acquire(timeout)
            changing = False
            try:
                state, open_epoch = h[L.STATE], h[L.OPEN_EPOCH]
                if state != L.ST_OPEN or open_epoch != self.epoch:
                    if state == L.ST_OPEN and not open_epoch and self.epoch:
                        changing = True  # set_state is between its two stores: look again
                    else:
                        raise _state_error(self.shard, state, h[L.ERRNO], open_epoch != self.epoch)
                else:
                    gen = h[L.GEN]
                    base = L.SLOT1 if gen & 1 else L.SLOT0
                    tail = h[base]
                    off = tail & self.mask
                    free = cap - (tail - h[L.HEAD])
                    seq = h[base + 1]
                    if seq + count > L.SEQ_LIMIT:
                        raise WalIOError(f"shard {self.shard} has run out of ids (they are u64; the next "
                                         f"is {seq})", errno.EOVERFLOW, self.names.ring(self.shard))
                    if need <= cap - off and need <= free:
                        self.data[off : off + need] = block
                        nb = L.SLOT0 if gen & 1 else L.SLOT1
                        h[nb] = tail + need
                        h[nb + 1] = seq + count
                        boundary = need == cap - off  # ends exactly at the end of the area
                        h[nb + 2] = tail + need if boundary else h[base + 2]
                        h[nb + 3] = seq + count if boundary else h[base + 3]
                        if strict:
                            h[L.DUR_WAITERS] += 1
                        h[L.GEN] = gen + 1  # the publish: one aligned 8-byte store
                        if boundary:  # keep the wrap fields equal in both slots
                            h[base + 2] = h[nb + 2]
                            h[base + 3] = h[nb + 3]
                        break
                    placed = L.place(tail, h[L.HEAD], cap, need)
                    if placed.skip and placed.skip <= free:
                        # publish the wrap on its own; the block then goes at offset 0
                        self._publish_wrap(gen, base, tail, placed.skip)
                        continue
                    h[L.SPACE_WAITERS] += 1
            finally:
                h[L.HOLDER] = 0
                self._restore_wrap_invariant()  # (an exception may have hit mid-publish)
                self.lock.release()
            if not deadline:
                deadline = time.monotonic() + timeout
            if changing:  # (microseconds, unless the writer was preempted between the stores)
                if time.monotonic() > deadline:
                    raise WorkerFailedError(f"shard {self.shard}: its ring stayed open under no "
                                            f"coordinator epoch for {timeout:.0f}s")
                time.sleep(0.0005)
                continue
            # full: wait for the worker to free space
            self._wake_worker()
            try:
                self._wait(self.space_free, deadline, "space in the ring")
            finally:  # also on a timeout: a waiter left counted would make every later wait spin
                self._uncount(L.SPACE_WAITERS, timeout)
        if h[L.SLEEPING]:
            self.data_ready.release()
        return seq

    def _publish_wrap(self, gen: int, base: int, tail: int, skip: int) -> None:
        """Publish a skip to the next boundary, then copy the wrap fields into the other slot.

        Invariant (outside the lock): both slots hold the same wrap fields, so an ordinary
        publish need not copy them. A holder that dies between the two steps breaks it;
        :meth:`repair_lock` restores it.
        """
        h = self._h
        nb = L.SLOT0 if gen & 1 else L.SLOT1
        h[nb] = tail + skip
        h[nb + 1] = h[base + 1]
        h[nb + 2] = tail
        h[nb + 3] = h[base + 1]
        h[L.GEN] = gen + 1
        h[base + 2] = tail
        h[base + 3] = h[nb + 3]

    def _restore_wrap_invariant(self) -> None:
        h = self._h
        gen = h[L.GEN]
        cur, other = (L.SLOT1, L.SLOT0) if gen & 1 else (L.SLOT0, L.SLOT1)
        h[other + 2] = h[cur + 2]
        h[other + 3] = h[cur + 3]

    def make_appender(self, strict: bool = False, timeout: float = 30.0) -> Callable[[bytes], int]:
        """The hot path for one record, ``append(value) -> seq``, with every lookup bound once.

        Field indexes are literals (checked against ring_layout below) because each global or
        attribute lookup costs as much as a shared-memory store here; ``strict`` (register as
        a durable waiter in the same critical section) and ``timeout`` are fixed per closure.
        """
        h = self._h
        data = self.data
        # the same kernel semaphore as self.lock, through a cheaper handle (see trylock.py)
        acquire, release, handle = open_trylock(self.names.ring_lock(self.shard))
        cap, mask = self.capacity, self.mask
        pack = _pack_len
        wake = self.data_ready.release
        slow_lock = self._acquire_slow
        slow = self.publish
        ring = self
        waiter = 1 if strict else 0
        # the ring must be open under this process's coordinator (a zero epoch, which no open
        # ring shows, never takes this path: the general one then decides)
        epoch = self.epoch or -1
        # What this closure published last. While GEN still equals last_gen nobody else has
        # published, so the current slot holds last_tail and last_seq (every change to a slot
        # bumps GEN): two header loads saved. ``limit``: the tail may grow to it without
        # reading HEAD again (HEAD only moves forward, so an old one under-reports space).
        last_gen = -1
        last_tail = last_seq = limit = 0

        def append(value: bytes, _handle=handle) -> int:  # (_handle: kept alive with the closure)
            nonlocal last_gen, last_tail, last_seq, limit
            n = len(value)
            need = n + 4
            if not acquire(False):
                slow_lock(timeout)
            held = True  # a signal handler may raise anywhere: release exactly once
            try:  # (free in CPython 3.11 unless something raises, e.g. KeyboardInterrupt)
                h[9] = ring._pid  # HOLDER
                gen = h[8]  # GEN
                if gen & 1:
                    base, nb = 24, 16  # SLOT1 current, SLOT0 next
                else:
                    base, nb = 16, 24
                if gen == last_gen:
                    tail, seq = last_tail, last_seq
                else:
                    tail, seq = h[base], h[base + 1]
                off = tail & mask
                end = tail + need
                if end > limit:
                    limit = h[32] + cap  # HEAD
                # strictly less: a block that ends exactly at the end of the area takes the
                # slow path, which records that crossing for the worker
                if h[5] == epoch and need < cap - off and end <= limit:  # OPEN_EPOCH
                    try:  # (wrap fields are equal in both slots: _publish_wrap)
                        h[nb + 1] = seq + 1
                    except ValueError:  # past a u64, nothing published: the general path says so
                        h[9] = 0
                        held = False
                        release()
                        return slow(_LEN.pack(n) + value, 1, strict, timeout)
                    pack(data, off, n)
                    data[off + 4 : off + need] = value
                    h[nb] = end
                    if waiter:
                        h[11] += 1  # DUR_WAITERS
                    h[8] = gen + 1  # the publish
                    last_gen, last_tail, last_seq = gen + 1, end, seq + 1  # (still under the lock)
                    h[9] = 0
                    held = False  # (before the post: a signal between them costs a repair)
                    release()
                    if h[38]:  # SLEEPING
                        try:
                            wake()
                        except posix_ipc.ExistentialError:
                            pass  # closed by another thread just now; the worker's timer drains it
                    return seq
                h[9] = 0
                held = False
                release()
            except BaseException:
                if held:
                    h[9] = 0
                    release()
                raise
            return slow(_LEN.pack(n) + value, 1, strict, timeout)

        return append

    def append_one(self, data: bytes, strict: bool = False, timeout: float = 30.0) -> int:
        """Publish one record (see :meth:`make_appender` for the bound fast version)."""
        return self.make_appender(strict, timeout)(data)

    def wait_durable(self, upto_seq: int, timeout: float = 30.0, registered: bool = True) -> None:
        """Return once the shard's durable id reaches ``upto_seq``; deregister as a waiter.

        Not refused when close() has begun: a record already durable is reported so, and a
        registration is always taken back; only the wait itself stops (WalClosedError).
        """
        busy = self._busy
        busy.append(None)
        try:
            if self._sems_closed:  # (arrived after close() finished: nothing left to wait on)
                raise self._closed_error()
            self._wait_durable(upto_seq, timeout, registered)
        finally:
            busy.pop()

    def _wait_durable(self, upto_seq: int, timeout: float, registered: bool) -> None:
        h = self._h
        try:
            if h[L.DURABLE_SEQ] >= upto_seq:
                if registered:  # a post may have been made for us: take it, keep counts honest
                    try:
                        self.durable_sem.acquire(0)
                    except posix_ipc.BusyError:
                        pass
                return
            if not registered:
                self.acquire(timeout)
                try:
                    h[L.DUR_WAITERS] += 1
                    registered = True
                finally:
                    h[L.HOLDER] = 0
                    self.lock.release()
            deadline = time.monotonic() + timeout
            self._wake_worker()
            while h[L.DURABLE_SEQ] < upto_seq:
                state = h[L.STATE]
                if state == L.ST_FAILED:
                    raise _state_error(self.shard, state, h[L.ERRNO])
                self._wait(self.durable_sem, deadline, "durability")
        finally:
            if registered:
                self._uncount(L.DUR_WAITERS, timeout)

    def unregister_durable(self, timeout: float = 30.0) -> None:
        """Take back a registration made by ``publish(strict=True)`` without waiting on it
        (after close() nothing is left to take it from: the worker resets the stale count)."""
        busy = self._busy
        busy.append(None)
        try:
            if not self._sems_closed:
                self._uncount(L.DUR_WAITERS, timeout)
        finally:
            busy.pop()

    def _uncount(self, field: int, timeout: float) -> None:
        """Take this caller back out of a waiter count (also while close() is under way)."""
        h = self._h
        self.acquire(max(timeout, UNCOUNT_MIN_S), cleanup=True)
        try:
            if h[field]:  # (a worker may have reset a stale count)
                h[field] -= 1
        finally:
            h[L.HOLDER] = 0
            self.lock.release()

    def _wake_worker(self) -> None:
        if self._h[L.SLEEPING]:
            self.data_ready.release()

    def _wait(self, sem: posix_ipc.Semaphore, deadline: float, what: str) -> None:
        if self._closing:
            raise self._closed_error()
        try:
            sem.acquire(POLL_S)
            return
        except (posix_ipc.BusyError, posix_ipc.SignalError):  # the caller re-checks its condition
            pass
        if self._closing:
            raise self._closed_error()
        live = self.liveness
        if live is not None:
            live()
        state = self._h[L.STATE]
        if state in (L.ST_FAILED, L.ST_CLOSED):
            raise _state_error(self.shard, state, self._h[L.ERRNO])
        if time.monotonic() > deadline:
            worker = self._h[L.WORKER_PID]
            raise WorkerFailedError(
                f"shard {self.shard}: no {what} before the timeout; its worker "
                f"(pid {worker}) is {'alive but stalled' if pid_alive(worker) else 'gone'}"
            )

    # --- reading shared state ---------------------------------------------------------------

    def published(self) -> tuple[int, int, int, int]:
        """(tail, next_seq, wrap_pos, wrap_seq) as of the last publish (take the lock first)."""
        h = self._h
        base = L.slot_base(h[L.GEN])
        return h[base], h[base + 1], h[base + 2], h[base + 3]

    def next_seq(self, timeout: float = 30.0) -> int:
        """The id the next publish will get (read under the lock)."""
        self._enter()
        try:
            self.acquire(timeout)
            try:
                return self.next_seq_locked()
            finally:
                self._h[L.HOLDER] = 0
                self.lock.release()
        finally:
            self._busy.pop()

    def next_seq_locked(self) -> int:
        h = self._h
        return h[L.slot_base(h[L.GEN]) + 1]

    def read_view(self) -> tuple[int, int, int]:
        """(active segment start, its readable size, durable id), consistently."""
        h = self._h
        deadline = 0.0
        while True:
            for _ in range(100):
                v1 = h[L.VIEW_VER]
                if not v1 & 1:
                    seg, size, durable = h[L.VIEW_SEG], h[L.VIEW_SIZE], h[L.VIEW_DURABLE]
                    if h[L.VIEW_VER] == v1:
                        return seg, size, durable
                time.sleep(0)  # the worker is between its two stores: let it run
            now = time.monotonic()
            if not deadline:
                deadline = now + 5.0
            elif now > deadline:  # a worker killed mid-update leaves it odd until its successor
                raise WorkerFailedError(f"shard {self.shard}: no consistent read view for 5 s")

    # --- worker side -------------------------------------------------------------------------

    def reset_view_lock(self) -> None:
        """Make VIEW_VER even again (a worker killed inside set_view leaves it odd)."""
        h = self._h
        if h[L.VIEW_VER] & 1:
            h[L.VIEW_VER] += 1

    def set_view(self, seg: int, size: int, durable: int) -> None:
        """Publish where readers may read up to (worker only)."""
        h = self._h
        h[L.VIEW_VER] += 1
        h[L.VIEW_SEG] = seg
        h[L.VIEW_SIZE] = size
        h[L.VIEW_DURABLE] = durable
        h[L.VIEW_VER] += 1

    def snapshot(self) -> tuple[int, int, int, int]:
        """(tail, next_seq, wrap_pos, wrap_seq) of the last complete publish, without the lock.

        Producers fill only the slot GEN does not select, then store GEN; so the slot GEN
        selected is complete, and it is intact if GEN has not moved while it was read (x86-64
        keeps loads in order and stores in order, which is all this needs).
        """
        h = self._h
        while True:
            gen = h[L.GEN]
            base = L.SLOT1 if gen & 1 else L.SLOT0
            tail, next_seq, wrap_pos, wrap_seq = h[base], h[base + 1], h[base + 2], h[base + 3]
            if h[L.GEN] == gen:
                return tail, next_seq, wrap_pos, wrap_seq

    def next_slice(self) -> Optional[L.Slice]:
        """The next run of published records for the worker (None if nothing is pending)."""
        h = self._h
        tail, next_seq, wrap_pos, wrap_seq = self.snapshot()
        return L.next_slice(h[L.HEAD], h[L.HEAD_SEQ], tail, next_seq, wrap_pos, wrap_seq, self.capacity)

    def consume(self, s: L.Slice) -> None:
        """Mark a slice as taken (its frame is written); wake producers waiting for space."""
        self.set_head(s.new_head, s.first_seq + s.count)
        waiters = self._h[L.SPACE_WAITERS]
        if waiters:
            if self.space_free.value < waiters:  # never more posts than waiters
                self.space_free.release()
            self.clear_stale_waiters()  # a waiter killed while waiting is never subtracted

    def set_head(self, head: int, head_seq: int) -> None:
        """Move the consume position in one atomic step (slot, then WGEN), then the mirrors."""
        h = self._h
        wgen = h[L.WGEN]
        nb = L.WSLOT0 if wgen & 1 else L.WSLOT1
        h[nb] = head
        h[nb + 1] = head_seq
        h[L.WGEN] = wgen + 1
        h[L.HEAD] = head  # producers read this mirror; stale only means less free space
        h[L.HEAD_SEQ] = head_seq

    def restore_head(self) -> tuple[int, int]:
        """(head, head_seq) from the current slot, mirrors rewritten (a new worker, at resume)."""
        h = self._h
        cur = L.WSLOT1 if h[L.WGEN] & 1 else L.WSLOT0
        h[L.HEAD], h[L.HEAD_SEQ] = h[cur], h[cur + 1]
        return h[cur], h[cur + 1]

    def skip_records(self, upto_seq: int) -> int:
        """Consume records below ``upto_seq`` without writing them (they are on disk already)."""
        h = self._h
        skipped = 0
        while h[L.HEAD_SEQ] < upto_seq:
            s = self.next_slice()
            if s is None:
                raise WorkerFailedError(
                    f"shard {self.shard}: disk holds ids up to {upto_seq} but the ring ends at {h[L.HEAD_SEQ]}"
                )
            if s.first_seq + s.count <= upto_seq:
                self.consume(s)
                skipped += s.count
                continue
            # cut inside the slice: walk record lengths up to upto_seq
            pos, seq = s.offset, s.first_seq
            while seq < upto_seq:
                (n,) = _unpack_len(self.data, pos)
                pos += 4 + n
                seq += 1
            skipped += seq - s.first_seq
            self.set_head(h[L.HEAD] + (pos - s.offset), seq)
        return skipped

    def wake_durable_waiters(self) -> None:
        """Post once per registered waiter (at most 64), less the posts still unclaimed."""
        h = self._h
        waiters = h[L.DUR_WAITERS]
        if not waiters:
            self._unclaimed_since = None
            return
        # A live waiter takes its post within microseconds; one killed while waiting never
        # does. Posts left unclaimed at every wake for STALE_S count waiters that are gone.
        unclaimed = self.durable_sem.value
        if not unclaimed:
            self._unclaimed_since = None
        elif self._unclaimed_since is None:
            self._unclaimed_since = time.monotonic()
        elif time.monotonic() - self._unclaimed_since >= STALE_S:
            self._drop_dead_durable_waiters(unclaimed)
            waiters = h[L.DUR_WAITERS]
        for _ in range(min(waiters, 64) - self.durable_sem.value):
            self.durable_sem.release()

    def _drop_dead_durable_waiters(self, n: int) -> None:
        h = self._h
        self.acquire()
        try:
            n = min(n, h[L.DUR_WAITERS])
            h[L.DUR_WAITERS] -= n
        finally:
            self.release()
        for _ in range(n):  # take back the posts they never claimed
            try:
                self.durable_sem.acquire(0)
            except posix_ipc.BusyError:
                break
        self._unclaimed_since = None

    def clear_stale_waiters(self) -> bool:
        """Zero a SPACE_WAITERS count that a waiter killed while waiting left behind.

        Nobody can wait for space in an empty ring; a live waiter that was just woken is
        briefly counted there too, so the count is cleared only once it has stayed the same
        with the ring empty at every sample over STALE_S. (Durable waiters that died are
        found by their unclaimed posts: see wake_durable_waiters.) Returns True if it cleared.
        """
        now = time.monotonic()
        if now < self._stale_next:
            return False
        self._stale_next = now + STALE_S / 8
        h = self._h
        self.acquire()
        try:
            tail = self.published()[0]
            count = h[L.SPACE_WAITERS] if h[L.HEAD] >= tail else 0
            if not count:
                self._stale = None
                return False
            if self._stale is None or self._stale[0] != count:
                self._stale = (count, now)
                return False
            if now - self._stale[1] < STALE_S:
                return False
            h[L.SPACE_WAITERS] = 0
            self._stale = None
            return True
        finally:
            self.release()


assert (L.HOLDER, L.GEN, L.SLOT0, L.SLOT1, L.OPEN_EPOCH, L.HEAD, L.SLEEPING, L.DUR_WAITERS) == (
    9, 8, 16, 24, 5, 32, 38, 11
), "make_appender's literal field indexes are out of date"


def _paused_mapper(shm_path: str) -> Optional[int]:
    """The pid of another process that maps ``shm_path`` and is stopped or traced, if any.

    Only such a process can hold a ring lock with no pid recorded and be alive: it was paused
    in the instants between taking the lock and recording its pid (or clearing it and posting).
    Read from /proc, and only after STUCK_S without progress: never on a fast path.
    """
    me = os.getpid()
    try:
        pids = [int(n) for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        return None
    for pid in pids:
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/maps") as fh:
                if shm_path not in fh.read():
                    continue
            with open(f"/proc/{pid}/stat") as fh:
                state = fh.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # gone, or not ours to look at
        if state in ("T", "t"):
            return pid
    return None


def _state_error(shard: int, state: int, code: int = 0, other_epoch: bool = False) -> Exception:
    """The error for a call that found its ring not open to it (``code``: the ring's ERRNO)."""
    if state == L.ST_OPEN and other_epoch:
        return WalClosedError(
            f"shard {shard}: the coordinator this handle attached to has stopped, and another "
            "has opened the WAL since: open it again")
    if state == L.ST_FAILED:
        return WorkerFailedError(f"shard {shard}: {failure_reason(code)}")
    if state in (L.ST_CLOSING, L.ST_CLOSED):
        return WalClosedError(f"shard {shard}: the sharded WAL is shutting down or closed")
    return WorkerFailedError(f"shard {shard}: ring is not open (state {L.STATE_NAMES.get(state, state)})")


def failure_reason(code: int) -> str:
    """Why a shard failed, from its ERRNO, and what to do about it."""
    if code in (errno.ENOSPC, errno.EDQUOT):
        return ("its worker stopped: the disk is full (ENOSPC). Nothing acknowledged is lost: "
                "records not yet on disk stay in its ring. Free space, then close and reopen the "
                "WAL; the next open writes them")
    if code == L.ERR_GAVE_UP:
        return "its worker kept exiting right after it started, and the coordinator gave up (see its log)"
    if code == L.ERR_CANNOT_RESUME:
        return "its worker cannot resume it: its files lack ids its ring handed out (see the coordinator's log)"
    if code:
        return f"its worker failed: {os.strerror(code)} (errno {errno.errorcode.get(code, code)}; see the coordinator's log)"
    return "its worker failed (see the coordinator's log)"


def _shm_error(name: str, size: int, exc: OSError) -> SharedMemoryError:
    return SharedMemoryError(
        f"cannot create shared memory {name} of {size} bytes ({exc}); /dev/shm is probably full: "
        "free space there or lower ring_size (or the shard count)"
    )
