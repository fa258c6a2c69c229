"""Tests written from a mutation-testing audit of engine/group_sync.py, engine/rootlock.py and
engine/rootkind.py: each one kills a mutant that the suite let survive. Plain files and
descriptors only; no sharded process is started."""

from __future__ import annotations

import fcntl
import os
import sys

import pytest

from conftest import open_files_under
from ironwal_mp import GroupSync, SyncMode, Wal, WalOptions
from ironwal_mp.engine import group_sync as gs
from ironwal_mp.engine import layout
from ironwal_mp.engine import rootkind as rk
from ironwal_mp.engine import rootlock as rl
from ironwal_mp.errors import ConfigError, WalLockedError

needs_syncfs = pytest.mark.skipif(gs._syncfs is None, reason="no syncfs(2) on this platform")


# --- engine/group_sync.py ------------------------------------------------------------------------


@pytest.fixture
def eligible_tmp(tmp_path, monkeypatch):
    """Let tmp_path's filesystem take syncfs whatever it is (a tmpfs /tmp, say)."""
    fs = gs.filesystem_type(os.stat(tmp_path).st_dev)
    monkeypatch.setattr(gs, "SYNCFS_FILESYSTEMS", gs.SYNCFS_FILESYSTEMS | {fs})
    return tmp_path


def _wal(root, method=GroupSync.SYNCFS) -> Wal:
    return Wal(WalOptions(root_path=str(root / "wal"), sync_mode=SyncMode.ASYNC, group_sync=method))


def _write(wal: Wal, names):
    for name in names:
        wal.append(name, name.encode())
    return [wal._streams[name] for name in names]


def test_syncfs_is_found_in_the_c_library_on_linux(tmp_path):
    """On Linux libc's syncfs is loaded and works; elsewhere there is none."""
    fn = gs._load_syncfs()
    if not sys.platform.startswith("linux"):
        assert fn is None
        return
    assert fn is not None
    fd = os.open(str(tmp_path), os.O_RDONLY)
    try:
        assert fn(fd) == 0
    finally:
        os.close(fd)


@needs_syncfs
def test_the_fdatasync_method_never_turns_to_syncfs(eligible_tmp, monkeypatch):
    """With GroupSync.FDATASYNC no sync uses syncfs, not even once a directory could be open."""
    assert not gs.GroupSyncer(GroupSync.FDATASYNC).use_syncfs
    assert gs.GroupSyncer(GroupSync.SYNCFS).use_syncfs
    calls = []
    real = gs.syncfs
    monkeypatch.setattr(gs, "syncfs", lambda fd: (calls.append(fd), real(fd))[1])
    with _wal(eligible_tmp, GroupSync.FDATASYNC) as wal:
        for _ in range(3):
            streams = _write(wal, ["a", "b", "c"])
            wal.sync()
        assert all(s.durable_id == s.next_id for s in streams)
    assert calls == []


@needs_syncfs
def test_close_closes_the_directory_descriptor_kept_for_syncfs(eligible_tmp):
    """The directory a group sync keeps open for syncfs is closed with the Wal."""
    root = str(eligible_tmp / "wal")
    wal = _wal(eligible_tmp)
    try:
        _write(wal, ["a", "b"])
        wal.sync()  # opens the directory descriptor
        assert wal._syncer._dirfds
        kept = list(wal._syncer._dirfds.values())
        assert any(os.path.realpath(os.readlink(f"/proc/self/fd/{fd}")).startswith(os.path.realpath(root))
                   for fd in kept)
    finally:
        wal.close()
    assert open_files_under(root, "") == []


@needs_syncfs
def test_a_group_syncfs_runs_with_every_streams_sync_lock_held(eligible_tmp, monkeypatch):
    """While one syncfs stands for several streams, each stream's sync_lock is held, so no other
    sync of those streams runs in between."""
    with _wal(eligible_tmp) as wal:
        _write(wal, ["a", "b", "c"])
        wal.sync()  # the first group sync is per file
        streams = _write(wal, ["a", "b", "c"])
        seen = []
        real = gs.syncfs

        def syncfs(fd):
            seen.append([s.sync_lock.locked() for s in streams])
            return real(fd)

        monkeypatch.setattr(gs, "syncfs", syncfs)
        wal.sync()
        assert seen == [[True, True, True]]
        assert not any(s.sync_lock.locked() for s in streams)
        assert all(s.durable_id == s.next_id for s in streams)


def test_filesystem_type_skips_short_lines_and_reads_the_third_field(tmp_path):
    """A mountinfo line with fewer than three fields before the separator is skipped, not an
    error; the device is the third field however many follow it."""
    info = tmp_path / "mountinfo"
    info.write_text(
        "1 2 - tmpfs none rw\n"
        "3 4 8:17 - xfs /dev/sdb1 rw\n"
    )
    assert gs.filesystem_type(os.makedev(8, 17), str(info)) == "xfs"
    assert gs.filesystem_type(os.makedev(9, 9), str(info)) is None


# --- engine/rootlock.py --------------------------------------------------------------------------


