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


class _KeptRing:
    """A kept ring whose durability wait ends as told (no shared memory)."""

    def __init__(self, shard, state, outcome):
        from ironwal_mp.ipc import ring_layout as L

        self.shard, self.header, self.outcome, self.liveness = shard, {L.STATE: state}, outcome, None
        self.waited = False

    def next_seq(self, timeout=30.0):
        return 7

    def wait_durable(self, upto, timeout, registered=True):
        self.waited = True
        assert upto == 7 and not registered and self.liveness is not None
        if self.outcome is not None:
            raise self.outcome


@pytest.mark.parametrize("case", ["durable", "timed-out", "shard-failed", "worker-died", "failed-before"])
def test_waiting_for_kept_records_before_ready(case, caplog):
    """Start-up waits for kept rings' records to be durable; a shard failing or a wait past
    KEPT_WAIT_S does not fail the start (the others serve; records come as synced); a worker
    that dies does."""
    from coordinator.coordinator import Coordinator, StartupError
    from ironwal_mp.errors import WorkerFailedError
    from ironwal_mp.ipc import ring_layout as L

    coord = Coordinator.__new__(Coordinator)
    coord.shard_count = 1
    dead = []

    class Sup:
        procs = {0: type("P", (), {"returncode": -9})()}

        def dead(self):
            return dead

    coord.supervisor = Sup()
    state = L.ST_FAILED if case == "failed-before" else L.ST_OPEN
    ring = _KeptRing(0, state, {"timed-out": WorkerFailedError("no durability before the timeout"),
                                "shard-failed": WorkerFailedError("shard 0 failed")}.get(case))
    if case == "shard-failed":  # (the worker fails the shard during the wait)
        real = ring.wait_durable

        def wait(upto, timeout, registered=True):
            ring.header[L.STATE] = L.ST_FAILED
            real(upto, timeout, registered)

        ring.wait_durable = wait
    if case == "worker-died":
        dead.append(0)

        def wait(upto, timeout, registered=True):
            ring.liveness()

        ring.wait_durable = wait
    coord.kept = {0: ring}
    if case == "worker-died":
        with pytest.raises(StartupError, match="exited with status -9 while writing the records kept"):
            coord._wait_kept_durable()
    else:
        coord._wait_kept_durable()
    assert ring.liveness is None
    assert ring.waited == (case in ("durable", "timed-out", "shard-failed"))
    if case == "timed-out":
        assert "serving anyway" in caplog.text


class _Replies:
    """P_wrep, polled: the messages given, then nothing."""

    def __init__(self, messages):
        self.messages = list(messages)

    def receive(self, timeout):
        return self.messages.pop(0) if self.messages else None


class _GivingUpSupervisor:
    """One worker, dead, whose next restart is the one given up on."""

    def __init__(self):
        self.procs = [type("P", (), {"returncode": 1})()]

    def dead(self):
        return [w for w, p in enumerate(self.procs) if p is not None]

    def due(self, w):
        return True

    def gave_up(self, w):
        return True

    def exit_status(self, w):
        from coordinator.supervisor import Supervisor

        return Supervisor.exit_status(self, w)  # (reads only .procs)


class _FakeRing:
    def __init__(self):
        self.header, self.woken = {}, False
        self.space_free = type("Sem", (), {"release": lambda self: None})()

    def set_state(self, state):
        from ironwal_mp.ipc import ring_layout as L

        self.header[L.STATE] = state

    def wake_durable_waiters(self):
        self.woken = True


def _coordinator(replies):
    """A Coordinator of worker 0 with shards 0 and 1, on fakes (no process, no IPC object)."""
    from coordinator.coordinator import Coordinator

    coord = Coordinator.__new__(Coordinator)
    coord.assignment, coord.start_errors, coord.stopping = [[0, 1]], {}, False
    coord.worker_replies, coord.supervisor, coord.rings = _Replies(replies), _GivingUpSupervisor(), [_FakeRing(), _FakeRing()]
    return coord


def _disk_full_error():
    import errno

    from ironwal_mp import errors as E

    return E.io_error(OSError(errno.ENOSPC, "No space left on device"), "/w/shard_01", "recovering stream")


