"""The coordinator's restart policy for workers (coordinator/supervisor.py), on a fake clock."""

from __future__ import annotations

import pytest

from coordinator import supervisor as S


def test_quick_exits_back_off_then_fail_the_shards_at_once(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(S.time, "monotonic", lambda: now[0])
    sup = S.Supervisor("/nonexistent", [[0, 1]], {})
    waits = []
    while True:
        sup.started_at[0] = now[0]  # (re)started here ...
        now[0] += 0.01  # ... and dead right after
        if sup.due(0):
            waits.append(0.0)
        else:
            waits.append(round(sup.next_try[0] - now[0], 3))
            now[0] = sup.next_try[0]
            assert sup.due(0)
        if sup.gave_up(0):
            break
    assert waits == [0.1, 0.2, 0.4, 0.8, 1.6, 0.0]
    assert sup.quick_failures[0] == S.MAX_QUICK_FAILURES


def test_a_worker_that_ran_a_while_is_restarted_at_once_and_forgiven(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(S.time, "monotonic", lambda: now[0])
    sup = S.Supervisor("/nonexistent", [[0]], {})
    sup.started_at[0] = now[0]
    now[0] += 0.01
    assert not sup.due(0)  # a quick exit: back off
    now[0] += 0.1
    assert sup.due(0)
    sup.started_at[0] = now[0]
    now[0] += S.QUICK_S + 1  # this one ran a while
    assert sup.due(0) and sup.quick_failures[0] == 0 and not sup.gave_up(0)


@pytest.mark.parametrize("args, says", [
    (["--shards", "300", "--ring-size", "65536", "--workers", "257"], b"--workers must be in 1..256"),
    (["--shards", "2", "--ring-size", "65537"], b"--ring-size: ring capacity must be a power of two"),
    (["--shards", "2", "--ring-size", str(1 << 32)], b"--ring-size: ring capacity must be a power of two"),
])
def test_the_coordinator_run_by_hand_refuses_bad_options_before_writing(tmp_path, args, says):
    """(A ring size past 2**31 once failed only after MANIFEST and LOCK were written.)"""
    import os
    import subprocess
    import sys

    from ironwal_mp.ipc.names import Names

    root = str(tmp_path / "wal")
    here = os.path.dirname(os.path.dirname(os.path.abspath(S.__file__)))
    proc = subprocess.run([sys.executable, "-m", "coordinator", "--root", root, *args], cwd=here,
                          capture_output=True, timeout=60, env={**os.environ, "PYTHONPATH": here})
    assert proc.returncode == 2 and says in proc.stderr, proc.stderr
    assert not os.path.exists(root) and Names(root).leftovers() == []
