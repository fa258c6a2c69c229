"""Small thread-safe LRU caches for reads: sealed-segment indexes and decoded frames."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Generic, Hashable, Optional, TypeVar

V = TypeVar("V")


class LruCache(Generic[V]):
    """An LRU bounded by a total ``budget``, each value costing ``cost(value)`` (default 1)."""

    def __init__(self, budget: int, cost: Optional[Callable[[V], int]] = None) -> None:
        self.budget = budget
        self._cost = cost or (lambda _value: 1)
        self._items: "OrderedDict[Hashable, tuple[V, int]]" = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> Optional[V]:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: Hashable, value: V) -> None:
        cost = self._cost(value)
        if cost > self.budget:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._used -= old[1]
            self._items[key] = (value, cost)
            self._used += cost
            while self._used > self.budget:
                _, (_, dropped) = self._items.popitem(last=False)
                self._used -= dropped

    def discard_where(self, predicate: Callable[[Hashable], bool]) -> None:
        with self._lock:
            for key in [k for k in self._items if predicate(k)]:
                self._used -= self._items.pop(key)[1]

    def __len__(self) -> int:
        return len(self._items)

    @property
    def used(self) -> int:
        return self._used
