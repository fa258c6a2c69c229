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

from .. import errors as E

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

#: a coordinator's exit status when another process holds the root's LOCK (its ERROR message
#: may be lost: a leftover pass can remove the starter's notify queue before it is sent).
#: Not a message kind (defined after KIND_NAMES, which would otherwise name kind 3 after it).
EXIT_LOCKED = 3


class Message(NamedTuple):
    kind: int
    sender: int
    req_id: int
    body: Dict[str, Any]


def encode(msg: Message, max_size: int = MAX_MESSAGE) -> List[bytes]:
    """The parts that carry ``msg``, each at most ``max_size`` bytes. Strings go as valid
    UTF-8: one with lone surrogates (a path that is not UTF-8) has its bytes written ``\\xNN``."""
    try:
        blob = msgpack.packb(msg.body, use_bin_type=True)
    except UnicodeEncodeError:
        blob = msgpack.packb(_valid_utf8(msg.body), use_bin_type=True)
    room = max_size - _PART_OVERHEAD
    chunks = [blob[i : i + room] for i in range(0, len(blob), room)] or [b""]
    parts = len(chunks)
    return [
        msgpack.packb([msg.kind, msg.sender, msg.req_id, i, parts, chunk], use_bin_type=True)
        for i, chunk in enumerate(chunks)
    ]


def _valid_utf8(value: Any) -> Any:
    """``value`` with every string, at any depth, made encodable (``_wire_text``)."""
    if isinstance(value, str):
        return _wire_text(value, None)
    if isinstance(value, dict):
        return {_valid_utf8(k): _valid_utf8(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_valid_utf8(v) for v in value]
    return value


class Assembler:
    """Puts parts back together; parts of different senders may interleave."""

    def __init__(self) -> None:
        self._partial: Dict[Tuple[int, int], List[bytes]] = {}

    def feed(self, raw: bytes) -> Optional[Message]:
        """The message ``raw`` completes, or None while parts are missing. ValueError for a
        part that is not one this codec makes (the receiver drops it and goes on)."""
        try:
            kind, sender, req_id, part, parts, chunk = msgpack.unpackb(raw, raw=False)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise ValueError(f"malformed control message: {exc}") from None
        if not (all(type(v) is int for v in (kind, sender, req_id, part, parts))
                and type(chunk) is bytes and 0 <= part < parts):
            raise ValueError("malformed control message: not [kind, sender, req_id, part, parts, chunk]")
        if parts == 1:
            return Message(kind, sender, req_id, _body(chunk))
        key = (sender, req_id)
        got = self._partial.setdefault(key, [])
        if part == 0 and got:  # (a new message under the key of one its sender never finished:
            got.clear()        # killed mid-send, or a reused pid; the old one is dropped, not this)
        if part != len(got):
            del self._partial[key]
            raise ValueError(f"control message part {part} arrived out of order")
        got.append(chunk)
        if len(got) < parts:
            return None
        del self._partial[key]
        return Message(kind, sender, req_id, _body(b"".join(got)))


def _body(blob: bytes) -> Dict[str, Any]:
    try:
        body = msgpack.unpackb(blob, raw=False, strict_map_key=False) if blob else {}
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ValueError(f"malformed control message body: {exc}") from None
    if not isinstance(body, dict):
        raise ValueError("malformed control message: its body is not a map")
    return body


# --- errors over the wire (ERROR bodies) ------------------------------------------------------

#: attributes of ironwal_mp errors that travel with them (ints and strings only)
ERROR_ATTRS = ("errno", "path", "offset", "reason", "field", "name", "expected", "found", "actual", "size", "limit")


def error_body(exc: BaseException, text_limit: Optional[int] = None) -> Dict[str, Any]:
    """An ERROR message's body for ``exc``: its type name, message and simple attributes.

    An OSError of the system's goes as WalIOError or DiskFullError (``errors.io_error``), with
    its errno and file: the receiving side rebuilds ironwal_mp types only. Strings go as valid
    UTF-8 (a path's undecodable bytes as ``\\xNN``); ``text_limit`` cuts each to about that
    many bytes, for a sender whose message must fit the queue while nobody reads it (a
    worker's start-up ERROR, PROTOCOL §10)."""
    if isinstance(exc, OSError) and not isinstance(exc, E.WalError):
        exc = E.io_error(exc)
    attrs = {name: getattr(exc, name) for name in ERROR_ATTRS
             if isinstance(getattr(exc, name, None), (int, str)) and not isinstance(getattr(exc, name), bool)}
    attrs = {k: _wire_text(v, text_limit) if isinstance(v, str) else v for k, v in attrs.items()}
    return {"type": type(exc).__name__, "message": _wire_text(str(exc), text_limit), "attrs": attrs}


def _wire_text(text: str, limit: Optional[int]) -> str:
    """``text`` as msgpack can carry it (no lone surrogates), cut to about ``limit`` bytes."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogatepass")
    if limit is None or len(raw) <= limit:
        return raw.decode("utf-8", "backslashreplace")
    keep = raw[: max(limit - 32, 0)]
    return f"{keep.decode('utf-8', 'backslashreplace')}... [{len(raw) - len(keep)} bytes cut]"


def error_from_body(body: Dict[str, Any]) -> Exception:
    """The error an ERROR body describes: the same ironwal_mp type, message and attributes
    (a type this side does not know becomes a plain WalError)."""
    cls = getattr(E, str(body.get("type")), None)
    message = str(body.get("message", "coordinator error"))
    if not (isinstance(cls, type) and issubclass(cls, E.WalError)):
        return E.WalError(message)
    attrs = body.get("attrs")
    attrs = attrs if isinstance(attrs, dict) else {}
    if issubclass(cls, OSError):
        # OSError parses its arguments in __new__, or in __init__ for a subclass that defines
        # its own __init__ (WalIOError): pass them to both, as a constructor would
        code = attrs.get("errno")
        args = (code, message) if isinstance(code, int) else (message,)
        err = cls.__new__(cls, *args)
        OSError.__init__(err, *args)
        if issubclass(cls, E.WalIOError):
            err.path = None  # (as its constructor sets it, when no path came)
    else:
        err = cls.__new__(cls)
        Exception.__init__(err, message)
    for name in ERROR_ATTRS:
        if name != "errno" and isinstance(attrs.get(name), (int, str)):
            setattr(err, name, attrs[name])
    return err

