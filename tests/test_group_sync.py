"""GroupSyncer: several streams made durable with one syncfs, and errors still pinned to the
stream whose file failed."""

from __future__ import annotations

import errno
import os

import pytest

from ironwal_mp import ConfigError, GroupSync, SyncMode, Wal, WalOptions
from ironwal_mp.engine import group_sync as gs
from ironwal_mp.engine import stream as stream_module
from ironwal_mp.errors import StreamFailedError, WalIOError

needs_syncfs = pytest.mark.skipif(gs._syncfs is None, reason="no syncfs(2) on this platform")


@pytest.fixture(autouse=True)
def tmp_path_takes_syncfs(tmp_path, monkeypatch):
    """Let the test directory's filesystem take syncfs whatever it is (a tmpfs /tmp, say), so
    that these tests exercise the group path everywhere."""
    fs = gs.filesystem_type(os.stat(tmp_path).st_dev)
    monkeypatch.setattr(gs, "SYNCFS_FILESYSTEMS", gs.SYNCFS_FILESYSTEMS | {fs})


def _wal(tmp_path, method=GroupSync.SYNCFS) -> Wal:
    return Wal(WalOptions(root_path=tmp_path / "wal", sync_mode=SyncMode.ASYNC, group_sync=method))


def _write(wal: Wal, names, n=3):
    for name in names:
        for i in range(n):
            wal.append(name, b"%s-%d" % (name.encode(), i))
    return [wal._streams[name] for name in names]


def _warm(wal: Wal, names) -> None:
    """Write and sync once: the first group sync per filesystem is per file."""
    _write(wal, names)
    wal.sync()
    assert wal._syncer._dirfds


def _count_calls(monkeypatch):
    calls = {"syncfs": 0, "fdatasync": []}
    real_syncfs, real_fdatasync = gs.syncfs, stream_module._fdatasync

    def syncfs(fd):
        calls["syncfs"] += 1
        return real_syncfs(fd)

    def fdatasync(fd):
        calls["fdatasync"].append(fd)
        return real_fdatasync(fd)

    monkeypatch.setattr(gs, "syncfs", syncfs)
    monkeypatch.setattr(stream_module, "_fdatasync", fdatasync)
    return calls


@needs_syncfs
def test_several_streams_take_one_syncfs(tmp_path, monkeypatch):
    calls = _count_calls(monkeypatch)
    with _wal(tmp_path) as wal:
        streams = _write(wal, ["a", "b", "c", "d"])
        assert all(s.durable_id < s.next_id for s in streams)
        wal.sync()
        # the first group sync on a filesystem is per file (see the next test)
        assert calls["syncfs"] == 0 and len(calls["fdatasync"]) == 4
        assert all(s.durable_id == s.next_id == 3 for s in streams)
        _write(wal, ["a", "b", "c", "d"])
        wal.sync()
        assert calls["syncfs"] == 1 and len(calls["fdatasync"]) == 4
        assert all(s.durable_id == s.next_id == 6 for s in streams)
        wal.sync()  # nothing new: no call at all
        assert calls["syncfs"] == 1


@needs_syncfs
def test_the_first_group_sync_of_a_filesystem_is_per_file(tmp_path, monkeypatch):
    """A descriptor opened now would not be told of a writeback error that another process's
    syncfs already saw; each file's own descriptor still would. So the sync that opens the
    directory descriptor is per file, and syncfs takes over from the next one."""
    calls = _count_calls(monkeypatch)
    with _wal(tmp_path) as wal:
        _write(wal, ["a", "b"])
        assert wal._syncer._dirfds == {}
        wal.sync()
        assert calls["syncfs"] == 0 and len(calls["fdatasync"]) == 2
        assert len(wal._syncer._dirfds) == 1


