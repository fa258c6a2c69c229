"""Shared memory limits: the defaults fit a 64 MiB /dev/shm, and running out is a clear error."""

import os

import pytest

from ironwal_mp import SharedMemoryError, ShardedWal, SyncMode, WalOptions
from ironwal_mp.ipc.names import SHM_DIR, Names
from ironwal_mp.sharded.manifest import open_manifest, recorded_shard_count


def test_default_layout_fits_a_64_mib_dev_shm(wal_root):
    with ShardedWal(WalOptions(root_path=wal_root, sync_mode=SyncMode.ASYNC), 16):
        stem = Names(wal_root).prefix.lstrip("/")
        total = sum(
            os.path.getsize(os.path.join(SHM_DIR, name)) for name in os.listdir(SHM_DIR) if stem in name
        )
    assert 0 < total <= 64 * 1024 * 1024 // 2, f"16 default shards use {total} bytes of /dev/shm"


def test_running_out_of_shared_memory_is_a_clear_error(wal_root):
    # rings of the largest size, more of them than /dev/shm holds: refused before any is made
    # (ipc/shm_room.py; never run this without that check: it would fill memory)
    shm_size = os.statvfs(SHM_DIR).f_blocks * os.statvfs(SHM_DIR).f_frsize
    shards = shm_size // (1 << 31) + 2
    if shards > 1000:
        pytest.skip(f"/dev/shm ({shm_size} bytes) holds more than 1000 rings of 2 GiB")
    with pytest.raises(SharedMemoryError) as info:
        ShardedWal(WalOptions(root_path=wal_root), shards, workers=1, ring_size=1 << 31)
    message = str(info.value)
    assert "ring_size" in message and "/dev/shm" in message
    # nothing was written and nothing is left over (the wal_root fixture checks IPC objects)
    assert not any(name.startswith("shard_") for name in os.listdir(wal_root))
    assert "MANIFEST" not in os.listdir(wal_root)
    # so the retry the message suggests may also take another shard count
    with ShardedWal(WalOptions(root_path=wal_root), 2, workers=1) as wal:
        assert wal.shard_count == 2


def test_every_shared_memory_page_is_allocated_up_front(wal_root):
    """A page of tmpfs is allocated at its first store; if /dev/shm is full by then the process
    dies of SIGBUS. So the control block and every ring are allocated whole when created."""
    with ShardedWal(WalOptions(root_path=wal_root, sync_mode=SyncMode.ASYNC), 2, workers=1):
        stem = Names(wal_root).prefix.lstrip("/")
        shm = [n for n in os.listdir(SHM_DIR) if stem in n and not n.startswith("sem.")]
        assert any(n.endswith("_ctl") for n in shm) and any("_ring" in n for n in shm), shm
        for name in shm:
            st = os.stat(os.path.join(SHM_DIR, name))
            assert st.st_blocks * 512 >= st.st_size, f"{name}: {st.st_blocks * 512} of {st.st_size} bytes allocated"


def test_the_room_a_start_needs_is_checked_against_dev_shm_and_memory():
    """Pure arithmetic: nothing is allocated."""
    from ironwal_mp.ipc import shm_room as R

    ring = 1 << 20
    need = R.start_needs(2, ring)
    assert need == 2 * (4096 + ring) + 16384
    assert R.start_needs(0, ring) == 16384, "kept rings are not created again; the control block is"
    big = 1 << 40
    assert R.refusal(need, R.Room(need, big)) is None, "exactly the free space fits"
    assert "/dev/shm has 100 bytes free" in R.refusal(need, R.Room(100, big))
    # memory: a reserve is left (the larger of 64 MiB and an eighth of what is available)
    avail = 1 << 30
    usable = avail - avail // 8
    assert R.refusal(usable, R.Room(big, avail)) is None
    assert "MemAvailable" in R.refusal(usable + 1, R.Room(big, avail))
    assert R.refusal(1, R.Room(big, 64 << 20)) is not None, "at least 64 MiB are left alone"
    assert R.refusal(need, R.Room(None, None)) is None, "figures that cannot be read refuse nothing"
    with pytest.raises(SharedMemoryError) as info:
        R.check_room(2, 1 << 31, R.Room(big, 4 << 30))
    message = str(info.value)
    assert "ring_size" in message and str(4 << 30) in message and str(R.start_needs(2, 1 << 31)) in message


