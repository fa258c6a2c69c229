"""Shard worker processes: each drains the rings of the shards it owns into segment files.

Started by the coordinator as ``python -m workers --root DIR --shards 0,1 --index W``.
"""