def _lock_path(tmp_path) -> str:
    return os.path.join(str(tmp_path), rl.LOCK_FILE)


def _hold_with(tmp_path, content: bytes) -> int:
    """Hold tmp_path's LOCK from a descriptor of the test's own, with ``content`` in the file."""
    fd = os.open(_lock_path(tmp_path), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.ftruncate(fd, 0)
    os.pwrite(fd, content, 0)
    return fd


def test_lock_owner_reads_what_the_holder_wrote(tmp_path):
    """lock_owner gives (pid, role); a role it does not know, or none, reads as "", and a
    holder that wrote nothing as pid -1."""
    root = str(tmp_path)
    for content, want in [(b"123\n", (123, "")), (b"123 bogus\n", (123, "")),
                          (b"123 coordinator\n", (123, "coordinator")), (b"", (-1, ""))]:
        fd = _hold_with(tmp_path, content)
        try:
            assert rl.lock_owner(root) == want, content
        finally:
            os.close(fd)
    assert rl.lock_owner(root) is None


def test_lock_owner_leaves_no_descriptor_open(tmp_path):
    """Asking who holds the lock, held or not, leaves no descriptor on LOCK behind."""
    root = str(tmp_path)
    lock = rl.RootLock(root).acquire()
    try:
        assert rl.lock_owner(root) == (os.getpid(), "wal")
        assert len(open_files_under(root, rl.LOCK_FILE)) == 1  # the holder's own
    finally:
        lock.release()
    assert rl.lock_owner(root) is None
    assert open_files_under(root, rl.LOCK_FILE) == []


def test_a_refused_acquire_leaves_no_descriptor_open(tmp_path):
    root = str(tmp_path)
    lock = rl.RootLock(root).acquire()
    try:
        with pytest.raises(WalLockedError, match=str(os.getpid())):
            rl.RootLock(root).acquire()
        assert len(open_files_under(root, rl.LOCK_FILE)) == 1  # the holder's own
    finally:
        lock.release()
    assert open_files_under(root, rl.LOCK_FILE) == []


def test_acquire_replaces_a_stale_longer_record(tmp_path):
    """A killed holder's record is replaced whole, not overwritten in part."""
    with open(_lock_path(tmp_path), "w") as fh:
        fh.write("987654321 coordinator and more that a killed holder left\n")
    lock = rl.RootLock(str(tmp_path)).acquire()
    try:
        with open(_lock_path(tmp_path)) as fh:
            assert fh.read() == f"{os.getpid()} wal\n"
    finally:
        lock.release()


def test_release_empties_the_lock_file(tmp_path):
    """Once released, LOCK names no holder."""
    lock = rl.RootLock(str(tmp_path), role="coordinator").acquire()
    assert os.path.getsize(_lock_path(tmp_path)) > 0
    lock.release()
    assert os.path.getsize(_lock_path(tmp_path)) == 0
    assert not lock.held


def test_the_lock_file_is_created_rw_r_r(tmp_path):
    old = os.umask(0o022)
    try:
        lock = rl.RootLock(str(tmp_path)).acquire()
    finally:
        os.umask(old)
    try:
        assert os.stat(_lock_path(tmp_path)).st_mode & 0o777 == 0o644
    finally:
        lock.release()


# --- engine/rootkind.py --------------------------------------------------------------------------


def _stream_dir(root: str, name: str) -> None:
    os.makedirs(os.path.join(root, name))
    open(os.path.join(root, name, layout.segment_name(0)), "wb").close()


def test_holds_wal_reading_a_manifest_leaves_no_descriptor_open(tmp_path):
    root = str(tmp_path / "sharded")
    os.makedirs(root)
    with open(os.path.join(root, rk.MANIFEST), "w") as fh:
        fh.write('{"format": "%s", "shard_count": 2}\n' % rk.MANIFEST_FORMAT)
    assert rk.holds_wal(root)
    assert open_files_under(root, rk.MANIFEST) == []


def test_a_sharded_root_is_not_judged_by_the_streams_beside_its_shards(tmp_path):
    """A root with a sharded marker stays a sharded root though an engine Wal added a stream
    there (an engine Wal may open a stopped sharded root)."""
    root = str(tmp_path / "sharded")
    os.makedirs(root)
    open(os.path.join(root, rk.MANIFEST), "w").close()
    _stream_dir(root, "shard_00")
    _stream_dir(root, "acct-1")
    rk.check_sharded_root(root)  # no error
    os.unlink(os.path.join(root, rk.MANIFEST))
    with pytest.raises(ConfigError, match=r"is an engine WAL \(streams acct-1\)"):
        rk.check_sharded_root(root)


def test_an_engine_root_refused_as_sharded_names_at_most_five_streams(tmp_path):
    root = str(tmp_path / "engine")
    names = [f"s{i}" for i in range(6)]
    with Wal(WalOptions(root_path=root, sync_mode=SyncMode.ASYNC)) as wal:
        for name in names:
            wal.append(name, b"x")
    with pytest.raises(ConfigError, match=r"is an engine WAL \(streams s0, s1, s2, s3, s4\), not a sharded"):
        rk.check_sharded_root(root)