def test_the_room_a_memory_cgroup_allows_is_checked_like_the_memory_available():
    """Pure arithmetic: a container's limit refuses what the machine's free memory would allow."""
    from ironwal_mp.ipc import shm_room as R

    big = 1 << 40
    room = 1 << 30
    usable = room - room // 8
    assert R.refusal(usable, R.Room(big, big, room)) is None
    why = R.refusal(usable + 1, R.Room(big, big, room))
    assert why is not None and "cgroup" in why and str(room) in why
    assert R.refusal(1, R.Room(big, big, 64 << 20)) is not None, "at least 64 MiB are left alone"
    # the inactive file cache (reclaimed before the OOM killer runs) is not counted as used
    assert R.cgroup_headroom(1000, 900, 300) == 400
    assert R.cgroup_headroom(1000, 1200, 0) == 0, "usage past the limit leaves no room"


def _fake_cgroups(root, self_cgroup: str, files: dict):
    """A fake /proc (self/cgroup, no meminfo) and /sys/fs/cgroup under ``root``: ``files`` maps
    a cgroup directory (relative to the cgroup root) to {file name: content}."""
    proc, cgroup = root / "proc", root / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(self_cgroup)
    for directory, contents in files.items():
        (cgroup / directory).mkdir(parents=True, exist_ok=True)
        for name, text in contents.items():
            (cgroup / directory / name).write_text(text)
    return str(proc), str(cgroup)


def _v2(limit: str, current: int, inactive: int = 0) -> dict:
    return {"memory.max": f"{limit}\n", "memory.current": f"{current}\n",
            "memory.stat": f"anon {current}\nfile 0\ninactive_file {inactive}\nshmem 0\n"}


