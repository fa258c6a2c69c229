import os
import threading

import pytest

from ironwal_mp.engine.fdcache import FdCache


def _files(tmp_path, n):
    paths = []
    for i in range(n):
        p = tmp_path / f"f{i}"
        p.write_bytes(b"%d" % i)
        paths.append(str(p))
    return paths


def test_never_more_than_capacity_open(tmp_path):
    cache = FdCache(3)
    paths = _files(tmp_path, 10)
    for _ in range(3):
        for p in paths:
            e = cache.acquire(p)
            assert os.pread(e.fd, 10, 0) == open(p, "rb").read()
            cache.release(e)
            assert len(cache) <= 3
    cache.close_all()


def test_lru_keeps_recent(tmp_path):
    cache = FdCache(2)
    a, b, c = _files(tmp_path, 3)
    for p in (a, b, a, c):  # c evicts b (a was used more recently)
        cache.release(cache.acquire(p))
    assert set(k[0] for k in cache.open_paths()) == {a, c}
    cache.close_all()


def test_pinned_files_are_not_evicted_and_waiters_block(tmp_path):
    cache = FdCache(1)
    a, b = _files(tmp_path, 2)
    ea = cache.acquire(a)
    got = []

    def other():
        eb = cache.acquire(b)
        got.append(eb)
        cache.release(eb)

    t = threading.Thread(target=other)
    t.start()
    t.join(0.2)
    assert t.is_alive() and not got  # waits: the only slot is pinned
    os.fstat(ea.fd)  # still open
    cache.release(ea)
    t.join(60)
    assert got and not t.is_alive()
    cache.close_all()


def test_forget_closes_on_release(tmp_path):
    cache = FdCache(4)
    (a,) = _files(tmp_path, 1)
    e = cache.acquire(a)
    cache.forget(a)
    os.fstat(e.fd)  # pinned: still usable
    cache.release(e)
    with pytest.raises(OSError):
        os.fstat(e.fd)
    cache.close_all()


def test_mapping_grows_with_file(tmp_path):
    cache = FdCache(2)
    p = tmp_path / "g"
    p.write_bytes(b"abc")
    e = cache.acquire(str(p))
    assert e.mapping(3)[:3] == b"abc"
    with open(p, "ab") as fh:
        fh.write(b"def")
    assert e.mapping(6)[:6] == b"abcdef"
    cache.release(e)
    cache.close_all()


def test_close_all_under_a_pinned_reader_and_after(tmp_path):
    # A thread still reading when the log closes keeps its descriptor until it lets go (its
    # number cannot be reused under it); anything asked of the cache later is a closed log
    from ironwal_mp.errors import WalClosedError

    cache = FdCache(2)
    a, b = _files(tmp_path, 2)
    ea = cache.acquire(a)
    cache.release(cache.acquire(b))
    cache.close_all()
    assert os.pread(ea.fd, 10, 0) == b"0"
    cache.release(ea)
    with pytest.raises(OSError):
        os.fstat(ea.fd)
    with pytest.raises(WalClosedError):
        cache.acquire(b)
