import os
import shutil
import tempfile

import posix_ipc
import pytest
from hypothesis import HealthCheck, settings

from ironwal_mp.engine.rootkind import is_stream_dir

# a shared 2-core VM stalls now and then: no hypothesis test may fail on its timing alone
settings.register_profile("ironwal", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ironwal")

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures", "ironwal-0.6")


def _find_fixtures() -> str:
    """shared/ sits beside the project's checkout (CI clones main with shared/ beside it)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for up in ("..", os.path.join("..", "..")):
        candidate = os.path.normpath(os.path.join(here, up, "shared", "fixtures", "ironwal-0.6"))
        if os.path.isdir(candidate):
            return candidate
    env = os.environ.get("IRONWAL_FIXTURES")
    if env and os.path.isdir(env):
        return env
    pytest.skip("ironwal 0.6 fixtures (shared/fixtures/ironwal-0.6) not found beside the checkout")


@pytest.fixture
def fixtures_dir() -> str:
    return _find_fixtures()


@pytest.fixture
def fixture_copy(tmp_path, fixtures_dir):
    """Copy a fixture subdirectory into tmp_path (the originals are read-only)."""

    def copy(*parts: str) -> str:
        src = os.path.join(fixtures_dir, *parts)
        dst = os.path.join(str(tmp_path), "fx", *parts)
        shutil.copytree(src, dst)
        for dirpath, _dirs, files in os.walk(dst):
            os.chmod(dirpath, 0o755)
            for name in files:
                os.chmod(os.path.join(dirpath, name), 0o644)
        return dst

    return copy


# --- sharded layer: no test may leave a process or an IPC object behind -------------------------


def _reap_children(grace: float = 10.0):
    """Join the test's multiprocessing children; kill and name any still running after ``grace``.

    A test that fails between starting producers and reading their results leaves children
    blocked writing to a queue nobody reads; pytest keeps the last failure's frame (and so the
    queue) alive, and multiprocessing joins every child at exit, so the run would hang there.
    """
    import multiprocessing
    import time

    deadline = time.monotonic() + grace  # a hang guard, not a time check
    left = []
    for child in multiprocessing.active_children():
        child.join(max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            left.append(child.pid)
            child.kill()
            child.join(10)
    return left


def settle_root(root: str):
    """After a sharded test: wait for the WAL's processes at ``root`` to end, then kill those
    left and remove its IPC objects (so that one failure does not poison the rest of the
    suite); return the processes and objects that were left, for the test to assert on."""
    import time

    from ironwal_mp.ipc.names import Names, processes_of

    deadline = time.monotonic() + 30
    while processes_of(root) and time.monotonic() < deadline:
        time.sleep(0.05)
    procs = processes_of(root)
    leftovers = Names(root).leftovers()
    for pid, _ in procs:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    Names(root).remove_all()
    return procs, leftovers


@pytest.fixture
def fsynced(monkeypatch):
    """Real paths of every descriptor passed to os.fsync from now on."""
    seen: list = []
    real = os.fsync

    def spy(fd):
        seen.append(os.path.realpath(os.readlink(f"/proc/self/fd/{fd}")))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return seen


@pytest.fixture
def sem_name():
    """The name of a fresh named semaphore (value 1), removed afterwards."""
    name = f"/ironwal_test_sem_{os.getpid()}"
    sem = posix_ipc.Semaphore(name, posix_ipc.O_CREX, initial_value=1)
    yield name
    sem.unlink()
    sem.close()
    assert not os.path.exists("/dev/shm/sem." + name[1:])


@pytest.fixture(autouse=True)
def _tmp_path_holds_no_stream_files(request):
    """A test that leaves a stream's files (a segment, segments.idx) straight in its tmp_path
    makes the shared temp root above it look like an engine WAL, and every later test's WAL
    there is refused as nested: fail that test instead, by name."""
    yield
    tmp = request.node.funcargs.get("tmp_path")
    if tmp is not None and is_stream_dir(str(tmp)):
        pytest.fail(f"the test left a stream's files straight in tmp_path ({tmp}): write them to a "
                    "subdirectory, or later tests' WALs in the temp root are refused as nested")


@pytest.fixture
def wal_root(tmp_path):
    """A WAL directory for sharded tests; afterwards asserts that nothing was left running."""
    root = str(tmp_path / "wal")
    yield root
    children = _reap_children()
    procs, leftovers = settle_root(root)
    assert not children, f"child processes of the test left running (killed): {children}"
    assert not procs, f"processes left running: {procs}"
    assert not leftovers, f"IPC objects left behind: {leftovers}"


@pytest.fixture
def scratch_base(tmp_path):
    """Where the crash-state tests write their states: a memory filesystem when there is one
    (thousands of small trees are written and removed), else ``tmp_path``."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        base = tempfile.mkdtemp(prefix="ironwal-crash-states-", dir="/dev/shm")
        try:
            yield base
        finally:
            shutil.rmtree(base, ignore_errors=True)
    else:
        yield str(tmp_path / "states")


def close_twice(handle, holder, name: str, at_return):
    """Close ``handle`` from two threads: the first is held inside ``holder.<name>`` (a step of
    its close) until the second's close() has returned, or half a second has passed; return
    what ``at_return()`` finds right after the second returned."""
    import threading

    inside, b_returned = threading.Event(), threading.Event()
    step = getattr(holder, name)

    def held(*args):
        inside.set()
        b_returned.wait(0.5)
        return step(*args)

    setattr(holder, name, held)
    first = threading.Thread(target=handle.close)
    first.start()
    try:
        assert inside.wait(30)
        handle.close()
        b_returned.set()
        return at_return()
    finally:
        b_returned.set()
        first.join(60)


def open_files_under(root: str, suffix: str) -> list:
    """What this process's descriptors point at under ``root`` (real path; ``root`` itself
    included), for those whose target ends with ``suffix`` (``" (deleted)"``: unlinked files)."""
    root = os.path.realpath(root)
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if (target == root or target.startswith(root + os.sep)) and target.endswith(suffix):
            out.append(target)
    return out