@pytest.mark.parametrize("case", ["v2", "v2_max", "v2_parent", "v2_both", "v1", "v1_unlimited", "v1_container"])
def test_the_memory_cgroup_room_is_read_from_proc_and_sys_fs_cgroup(tmp_path, case):
    from ironwal_mp.ipc import shm_room as R

    gib = 1 << 30
    self_v2 = "0::/box/app\n"
    self_v1 = "9:name=systemd:/\n4:cpu,memory:/box/app\n1:cpuset:/\n0::/\n"
    v1_unlimited = {"memory.limit_in_bytes": "9223372036854771712\n", "memory.usage_in_bytes": "5000\n"}
    layouts = {
        # (its /proc/self/cgroup, its cgroup files, the room expected)
        "v2": (self_v2, {"box/app": _v2(str(gib), gib // 4, gib // 8)}, gib - gib // 8),
        "v2_max": (self_v2, {"": _v2("max", 5000), "box": _v2("max", 5000), "box/app": _v2("max", 5000)}, None),
        "v2_parent": (self_v2, {"box": _v2(str(gib), gib // 2), "box/app": _v2("max", gib // 4)}, gib // 2),
        "v2_both": (self_v2, {"box": _v2(str(gib), gib // 2), "box/app": _v2(str(2 * gib), gib // 4)}, gib // 2),
        "v1": (self_v1, {"memory": v1_unlimited, "memory/box/app": {
            "memory.limit_in_bytes": f"{gib}\n", "memory.usage_in_bytes": f"{gib // 2}\n",
            "memory.stat": f"inactive_file 1\ntotal_inactive_file {gib // 4}\n"}}, gib - gib // 4),
        "v1_unlimited": (self_v1, {"memory": v1_unlimited, "memory/box/app": v1_unlimited}, None),
        # a container sees its own cgroup at the root while /proc names the host's path
        "v1_container": (self_v1, {"memory": {"memory.limit_in_bytes": f"{gib}\n",
                                              "memory.usage_in_bytes": f"{gib // 2}\n"}}, gib // 2),
    }
    self_cgroup, files, expected = layouts[case]
    proc, cgroup = _fake_cgroups(tmp_path, self_cgroup, files)
    room = R.read_room(proc, cgroup)
    assert room.cgroup_room == expected
    assert room.mem_available is None, "no meminfo in the fake /proc"


def test_a_memory_cgroup_that_cannot_be_read_refuses_nothing(tmp_path):
    from ironwal_mp.ipc import shm_room as R

    assert R.read_room(str(tmp_path / "no_proc"), str(tmp_path / "no_cgroup")).cgroup_room is None
    gib = 1 << 30
    # a limit whose usage is missing or garbled, or a usage without a limit: that level is skipped
    proc, cgroup = _fake_cgroups(tmp_path / "a", "0::/box/app\n", {
        "box": {"memory.max": f"{gib}\n"},
        "box/app": {"memory.max": f"{gib}\n", "memory.current": "lots\n"},
        "": {"memory.current": "5000\n"},
    })
    assert R.read_room(proc, cgroup).cgroup_room is None
    # no memory controller and no v2 line, or a path outside the namespace
    for self_cgroup in ("4:cpu:/box\n", "0::/../../box\n"):
        proc, cgroup = _fake_cgroups(tmp_path / str(len(self_cgroup)), self_cgroup, {"": _v2(str(gib), 0)})
        assert R.read_room(proc, cgroup).cgroup_room is None, self_cgroup
    # an unreadable memory.stat counts the whole usage
    proc, cgroup = _fake_cgroups(tmp_path / "b", "0::/\n", {"": {"memory.max": "1000", "memory.current": "400"}})
    assert R.read_room(proc, cgroup).cgroup_room == 600
    big = 1 << 40
    assert R.refusal(1 << 20, R.Room(big, big, None)) is None


@pytest.mark.parametrize("room", ["dev_shm", "memory", "cgroup"])
def test_a_start_refuses_rings_the_machine_cannot_hold_before_creating_any(wal_root, monkeypatch, room):
    """Rings bigger than free memory but within /dev/shm's size were allocated page by page until
    the OOM killer killed the coordinator: the start-up now checks both figures before it
    creates anything. (The check is made to see small figures: no large ring is allocated.)"""
    import json

    from coordinator.coordinator import Coordinator, StartupError
    from ironwal_mp.ipc import shm_room as R

    small = R.start_needs(2, 1 << 16) - 1  # one byte short of two 64 KiB rings and the control block
    figures = {
        "dev_shm": R.Room(small, None),
        "memory": R.Room(None, small + R.RESERVE_MIN),
        "cgroup": R.Room(None, None, small + R.RESERVE_MIN),
    }[room]
    monkeypatch.setattr(R, "read_room", lambda: figures)
    coord = Coordinator(wal_root, 2, 1, 1 << 16, json.dumps({"root_path": wal_root}))
    try:
        with pytest.raises(StartupError) as info:
            coord.start()
    finally:
        coord.shutdown()
    err = info.value.error
    assert isinstance(err, SharedMemoryError) and isinstance(err, OSError)
    assert "ring_size 65536" in str(err) and str(small + (room != "dev_shm") * R.RESERVE_MIN) in str(err)
    assert Names(wal_root).leftovers() == [], "nothing was created"
    assert not any(name.startswith("shard_") for name in os.listdir(wal_root))
    # the MANIFEST it wrote is taken back: a retry may choose another shard count
    assert not os.path.exists(os.path.join(wal_root, "MANIFEST"))
    assert recorded_shard_count(wal_root) is None


def test_a_failed_start_keeps_a_manifest_it_did_not_write(wal_root, monkeypatch):
    import json

    from coordinator.coordinator import Coordinator, StartupError
    from ironwal_mp.ipc import shm_room as R

    open_manifest(wal_root, 2)
    monkeypatch.setattr(R, "read_room", lambda: R.Room(1, None))
    coord = Coordinator(wal_root, 2, 1, 1 << 16, json.dumps({"root_path": wal_root}))
    try:
        with pytest.raises(StartupError):
            coord.start()
    finally:
        coord.shutdown()
    assert recorded_shard_count(wal_root) == 2


def test_serve_checks_the_shard_count_without_writing_a_manifest(wal_root):
    """`serve` checks the count before starting; the coordinator alone writes MANIFEST (so a
    start that fails can take it back)."""
    from ironwal_mp.errors import ShardCountMismatchError

    assert open_manifest(wal_root, 3, create=False)[1] is False
    assert not os.path.exists(os.path.join(wal_root, "MANIFEST"))
    open_manifest(wal_root, 3)
    os.mkdir(os.path.join(wal_root, "shard_00"))  # (a MANIFEST that describes nothing is no obstacle)
    with pytest.raises(ShardCountMismatchError):
        open_manifest(wal_root, 4, create=False)


@pytest.mark.parametrize("used_by", [None, "ready", "shard_01", "checkpoints.log", "HEAD"])
def test_a_manifest_left_by_a_dead_start_yields_to_another_shard_count(wal_root, used_by):
    """A coordinator SIGKILLed while starting, after it wrote MANIFEST and before any shard or
    checkpoint existed, left a directory that refused every other shard count, and nothing in
    it told a retry why. Once a start was ready, or anything the MANIFEST describes exists, its
    count binds (an empty WAL reopened with another count is refused, as any other)."""
    import json

    from ironwal_mp.errors import ShardCountMismatchError
    from ironwal_mp.sharded.manifest import confirm_manifest, read_manifest

    assert open_manifest(wal_root, 2)[0].starting and read_manifest(wal_root).starting
    if used_by == "ready":
        confirm_manifest(wal_root)
        assert not read_manifest(wal_root).starting and read_manifest(wal_root).shard_count == 2
    elif used_by is not None and used_by.startswith("shard_"):
        os.mkdir(os.path.join(wal_root, used_by))
    elif used_by is not None:
        open(os.path.join(wal_root, used_by), "wb").close()
    if used_by is not None:
        for create in (False, True):
            with pytest.raises(ShardCountMismatchError):
                open_manifest(wal_root, 3, create=create)
        assert recorded_shard_count(wal_root) == 2
        return
    assert open_manifest(wal_root, 3, create=False)[1] is False
    assert recorded_shard_count(wal_root) == 2  # (a check writes nothing)
    manifest, written = open_manifest(wal_root, 3)
    assert written and manifest.shard_count == 3 and recorded_shard_count(wal_root) == 3
    with open(os.path.join(wal_root, "MANIFEST"), "rb") as fh:
        assert json.loads(fh.read())["shard_count"] == 3


def test_a_start_killed_after_writing_its_manifest_does_not_fix_the_shard_count(wal_root):
    """SIGKILL a coordinator right after it took LOCK and wrote MANIFEST (as its next step, the
    clean-up of leftovers, begins): a start with another shard count then works."""
    import subprocess
    import sys
    import textwrap

    from ironwal_mp.errors import ShardCountMismatchError

    script = textwrap.dedent(f"""
        import json, os, signal
        from coordinator import coordinator as C
        C.Coordinator._clear_leftovers = lambda self: os.kill(os.getpid(), signal.SIGKILL)
        C.Coordinator({wal_root!r}, 2, 1, 1 << 16, json.dumps({{"root_path": {wal_root!r}}})).start()
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=os.path.dirname(os.path.dirname(__file__)),
                          capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr.decode()
    assert recorded_shard_count(wal_root) == 2
    opts = WalOptions(root_path=wal_root, sync_mode=SyncMode.STRICT)
    with ShardedWal(opts, 3) as wal:
        assert wal.shard_count == 3
    assert Names(wal_root).leftovers() == []
    # that start was ready: its count binds now, though nothing was written
    with pytest.raises(ShardCountMismatchError):
        ShardedWal(opts, 2)
    with ShardedWal(opts, 3) as wal:
        shard, seq = wal.append(b"k", b"v")
        assert wal.get(shard, seq) == b"v"
    assert Names(wal_root).leftovers() == []
