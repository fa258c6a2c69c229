"""The checkpoint barrier's state, apart from any I/O (see docs/PROTOCOL.md, "Checkpoints").

After the cut, the coordinator asks every worker that owns a shard to make its shard durable
up to the cut (PREPARE). The barrier collects the answers: it commits only when every worker
answered PREPARED with durable ids at or past its cuts; any failure, worker death or timeout
aborts it. Stale answers (of an earlier, aborted barrier) are ignored.
"""

from __future__ import annotations

import enum
from typing import Dict, List, Optional


class Phase(enum.Enum):
    PREPARING = "preparing"
    PREPARED = "prepared"  # every worker answered: the record may be written
    ABORTED = "aborted"


class Barrier:
    def __init__(self, req_id: int, cuts: List[int], worker_of: List[int]) -> None:
        if len(cuts) != len(worker_of):
            raise ValueError("one cut per shard")
        self.req_id = req_id
        self.cuts = list(cuts)
        self.by_worker: Dict[int, Dict[int, int]] = {}
        for shard, cut in enumerate(cuts):
            self.by_worker.setdefault(worker_of[shard], {})[shard] = cut
        self.waiting = set(self.by_worker)
        self.durable: Dict[int, int] = {}
        self.phase = Phase.PREPARING if self.waiting else Phase.PREPARED
        self.error: Optional[str] = None

    def prepare_requests(self) -> Dict[int, Dict[int, int]]:
        """worker -> {shard: cut}: what to send each worker."""
        return {w: dict(c) for w, c in self.by_worker.items()}

    def on_prepared(self, worker: int, req_id: int, durable: Dict[int, int]) -> None:
        if req_id != self.req_id or self.phase is not Phase.PREPARING or worker not in self.waiting:
            return
        for shard, cut in self.by_worker[worker].items():
            got = durable.get(shard, -1)
            if got < cut:
                return self._abort(f"worker {worker} made shard {shard} durable to {got}, below the cut {cut}")
            self.durable[shard] = got
        self.waiting.discard(worker)
        if not self.waiting:
            self.phase = Phase.PREPARED

    def on_failed(self, worker: int, req_id: int, error: str) -> None:
        if req_id == self.req_id and worker in self.by_worker:
            self._abort(f"worker {worker} could not prepare: {error}")

    def on_worker_died(self, worker: int, how: Optional[str] = None) -> None:
        """``how``: the coordinator's account of the exit ("worker 1 died (killed by SIGKILL)")."""
        if worker in self.waiting:
            self._abort(f"{how or f'worker {worker} died'} during the checkpoint")

    def on_timeout(self) -> None:
        if self.phase is Phase.PREPARING:
            self._abort(f"workers {sorted(self.waiting)} did not answer in time")

    def _abort(self, why: str) -> None:
        if self.phase is Phase.PREPARING:
            self.phase = Phase.ABORTED
            self.error = why

    @property
    def done(self) -> bool:
        return self.phase is not Phase.PREPARING

    @property
    def offsets(self) -> List[int]:
        """The checkpoint's offsets: each shard's next id at the cut."""
        if self.phase is not Phase.PREPARED:
            raise RuntimeError("barrier has not prepared")
        return list(self.cuts)
