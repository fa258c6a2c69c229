"""The coordinator process: one per WAL directory, off the data path.

It owns the layout (MANIFEST, LOCK, IPC objects), starts and supervises the shard workers,
drives the two-phase checkpoint barrier, pruning and checkpoint-log compaction, and answers
control requests. Started as ``python -m coordinator --root DIR --shards N``.
"""
