"""Starting, watching and restarting worker processes (fresh interpreters, never forks)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional

log = logging.getLogger("ironwal_mp.coordinator")

#: a worker that exits within this long of starting failed "quickly"
QUICK_S = 5.0
#: after this many quick failures in a row, its shards are failed instead of restarted again
MAX_QUICK_FAILURES = 6
MAX_BACKOFF_S = 5.0


def assign_shards(shard_count: int, workers: int) -> List[List[int]]:
    """Whole shards per worker, in contiguous runs as even as possible."""
    workers = max(1, min(workers, shard_count))
    base, extra = divmod(shard_count, workers)
    out, start = [], 0
    for w in range(workers):
        n = base + (1 if w < extra else 0)
        out.append(list(range(start, start + n)))
        start += n
    return out


def _project_path() -> str:
    import workers

    return os.path.dirname(os.path.dirname(os.path.abspath(workers.__file__)))


class Supervisor:
    def __init__(self, root: str, assignment: List[List[int]], env: Dict[str, str]) -> None:
        self.root = root
        self.assignment = assignment
        path = _project_path()
        self.env = dict(env)
        self.env["PYTHONPATH"] = path + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.procs: List[Optional[subprocess.Popen]] = [None] * len(assignment)
        self.restarts = [0] * len(assignment)
        self.started_at = [0.0] * len(assignment)
        self.quick_failures = [0] * len(assignment)  # exits within QUICK_S of starting, in a row
        self.next_try = [0.0] * len(assignment)

    def command(self, index: int) -> List[str]:
        shards = ",".join(str(s) for s in self.assignment[index])
        return [sys.executable, "-m", "workers", "--root", self.root, "--shards", shards, "--index", str(index)]

    def start(self, index: int) -> subprocess.Popen:
        proc = subprocess.Popen(self.command(index), env=self.env, stdin=subprocess.DEVNULL, close_fds=True)
        self.procs[index] = proc
        self.started_at[index] = time.monotonic()
        return proc

    def due(self, index: int) -> bool:
        """Whether a dead worker may be restarted now (restarts back off after quick exits)."""
        now = time.monotonic()
        if not self.next_try[index]:
            quick = now - self.started_at[index] < QUICK_S
            self.quick_failures[index] = self.quick_failures[index] + 1 if quick else 0
            delay = min(MAX_BACKOFF_S, 0.05 * 2 ** self.quick_failures[index]) if quick else 0.0
            if self.gave_up(index):
                delay = 0.0  # no restart follows: fail its shards now, not after a last wait
            self.next_try[index] = now + delay
        if now < self.next_try[index]:
            return False
        self.next_try[index] = 0.0
        return True

    def gave_up(self, index: int) -> bool:
        return self.quick_failures[index] >= MAX_QUICK_FAILURES

    def start_all(self) -> None:
        for i in range(len(self.assignment)):
            self.start(i)

    def pids(self) -> List[int]:
        return [p.pid if p is not None else 0 for p in self.procs]

    def dead(self) -> List[int]:
        """Indexes of workers that have exited (reaped); a failed-for-good worker is None."""
        return [i for i, p in enumerate(self.procs) if p is not None and p.poll() is not None]

    def exit_status(self, index: int) -> str:
        """How an exited worker ended, for messages: "exit status 1", "killed by SIGKILL"."""
        proc = self.procs[index]
        code = proc.returncode if proc is not None else None
        if code is None:
            return "exit status unknown"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit status {code}"

    def restart(self, index: int) -> subprocess.Popen:
        old = self.procs[index]
        log.warning("worker %d (pid %s) ended (%s); restarting it", index, old.pid if old else "?", self.exit_status(index))
        self.restarts[index] += 1
        return self.start(index)

    def wait_all(self, timeout: float) -> None:
        """Wait for every worker to exit; kill those still running after ``timeout``."""
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            if proc is None:
                continue
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker pid %d did not stop in time; killing it", proc.pid)
                proc.kill()
                proc.wait()

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
