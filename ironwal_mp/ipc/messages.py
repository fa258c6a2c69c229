"""Control messages: kinds and a codec that fits any body into 1 KiB queue messages (pure).

A message is ``(kind, sender, req_id, body)``; the body is a msgpack map. Linux message queues
carry at most 8 KiB per message by default, and some bodies (a 64 KiB checkpoint id, a long
checkpoint list) are larger, so a message travels as one or more *parts*, each a msgpack array
``[kind, sender, req_id, part, parts, chunk]`` no larger than the queue's message size.

Why 1 KiB and not the 8 KiB maximum: Linux charges every queue's full capacity (depth x message
size, ~82 KB at 10 x 8 KiB) to its user's RLIMIT_MSGQUEUE, 819200 bytes by default, so 8 KiB
queues allow only nine queues per user in total: one WAL with two workers plus five attached
processes, and nothing else. At 1 KiB a queue costs ~11 KB and one user can hold ~70.
"""

from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import msgpack

MAX_MESSAGE = 1024  # see the module docstring
_PART_OVERHEAD = 64  # msgpack envelope around a chunk, generously

# clients -> coordinator
ATTACH = 1
DETACH = 2
CHECKPOINT = 3
PRUNE = 4
COMPACT = 5
SHUTDOWN = 6
PING = 7
# coordinator -> clients
#: a coordinator's exit status when another process holds the root's LOCK (its ERROR message
#: may be lost: a leftover pass can remove the starter's notify queue before it is sent)
EXIT_LOCKED = 3

OK = 20
ERROR = 21
READY = 22
# coordinator -> workers
PREPARE = 40
COMMIT = 41
ABORT = 42
TRUNCATE = 43
STOP = 44
# workers -> coordinator
PREPARED = 60
TRUNCATED = 61
FAILED = 62
STOPPED = 63

KIND_NAMES = {v: k for k, v in dict(globals()).items()
              if isinstance(v, int) and k.isupper() and not k.startswith("_") and k != "MAX_MESSAGE"}


class Message(NamedTuple):
    kind: int
    sender: int
    req_id: int
    body: Dict[str, Any]


def encode(msg: Message, max_size: int = MAX_MESSAGE) -> List[bytes]:
    """The parts that carry ``msg``, each at most ``max_size`` bytes."""
    blob = msgpack.packb(msg.body, use_bin_type=True)
    room = max_size - _PART_OVERHEAD
    chunks = [blob[i : i + room] for i in range(0, len(blob), room)] or [b""]
    parts = len(chunks)
    return [
        msgpack.packb([msg.kind, msg.sender, msg.req_id, i, parts, chunk], use_bin_type=True)
        for i, chunk in enumerate(chunks)
    ]


class Assembler:
    """Puts parts back together; parts of different senders may interleave."""

    def __init__(self) -> None:
        self._partial: Dict[Tuple[int, int], List[bytes]] = {}

    def feed(self, raw: bytes) -> Optional[Message]:
        try:
            kind, sender, req_id, part, parts, chunk = msgpack.unpackb(raw, raw=False)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise ValueError(f"malformed control message: {exc}") from None
        if parts == 1:
            return Message(kind, sender, req_id, _body(chunk))
        key = (sender, req_id)
        got = self._partial.setdefault(key, [])
        if part != len(got):
            del self._partial[key]
            raise ValueError(f"control message part {part} arrived out of order")
        got.append(chunk)
        if len(got) < parts:
            return None
        del self._partial[key]
        return Message(kind, sender, req_id, _body(b"".join(got)))


def _body(blob: bytes) -> Dict[str, Any]:
    body = msgpack.unpackb(blob, raw=False, strict_map_key=False) if blob else {}
    if not isinstance(body, dict):
        raise ValueError("control message body is not a map")
    return body
