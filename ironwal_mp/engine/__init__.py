"""The storage engine: the only code that writes or parses log files.

``frame`` encodes and decodes frames (pure), ``layout`` names files and reads/writes the small
index files, ``scanner`` walks frames in a segment, ``recovery`` repairs a stream's tail,
``fdcache`` bounds open files, ``stream`` is one stream's writer and reader, ``wal`` the public
multi-stream class, and ``checkpoint_log`` the sharded root's checkpoint records.
"""
