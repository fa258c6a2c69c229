"""Records from an input that may go quiet (a pipe, a terminal, a socket), read on a thread.

A read from such an input can block for as long as its writer likes. ``ingest`` therefore
reads it on a thread of its own, so that its main thread can append what has come in as soon
as the input goes quiet, and can act on Ctrl-C or SIGTERM at once, instead of waiting in a
read for a batch that may never fill. A regular file never needs this.
"""

from __future__ import annotations

import collections
import os
import signal
import stat
import threading
from typing import Iterable, Iterator, List, Optional, Union

from .sources import Record

#: yielded by :class:`Feed` when nothing has come in for its idle time
IDLE = object()
_END = object()


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def is_live(path: Optional[str]) -> bool:
    """True if reading ``path`` (None or '-': standard input) may block: it is not a regular file."""
    try:
        st = os.fstat(0) if path in (None, "-") else os.stat(path)
    except OSError:
        return False  # (the source reports what is wrong with it)
    return not stat.S_ISREG(st.st_mode)


class Feed:
    """Iterate ``records`` on a thread; yields each record, or :data:`IDLE` after ``idle_s``
    seconds with nothing new. It reads at most ``ahead`` records beyond what was taken."""

    def __init__(self, records: Iterable[Record], idle_s: float, ahead: int, signals: Iterable[int]) -> None:
        self.idle_s = idle_s
        self._ahead = max(1, ahead)
        self._items: collections.deque = collections.deque()
        self._ready = threading.Event()  # set after the reader adds an item
        self._room = threading.Event()  # set while the reader may read ahead
        self._room.set()
        self._stopped = False
        self._thread = threading.Thread(target=self._read, args=(iter(records), tuple(signals)),
                                        name="ironwal-mp ingest input", daemon=True)
        self._thread.start()

    def _read(self, records: Iterator[Record], signals: tuple) -> None:
        # the stop signals are the main thread's to take, between library calls
        signal.pthread_sigmask(signal.SIG_BLOCK, set(signals))
        items, ready, room = self._items, self._ready, self._room
        item: object = _END
        try:
            for record in records:
                items.append(record)
                ready.set()
                if len(items) >= self._ahead:
                    room.clear()
                    if len(items) >= self._ahead:  # (the taker may have made room just now)
                        room.wait()
                if self._stopped:
                    return
        except BaseException as exc:  # (a bad record is the main thread's to report)
            item = _Failed(exc)
        items.append(item)
        ready.set()

    def __iter__(self) -> Iterator[Union[Record, object]]:
        items, ready, room = self._items, self._ready, self._room
        low = self._ahead // 2
        while True:
            while items:
                item = items.popleft()
                if not room.is_set() and len(items) <= low:
                    room.set()
                if item is _END:
                    return
                if isinstance(item, _Failed):
                    raise item.exc
                yield item
            ready.clear()
            if not items and not ready.wait(self.idle_s):
                yield IDLE

    def stop(self) -> List[Record]:
        """Stop reading; the records already read and not yet taken (they are gone from the input)."""
        self._stopped = True
        self._room.set()
        self._thread.join(0.05)  # (one that is not blocked in a read adds at most one more)
        taken: List[Record] = []
        while self._items:
            item = self._items.popleft()
            if item is _END or isinstance(item, _Failed):
                break
            taken.append(item)
        return taken
