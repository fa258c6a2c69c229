"""ipc/trylock.py: the append path's try-acquire and release act on the very semaphore that
posix_ipc (the slow paths) opens by the same name, with either implementation."""

from __future__ import annotations

import os

import posix_ipc
import pytest

from ironwal_mp.ipc import trylock


@pytest.fixture(params=["semlock", "posix_ipc"])
def impl(request, monkeypatch):
    if request.param == "posix_ipc":
        monkeypatch.setattr(trylock, "_available", False)
    else:
        monkeypatch.setattr(trylock, "_available", None)  # probe again, here
    return request.param


def test_try_acquire_and_release_share_the_kernel_semaphore(sem_name, impl):
    acquire, release, handle = trylock.open_trylock(sem_name)
    other = posix_ipc.Semaphore(sem_name)
    try:
        if impl == "semlock":
            assert trylock._available, "CPython's SemLock should attach by name on this interpreter"
        assert acquire(False) is True
        assert other.value == 0
        assert acquire(False) is False  # never blocks
        with pytest.raises(posix_ipc.BusyError):
            other.acquire(0)  # the slow path sees it held
        release()
        assert other.value == 1
        other.acquire(0)  # taken by the slow path...
        assert acquire(False) is False
        release()  # ...and released by the fast one, as the appender does after a slow acquire
        assert other.value == 1
    finally:
        other.close()
        del handle


def test_probe_leaves_nothing_behind():
    def mine():  # (/dev/shm is the whole machine's: only the probe's own names are compared)
        return {n for n in os.listdir("/dev/shm") if f"ironwal_probe_{os.getpid()}" in n}

    assert trylock._probe() in (True, False)
    assert mine() == set()


def test_a_failing_semlock_falls_back_to_posix_ipc(sem_name, monkeypatch):
    monkeypatch.setattr(trylock, "_available", True)

    def broken(name):
        raise OSError("no such interface")

    monkeypatch.setattr(trylock, "_semlock_pair", broken)
    acquire, release, handle = trylock.open_trylock(sem_name)
    assert isinstance(handle, posix_ipc.Semaphore)
    assert acquire(False) is True and acquire(False) is False
    release()
    handle.close()
