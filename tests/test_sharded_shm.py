"""Shared memory limits: the defaults fit a 64 MiB /dev/shm, and running out is a clear error."""

import os

import pytest

from ironwal_mp import SharedMemoryError, ShardedWal, SyncMode, WalOptions
from ironwal_mp.ipc.names import SHM_DIR, Names


def test_default_layout_fits_a_64_mib_dev_shm(wal_root):
    with ShardedWal(WalOptions(root_path=wal_root, sync_mode=SyncMode.ASYNC), 16):
        stem = Names(wal_root).prefix.lstrip("/")
        total = sum(
            os.path.getsize(os.path.join(SHM_DIR, name)) for name in os.listdir(SHM_DIR) if stem in name
        )
    assert 0 < total <= 64 * 1024 * 1024 // 2, f"16 default shards use {total} bytes of /dev/shm"


def test_running_out_of_shared_memory_is_a_clear_error(wal_root):
    # a ring larger than /dev/shm itself: tmpfs refuses the allocation at once (ENOSPC)
    shm_size = os.statvfs(SHM_DIR).f_blocks * os.statvfs(SHM_DIR).f_frsize
    ring_size = 1 << max(30, shm_size.bit_length())
    with pytest.raises(SharedMemoryError) as info:
        ShardedWal(WalOptions(root_path=wal_root), 2, ring_size=ring_size)
    message = str(info.value)
    assert "ring_size" in message and "/dev/shm" in message
    # nothing was written and nothing is left over (the wal_root fixture checks IPC objects)
    assert not any(name.startswith("shard_") for name in os.listdir(wal_root))


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
