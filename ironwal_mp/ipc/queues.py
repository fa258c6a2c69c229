"""POSIX message queues carrying control messages (never payloads)."""

from __future__ import annotations

import os
import time
from typing import Callable, Optional

import posix_ipc

from ..errors import SharedMemoryError, WalClosedError
from .messages import MAX_MESSAGE, Assembler, Message, encode

DEPTH = 10  # the Linux default limit without CAP_SYS_RESOURCE


def _same_queue(a: posix_ipc.MessageQueue, b: posix_ipc.MessageQueue) -> bool:
    """Whether two handles are of one queue (on Linux a queue descriptor is a file's)."""
    sa, sb = os.fstat(a.mqd), os.fstat(b.mqd)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


class Queue:
    def __init__(self, name: str, *, create: bool = False) -> None:
        self.name = name
        if create:
            try:
                self._q = posix_ipc.MessageQueue(
                    name, posix_ipc.O_CREX, max_messages=DEPTH, max_message_size=MAX_MESSAGE
                )
            except posix_ipc.ExistentialError:
                posix_ipc.unlink_message_queue(name)
                self._q = posix_ipc.MessageQueue(
                    name, posix_ipc.O_CREX, max_messages=DEPTH, max_message_size=MAX_MESSAGE
                )
            except OSError as exc:
                raise SharedMemoryError(
                    f"cannot create message queue {name}: {exc} (the per-user limit on queue bytes, "
                    "`ulimit -q` / RLIMIT_MSGQUEUE, or /proc/sys/fs/mqueue/queues_max is exhausted: "
                    "other WALs or attached processes of this user hold the queues)"
                ) from exc
        else:
            self._q = posix_ipc.MessageQueue(name)
        self._assembler = Assembler()
        # receive(0) with a zero timeout arms a kernel timer (~35 us); a second, non-blocking
        # descriptor makes a poll cost ~1 us, which matters once per worker pass
        self._poll: Optional[posix_ipc.MessageQueue] = None
        self._no_poll = False  # the name no longer leads to this queue: polls take the timed path

    def send(self, msg: Message, timeout: float = 10.0, alive: Optional[Callable[[], None]] = None) -> None:
        """Send every part; ``alive`` is called while the queue is full, to give up on a dead peer."""
        deadline = time.monotonic() + timeout
        for part in encode(msg, MAX_MESSAGE):
            while True:
                try:
                    self._q.send(part, 0.1)
                    break
                except (posix_ipc.BusyError, posix_ipc.SignalError):  # full, or a signal arrived
                    if alive is not None:
                        alive()
                    if time.monotonic() > deadline:
                        raise WalClosedError(f"control queue {self.name} stayed full for {timeout:.0f}s") from None

    def receive(self, timeout: Optional[float]) -> Optional[Message]:
        """The next whole message, or None if none arrives within ``timeout`` (0: don't wait)."""
        if timeout == 0 and self._poller() is not None:
            return self._poll_once()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                raw, _prio = self._q.receive(left)
            except (posix_ipc.BusyError, posix_ipc.SignalError):
                # a signal handler ran (Python retries its own calls, posix_ipc does not):
                # report nothing, so that the caller re-checks whatever the handler changed
                return None
            msg = self._assembler.feed(raw)
            if msg is not None:
                return msg

    def _poller(self) -> Optional[posix_ipc.MessageQueue]:
        """The non-blocking handle, opened by name at the first poll; None if the name no longer
        leads to ``_q``'s queue: removed by a clean-up (the queue and its messages live on while
        ``_q`` is open), or since given to a new queue of a later run, whose messages are not
        this handle's to take. Polls then take the timed path."""
        if self._poll is None and not self._no_poll:
            try:
                poll = posix_ipc.MessageQueue(self.name)
            except posix_ipc.ExistentialError:
                self._no_poll = True
                return None
            if not _same_queue(poll, self._q):
                poll.close()
                self._no_poll = True
                return None
            poll.block = False
            self._poll = poll
        return self._poll

    def _poll_once(self) -> Optional[Message]:
        while True:
            try:
                raw, _prio = self._poll.receive()
            except posix_ipc.BusyError:
                return None
            msg = self._assembler.feed(raw)
            if msg is not None:
                return msg

    def close(self) -> None:
        for q in (self._q, self._poll):
            if q is None:
                continue
            try:
                q.close()
            except posix_ipc.Error:
                pass

    def unlink(self) -> None:
        Queue.unlink_name(self.name)

    @staticmethod
    def unlink_name(name: str) -> None:
        try:
            posix_ipc.unlink_message_queue(name)
        except posix_ipc.ExistentialError:
            pass
