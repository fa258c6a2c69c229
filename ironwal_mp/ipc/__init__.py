"""Inter-process plumbing of the sharded layer (see docs/PROTOCOL.md).

``names`` derives the POSIX IPC object names of a WAL root, ``ring_layout`` is the pure
arithmetic of a shard's ring, ``ring`` the shared-memory ring itself (producer and worker
sides), ``control`` the control block, ``messages`` the control-message codec and
``queues`` the POSIX message queue wrapper.
"""