def test_filesystems_outside_the_list_are_synced_per_file(tmp_path, monkeypatch):
    """sshfs, SMB, 9p...: a syncfs there may only reach the server's cache."""
    calls = _count_calls(monkeypatch)
    monkeypatch.setattr(gs, "filesystem_type", lambda dev: "fuse.sshfs")
    with _wal(tmp_path) as wal:
        for _ in range(3):
            streams = _write(wal, ["a", "b", "c"])
            wal.sync()
        assert calls["syncfs"] == 0 and len(calls["fdatasync"]) == 9
        assert all(s.durable_id == s.next_id for s in streams)


def test_filesystem_type_reads_mountinfo(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
        "40 22 0:45 / /mnt/remote rw,nosuid shared:20 - fuse.sshfs host:/x rw,user_id=0\n"
        "41 22 8:17 / /data rw - xfs /dev/sdb1 rw\n"
    )
    assert gs.filesystem_type(os.makedev(253, 1), str(info)) == "ext4"
    assert gs.filesystem_type(os.makedev(0, 45), str(info)) == "fuse.sshfs"
    assert gs.filesystem_type(os.makedev(8, 17), str(info)) == "xfs"
    assert gs.filesystem_type(os.makedev(9, 9), str(info)) is None
    assert gs.filesystem_type(os.makedev(8, 17), str(tmp_path / "missing")) is None


def test_one_stream_is_fdatasynced(tmp_path, monkeypatch):
    calls = _count_calls(monkeypatch)
    with _wal(tmp_path) as wal:
        _write(wal, ["a", "b"])
        wal.sync("a")
        assert calls["syncfs"] == 0 and len(calls["fdatasync"]) == 1
        _write(wal, ["b"])
        wal.sync()  # only "b" is due
        assert calls["syncfs"] == 0 and len(calls["fdatasync"]) == 2


def test_fdatasync_method_never_calls_syncfs(tmp_path, monkeypatch):
    calls = _count_calls(monkeypatch)
    with _wal(tmp_path, "fdatasync") as wal:
        streams = _write(wal, ["a", "b", "c"])
        wal.sync()
        assert calls["syncfs"] == 0 and len(calls["fdatasync"]) == 3
        assert all(s.durable_id == s.next_id for s in streams)


def test_option_is_validated():
    assert WalOptions(root_path="x", group_sync="FDATASYNC").group_sync is GroupSync.FDATASYNC
    with pytest.raises(ConfigError, match="group_sync"):
        WalOptions(root_path="x", group_sync="sync_everything")


@needs_syncfs
def test_failed_syncfs_falls_back_to_each_file_and_blames_only_the_failing_one(tmp_path, monkeypatch):
    """A syncfs error says nothing about which file failed: each stream is then fdatasynced on
    its own, and only the stream whose own fdatasync fails is failed."""
    with _wal(tmp_path) as wal:
        _warm(wal, ["a", "b", "c"])
        a, b, c = _write(wal, ["a", "b", "c"])
        real_fdatasync = stream_module._fdatasync
        bad_fds = set()

        def syncfs(fd):
            raise OSError(errno.EIO, "writeback failed somewhere")

        def fdatasync(fd):
            if fd in bad_fds:
                raise OSError(errno.EIO, "lost page")
            return real_fdatasync(fd)

        monkeypatch.setattr(gs, "syncfs", syncfs)
        monkeypatch.setattr(stream_module, "_fdatasync", fdatasync)
        entry = b.reader.fdcache.acquire(b._active_path, True)
        bad_fds.add(entry.fd)
        b.reader.fdcache.release(entry)

        results = wal._syncer.sync([a, b, c])
        assert results[0] is None and results[2] is None
        assert isinstance(results[1], WalIOError)
        assert a.durable_id == 6 and c.durable_id == 6 and b.durable_id == 3
        assert wal._syncer.use_syncfs  # an I/O error is not "unsupported": keep using syncfs
        with pytest.raises(StreamFailedError):  # b refuses writes from now on
            wal.append("b", b"more")
        wal.append("a", b"more")  # the others go on
        _write(wal, ["c"], 1)
        with pytest.raises(StreamFailedError):  # Wal.sync() raises the first error after trying all
            wal.sync()
        assert a.durable_id == a.next_id and c.durable_id == c.next_id