@pytest.mark.parametrize("said", ["disk-full", "nothing"])
def test_a_worker_given_up_on_fails_its_shards_with_the_reason_it_gave(said):
    """A worker that keeps exiting at start gets its shards failed. When it said why (an
    ERROR on the reply queue: a full disk), the shards fail with that errno, so appends say "the
    disk is full ... free space" instead of only "kept exiting right after it started"."""
    import errno

    from ironwal_mp.ipc import messages as M
    from ironwal_mp.ipc import ring_layout as L
    from ironwal_mp.ipc.ring import _state_error

    replies = [M.Message(M.PREPARED, 0, 3, {"durable": {}})]  # (a late reply: dropped)
    if said == "disk-full":
        replies.append(M.Message(M.ERROR, 0, 0, M.error_body(_disk_full_error())))
    coord = _coordinator(replies)
    assert coord._restart_dead() == [] and coord.supervisor.procs[0] is None
    for ring in coord.rings:
        assert ring.header[L.STATE] == L.ST_FAILED and ring.woken
        assert ring.header[L.ERRNO] == (errno.ENOSPC if said == "disk-full" else L.ERR_GAVE_UP)
    text = str(_state_error(0, L.ST_FAILED, coord.rings[0].header[L.ERRNO]))
    assert ("the disk is full" in text) == (said == "disk-full")


def test_a_start_error_that_arrives_while_a_request_waits_is_kept():
    """A worker restarted just before a checkpoint or prune may fail its start while the
    coordinator waits for the answers: its ERROR (req_id 0) was read there, ignored as no
    answer, and lost, so the shards given up on next said only "kept exiting" (not "the disk
    is full")."""
    import errno

    from ironwal_mp.ipc import messages as M
    from ironwal_mp.ipc import ring_layout as L

    coord = _coordinator([M.Message(M.ERROR, 0, 0, M.error_body(_disk_full_error()))])
    seen = []
    coord._await(seen.append, lambda: bool(seen), timeout=5.0)  # (the dead worker is told as FAILED)
    assert [(m.kind, m.body) for m in seen] == [(M.FAILED, {"died": True, "error": "worker 0 died (exit status 1)"})]
    coord._restart_dead()
    assert [ring.header[L.ERRNO] for ring in coord.rings] == [errno.ENOSPC] * 2


@pytest.mark.parametrize("code", ["ENOTRECOVERABLE", "ESRCH"])
def test_a_worker_error_whose_errno_is_a_special_ring_code_fails_the_shards_as_given_up(code):
    """ERRNO borrows ENOTRECOVERABLE (ERR_CANNOT_RESUME: the ring is kept across opens and
    clients are told its files lack ids) and ESRCH (ERR_GAVE_UP). A worker's start error with
    one of those errnos was stored as is: ENOTRECOVERABLE made a given-up shard read as one that
    cannot resume, and its ring was kept by every later open."""
    import errno

    from ironwal_mp import errors as E
    from ironwal_mp.ipc import messages as M
    from ironwal_mp.ipc import ring_layout as L

    exc = E.io_error(OSError(getattr(errno, code), "odd"), "/w/shard_01", "recovering stream")
    coord = _coordinator([M.Message(M.ERROR, 0, 0, M.error_body(exc))])
    coord._restart_dead()
    assert [ring.header[L.ERRNO] for ring in coord.rings] == [L.ERR_GAVE_UP] * 2
    assert [L.error_errno(c) for c in (errno.ENOSPC, errno.ENOTRECOVERABLE, errno.ESRCH, 0, -5, None, True)] == [
        errno.ENOSPC, 0, 0, 0, 0, 0, 0]


def test_a_start_fails_with_the_reason_a_dead_worker_gave_not_only_the_first_ones_status():
    """Two workers dead at start-up, only the second said why: the start raises its reason."""
    from coordinator.coordinator import StartupError
    from ironwal_mp import errors as E
    from ironwal_mp.ipc import messages as M
    from ironwal_mp.ipc import ring_layout as L

    coord = _coordinator([M.Message(M.ERROR, 1, 0, M.error_body(_disk_full_error()))])
    coord.supervisor.procs.append(type("P", (), {"returncode": 1})())
    coord.ctl = type("Ctl", (), {"epoch": 1})()
    for ring in coord.rings:
        ring.set_state(L.ST_NEW)  # (not open yet: its worker died opening it)
    with pytest.raises(StartupError) as info:
        coord._wait_workers_open()
    assert isinstance(info.value.error, E.DiskFullError)
