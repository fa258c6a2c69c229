import os
import shutil

import pytest

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


def _processes_mentioning(text: str) -> list:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat", "rb") as fh:
                if fh.read().split(b") ", 1)[1][:1] == b"Z":
                    continue  # zombies are reaped by their parent
        except (OSError, IndexError):
            continue
        if text in cmd and ("coordinator" in cmd or "workers" in cmd):
            found.append((int(pid), cmd))
    return found


@pytest.fixture
def wal_root(tmp_path):
    """A WAL directory for sharded tests; afterwards asserts that nothing was left running."""
    import time

    from ironwal_mp.ipc.names import Names

    root = str(tmp_path / "wal")
    yield root
    deadline = time.monotonic() + 30
    while _processes_mentioning(root) and time.monotonic() < deadline:
        time.sleep(0.05)
    procs = _processes_mentioning(root)
    leftovers = Names(root).leftovers()
    for pid, _ in procs:  # do not let one failure poison the rest of the suite
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    Names(root).remove_all()
    assert not procs, f"processes left running: {procs}"
    assert not leftovers, f"IPC objects left behind: {leftovers}"
