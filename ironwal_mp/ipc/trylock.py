"""A try-acquire and release of a named semaphore that are cheap enough for the append path.

posix_ipc releases and retakes the GIL around every semaphore call, even one that cannot block.
That costs about 90 ns per try-acquire and release pair, roughly a tenth of a whole single
append. CPython's own ``_multiprocessing.SemLock`` wraps the same POSIX call, but it tries
without giving up the GIL first. It can attach to an existing named semaphore: multiprocessing
does that when it unpickles a lock in a child process. Measured on the project machine, a pair
costs 37 ns with it and 126 ns with posix_ipc.

``SemLock`` is a private interface, so it is checked when this module is imported. If it is
missing or behaves differently, posix_ipc takes its place and only speed is lost. Both open the
same kernel object by name, so they can be mixed freely: the slow paths keep using posix_ipc
for its timeouts.
"""

from __future__ import annotations

from typing import Callable, Tuple

import posix_ipc

#: SemLock's kind for a counting semaphore (multiprocessing.synchronize.SEMAPHORE)
_SEMAPHORE = 1
#: above any value a ring lock takes; SemLock refuses a release past it
_MAXVALUE = (1 << 31) - 1

TryAcquire = Callable[[bool], bool]  #: called with False: never blocks
Release = Callable[[], None]


def _semlock_pair(name: str) -> Tuple[TryAcquire, Release, object]:
    from _multiprocessing import SemLock  # type: ignore[import-not-found]

    sem = SemLock._rebuild(0, _SEMAPHORE, _MAXVALUE, name)
    return sem.acquire, sem.release, sem  # acquire(False): the probe checked it never blocks


def _posix_ipc_pair(name: str) -> Tuple[TryAcquire, Release, object]:
    sem = posix_ipc.Semaphore(name)
    busy = posix_ipc.BusyError

    def try_acquire(_block: bool = False) -> bool:
        try:
            sem.acquire(0)
            return True
        except busy:
            return False

    return try_acquire, sem.release, sem


def _probe() -> bool:
    """Whether SemLock can attach by name, and agrees with posix_ipc, on this interpreter."""
    import os

    name = f"/ironwal_probe_{os.getpid()}"
    try:
        owner = posix_ipc.Semaphore(name, posix_ipc.O_CREX, initial_value=1)
    except (posix_ipc.Error, OSError):  # (a full /dev/shm is an OSError)
        return False
    try:
        from _multiprocessing import SemLock  # type: ignore[import-not-found]

        sem = SemLock._rebuild(0, _SEMAPHORE, _MAXVALUE, name)
        ok = sem.acquire(False) is True and owner.value == 0 and sem.acquire(False) is False
        sem.release()
        ok = ok and owner.value == 1
        del sem
        return ok
    except Exception:  # any difference at all: use posix_ipc
        return False
    finally:
        owner.unlink()
        owner.close()


_available: "bool | None" = None  # probed at the first use


def open_trylock(name: str) -> Tuple[TryAcquire, Release, object]:
    """``(try_acquire, release, handle)`` for the existing semaphore ``name``;
    ``try_acquire(False)`` takes it if it is free and says whether it did.

    Keep ``handle`` alive as long as the two functions are used (it closes the semaphore when
    it is collected).
    """
    global _available
    if _available is None:
        _available = _probe()
    if _available:
        try:
            return _semlock_pair(name)
        except Exception:
            pass
    return _posix_ipc_pair(name)
