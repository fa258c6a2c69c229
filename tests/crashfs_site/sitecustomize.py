"""Puts every Python process started with ``CRASHFS_SHARED`` set (a sharded WAL's coordinator
and workers, in ``test_crash_states_sharded.py``) under crashfs's shared recorder."""

import os
import sys

if os.environ.get("CRASHFS_SHARED"):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import crashfs

    crashfs.join_shared_recording()