@needs_syncfs
def test_unsupported_syncfs_switches_to_fdatasync_for_good(tmp_path, monkeypatch):
    calls = {"n": 0}

    def syncfs(fd):
        calls["n"] += 1
        raise OSError(errno.ENOSYS, "no syncfs")

    with _wal(tmp_path) as wal:
        _warm(wal, ["a", "b"])
        monkeypatch.setattr(gs, "syncfs", syncfs)
        streams = _write(wal, ["a", "b"])
        wal.sync()
        assert all(s.durable_id == s.next_id for s in streams)
        assert not wal._syncer.use_syncfs
        _write(wal, ["a", "b"])
        wal.sync()
        assert calls["n"] == 1 and all(s.durable_id == s.next_id for s in streams)


@needs_syncfs
def test_streams_on_different_filesystems_are_synced_per_filesystem(tmp_path, monkeypatch):
    """One syncfs per filesystem with two or more due streams; a lone stream on its filesystem
    gets an fdatasync (st_dev is faked: a test cannot mount filesystems)."""
    calls = _count_calls(monkeypatch)
    with _wal(tmp_path) as wal:
        streams = _write(wal, ["a", "b", "c", "d", "e"])
        fake = {"a": 1, "b": 1, "c": 2, "d": 2, "e": 3}
        for s in streams:
            wal._syncer._devs[s.dir] = fake[s.name]
        wal.sync()  # opens a directory per filesystem: per file this once
        assert calls["syncfs"] == 0 and len(calls["fdatasync"]) == 5
        _write(wal, ["a", "b", "c", "d", "e"])
        wal.sync()
        assert calls["syncfs"] == 2 and len(calls["fdatasync"]) == 6
        assert all(s.durable_id == s.next_id for s in streams)


@needs_syncfs
def test_a_stream_failed_earlier_is_reported_and_the_rest_synced(tmp_path):
    with _wal(tmp_path) as wal:
        _warm(wal, ["a", "b", "c"])
        a, b, c = _write(wal, ["a", "b", "c"])
        b._failed = OSError(errno.EIO, "earlier")
        results = wal._syncer.sync([a, b, c])
        assert results[0] is None and results[2] is None
        assert isinstance(results[1], StreamFailedError)
        assert a.durable_id == c.durable_id == 6 and b.durable_id == 3


def test_close_syncs_every_stream_and_closes_its_directory(tmp_path):
    wal = _wal(tmp_path)
    streams = _write(wal, ["a", "b", "c"])
    wal.sync()  # opens the directory descriptor used for syncfs (where available)
    _write(wal, ["a", "b", "c"])
    wal.close()
    assert all(s.durable_id == s.next_id == 6 for s in streams)
    assert wal._syncer._dirfds == {}
    assert wal._syncer.sync(streams) == [None, None, None]  # after close: nothing due, nothing reopened
    assert wal._syncer._dirfds == {}
    with Wal(WalOptions(root_path=tmp_path / "wal")) as again:
        assert [list(again.iter(n)) for n in "abc"] == [
            [b"%s-%d" % (n.encode(), i % 3) for i in range(6)] for n in "abc"
        ]


def test_syncfs_reports_errors_as_oserror(monkeypatch):
    if gs._syncfs is None:
        with pytest.raises(OSError) as info:
            gs.syncfs(0)
        assert info.value.errno == errno.ENOSYS
        return
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError) as info:
        gs.syncfs(w)  # a closed descriptor
    assert info.value.errno == errno.EBADF


def test_only_kernels_that_report_syncfs_errors_use_it():
    assert gs._reports_errors("6.18.44-fc-v669") and gs._reports_errors("5.8.0")
    assert not gs._reports_errors("5.7.19") and not gs._reports_errors("4.19.0-generic")
    assert not gs._reports_errors("weird")
