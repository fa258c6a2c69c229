"""The sharded layer's client side: routing, the MANIFEST, and the ``ShardedWal`` handle."""
