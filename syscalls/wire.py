"""Sans-I/O MessagePack-RPC codec: bytes in, validated messages out.

    request       [0, msgid, "group.call", [arg, ...]]
    response      [1, msgid, error | nil, result | nil]
    notification  [2, "group.event", [arg, ...]]

No sockets here (as in h11): the kernel's server and the userland client are
thin loops around `Decoder.feed` / `Decoder.messages` and the `encode_*`
functions, so every edge case is a plain unit test.

A Python client may send keyword arguments as a trailing map in a 5th element
of a request (``[0, msgid, method, args, kwargs]``); plain MessagePack-RPC
clients never need it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

import msgpack

REQUEST, RESPONSE, NOTIFICATION = 0, 1, 2
DEFAULT_MAX_FRAME = 16 * 1024 * 1024
MAX_MSGID = 2**32 - 1
# What one request may hold (the kernel's limits; a client decodes answers freely).
# Decoding costs per object, not per byte: 16 MiB of empty arrays took 8.7 s,
# a 1M-key map 0.7 s, all on the event loop. A request of at most MAX_ITEMS
# array elements and map entries decodes in tens of ms; a larger array or map
# is refused at its header, before anything is built.
MAX_ITEMS = 1 << 16
MAX_DEPTH = 100  # nesting of arguments (JSON encoders recurse)


class ProtocolError(Exception):
    """The peer broke the protocol; the connection must be closed with this reason."""


@dataclass
class Request:
    msgid: int
    method: str
    args: list
    kwargs: dict = field(default_factory=dict)


@dataclass
class Response:
    msgid: int
    error: Any
    result: Any


@dataclass
class Notification:
    method: str
    args: list


Message = Request | Response | Notification


# Every notification the kernel sends: method -> params. Streamed results name
# the request they belong to first; the others belong to the process.
NOTIFICATIONS = {
    "sys.close": "[reason]: the kernel closes this connection (a protocol error)",
    "llm.token": "[msgid, text]: a streamed piece of llm.generate's answer",
    "drv.request": "[req_id, tool, args, caller_pid]: a tool call for this driver",
    "drv.unregistered": "[namespace, reason]: this driver's tools are gone (killed, exited)",
    "proc.signal": "[signal, payload, sender_pid]: SIGINT, SIGUSR1 or SIGUSR2 for this process",
}
PROCESS_NOTIFICATIONS = frozenset({"drv.request", "drv.unregistered", "proc.signal"})
# The signals that reach a process with a connection as proc.signal (SIGINT,
# SIGUSR1, SIGUSR2 by their Linux numbers); others act on its OS process.
SIGNALS_NOTIFIED = frozenset({2, 10, 12})


_packers = threading.local()  # one Packer a thread: msgpack.packb makes a new one each call


def pack(obj: Any) -> bytes:
    """One MessagePack value, as the wire encodes it."""
    try:
        return _packers.p.pack(obj)
    except AttributeError:
        _packers.p = msgpack.Packer(use_bin_type=True)
        return _packers.p.pack(obj)


def encode_request(msgid: int, method: str, args: list | tuple,
                   kwargs: dict | None = None) -> bytes:
    msg: list = [REQUEST, msgid, method, list(args)]
    if kwargs:
        msg.append(kwargs)
    return pack(msg)


def encode_response(msgid: int, error: Any, result: Any) -> bytes:
    return pack([RESPONSE, msgid, error, result])


def encode_notification(method: str, args: list | tuple) -> bytes:
    return pack([NOTIFICATION, method, list(args)])


class RequestError(Exception):
    """A well-framed request with a bad field: answerable with EINVAL (msgid known)."""

    def __init__(self, msgid: int, reason: str):
        super().__init__(reason)
        self.msgid = msgid
        self.reason = reason


@dataclass
class Invalid:
    """A request whose msgid is readable but whose other fields are not:
    the receiver answers it with EINVAL and the connection goes on."""

    msgid: int
    reason: str


def validate(obj: Any) -> Message:
    """Check every field of one decoded message."""
    if not isinstance(obj, (list, tuple)) or not obj:
        raise ProtocolError(f"message must be a non-empty array, got {type(obj).__name__}")
    kind = obj[0]
    if kind == REQUEST and not isinstance(kind, bool):
        if len(obj) not in (4, 5):
            raise ProtocolError(f"request must have 4 elements, got {len(obj)}")
        msgid = obj[1]
        if isinstance(msgid, bool) or not isinstance(msgid, int) or not 0 <= msgid <= MAX_MSGID:
            raise ProtocolError(f"request msgid must be a uint32, got {msgid!r:.50}")
        method, args = _method_name(obj[2]), obj[3]
        if method is None:
            raise RequestError(msgid, "method must be a string")
        if not isinstance(args, (list, tuple)):
            raise RequestError(msgid, "params must be an array")
        kwargs = obj[4] if len(obj) == 5 else {}
        if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
            raise RequestError(msgid, "keyword params must be a map with string keys")
        return Request(msgid, method, list(args), dict(kwargs))
    if kind == RESPONSE and not isinstance(kind, bool):
        if len(obj) != 4:
            raise ProtocolError(f"response must have 4 elements, got {len(obj)}")
        msgid = obj[1]
        if isinstance(msgid, bool) or not isinstance(msgid, int) or not 0 <= msgid <= MAX_MSGID:
            raise ProtocolError(f"response msgid must be a uint32, got {msgid!r:.50}")
        return Response(msgid, obj[2], obj[3])
    if kind == NOTIFICATION and not isinstance(kind, bool):
        if len(obj) != 3:
            raise ProtocolError(f"notification must have 3 elements, got {len(obj)}")
        method = _method_name(obj[1])
        if method is None:
            raise ProtocolError("notification method must be a string")
        if not isinstance(obj[2], (list, tuple)):
            raise ProtocolError("notification params must be an array")
        return Notification(method, list(obj[2]))
    raise ProtocolError(f"unknown message type {kind!r:.50}")


def _method_name(value: Any) -> str | None:
    """A method name: a string, or UTF-8 bytes as some stock clients send it
    (pynvim's packs method names as bin)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes) and len(value) <= 256:
        try:
            return value.decode()
        except UnicodeDecodeError:
            return None
    return None


class _TooMany(Exception):
    pass


class Decoder:
    """Feed bytes, take validated messages. A frame over `max_frame` bytes,
    undecodable bytes or a malformed message raise ProtocolError (close the
    connection); a request with a bad field comes out as `Invalid` (answer it).

    With `max_items`, a message holding more array elements and map entries
    than that is a ProtocolError as soon as the count is passed; with
    `max_depth`, a request whose arguments nest deeper is `Invalid`.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, *, max_items: int | None = None,
                 max_depth: int | None = None):
        self.max_frame = max_frame
        self.max_items = max_items
        self.max_depth = max_depth
        self._items = 0
        self._end = 0  # the stream offset where the last message ended
        self.size = 0  # the bytes of the message it yielded last
        limits: dict = {}
        if max_items is not None:
            limits = dict(max_array_len=max_items, max_map_len=max_items,
                          list_hook=self._count, object_hook=self._count)
        self._unpacker = msgpack.Unpacker(
            raw=False, max_buffer_size=max_frame, strict_map_key=False,
            use_list=True, **limits,
        )

    def _count(self, obj: Any) -> Any:
        self._items += len(obj) + 1
        if self._items > self.max_items:
            raise _TooMany
        return obj

    def feed(self, data: bytes) -> None:
        try:
            self._unpacker.feed(data)
        except msgpack.BufferFull:
            raise ProtocolError(f"frame larger than the {self.max_frame}-byte limit") from None

    def messages(self) -> Iterator[Message | Invalid]:
        while True:
            try:
                obj = self._unpacker.unpack()
            except msgpack.OutOfData:
                return
            except msgpack.BufferFull:
                raise ProtocolError(f"frame larger than the {self.max_frame}-byte limit") from None
            except _TooMany:
                raise ProtocolError(f"a message holds more than {self.max_items} array "
                                    "elements and map entries") from None
            except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError,
                    ValueError, TypeError, UnicodeDecodeError) as e:
                raise ProtocolError(f"undecodable bytes: {e}") from None
            self._items = 0
            # (tell() is the stream's offset only after a whole message: a part
            # of one moves it too, so the size is counted from the last end)
            end = self._unpacker.tell()
            size, self._end = end - self._end, end
            self.size = size
            try:
                msg = validate(obj)
            except RequestError as e:
                yield Invalid(e.msgid, e.reason)
                continue
            # A message of n bytes nests at most n deep: most need no walk.
            if self.max_depth is not None and isinstance(msg, Request) \
                    and size > self.max_depth \
                    and _depth_over(msg.args, msg.kwargs, self.max_depth):
                yield Invalid(msg.msgid, f"arguments nested deeper than {self.max_depth} levels")
                continue
            yield msg


def _depth_over(args: list, kwargs: dict, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(args, 1), (kwargs, 1)]
    while stack:  # iterative: the input may be as deep as the decoder allows
        obj, depth = stack.pop()
        if depth > limit:
            return True
        children = obj.values() if isinstance(obj, dict) else obj
        stack.extend((c, depth + 1) for c in children if isinstance(c, (list, dict)))
    return False
