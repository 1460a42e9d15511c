"""The sans-I/O codec: every field validated, frames bounded, garbage refused."""

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmagentos.syscalls import wire


def decode_all(data: bytes, **kw):
    d = wire.Decoder(**kw)
    d.feed(data)
    return list(d.messages())


def test_request_roundtrip():
    (m,) = decode_all(wire.encode_request(7, "proc.getpid", []))
    assert m == wire.Request(7, "proc.getpid", [], {})


def test_request_with_kwargs_roundtrip():
    (m,) = decode_all(wire.encode_request(1, "proc.spawn", [["ls"]], {"name": "x"}))
    assert m.kwargs == {"name": "x"}


def test_response_and_notification():
    data = (wire.encode_response(3, None, {"a": 1})
            + wire.encode_notification("llm.token", [3, "hi"]))
    r, n = decode_all(data)
    assert r == wire.Response(3, None, {"a": 1})
    assert n == wire.Notification("llm.token", [3, "hi"])


def test_split_feeding_byte_by_byte():
    data = wire.encode_request(1, "sys.null", [1, "two", b"3"])
    d = wire.Decoder()
    out = []
    for i in range(len(data)):
        d.feed(data[i:i + 1])
        out += list(d.messages())
    assert out == [wire.Request(1, "sys.null", [1, "two", b"3"], {})]


@pytest.mark.parametrize("obj", [
    5, "x", [], [9, 1, "a", []], [0, -1, "a", []], [0, 2**32, "a", []], [0, True, "a", []],
    [0, "1", "a", []], [1, 1, None], [2, 5, []], [2, "m", "notalist"], [0, 1, "a", [], {}, 1],
])
def test_malformed_messages_are_protocol_errors(obj):
    with pytest.raises(wire.ProtocolError):
        decode_all(msgpack.packb(obj))


@pytest.mark.parametrize("obj", [[0, 1, 5, []], [0, 1, "a", "b"], [0, 1, "a", [], {1: 2}]])
def test_bad_request_fields_are_answerable(obj):
    (m,) = decode_all(msgpack.packb(obj))
    assert isinstance(m, wire.Invalid) and m.msgid == 1


def test_frame_size_limit():
    big = wire.encode_request(1, "sys.null", ["x" * 5000])
    with pytest.raises(wire.ProtocolError, match="limit"):
        decode_all(big, max_frame=1024)
    assert decode_all(big, max_frame=10_000)[0].args == ["x" * 5000]


def test_undecodable_bytes():
    with pytest.raises(wire.ProtocolError):
        decode_all(b"\xc1\xc1\xc1")  # 0xc1 is never used in msgpack


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_fuzz_random_bytes_only_raise_protocol_error(data):
    d = wire.Decoder(max_frame=4096)
    try:
        d.feed(data)
        for m in d.messages():
            assert isinstance(m, (wire.Request, wire.Response, wire.Notification, wire.Invalid))
    except wire.ProtocolError:
        pass


json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.text(max_size=20)
    | st.binary(max_size=20) | st.floats(allow_nan=False),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, wire.MAX_MSGID), st.text(min_size=1, max_size=30),
       st.lists(json_like, max_size=5))
def test_fuzz_valid_requests_roundtrip(msgid, method, args):
    (m,) = decode_all(wire.encode_request(msgid, method, args))
    assert (m.msgid, m.method) == (msgid, method)
    assert len(m.args) == len(args)


@settings(max_examples=200, deadline=None)
@given(json_like)
def test_fuzz_arbitrary_objects_never_crash(obj):
    try:
        for m in decode_all(msgpack.packb(obj)):
            assert m is not None
    except wire.ProtocolError:
        pass


def _nest(depth: int, leaf, as_map: bool) -> object:
    v = leaf
    for _ in range(depth):
        v = {"k": v} if as_map else [v]
    return v


@pytest.mark.parametrize("as_map", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 1 << 16])
def test_a_short_message_skips_the_depth_walk_with_the_same_verdict(as_map, chunk):
    """The decoder walks a request's arguments for their depth only when the
    message is longer than the limit (n bytes nest at most n deep): at and
    around the limit, in arguments and keyword arguments, fed in pieces, the
    verdict is the walk's own."""
    d = wire.Decoder(1 << 20, max_items=wire.MAX_ITEMS, max_depth=wire.MAX_DEPTH)
    for depth in range(wire.MAX_DEPTH - 4, wire.MAX_DEPTH + 4):
        for args, kwargs in (([_nest(depth, 1, as_map)], {}),
                             ([], {"a": _nest(depth, None, as_map)})):
            data = wire.encode_request(depth, "sys.null", args, kwargs) + \
                wire.encode_request(1, "sys.null", [], None)
            got = []
            for i in range(0, len(data), chunk):  # as the kernel reads: each piece, then all
                d.feed(data[i:i + chunk])       # the messages it completes
                got += d.messages()
            deep = wire._depth_over(args, kwargs, wire.MAX_DEPTH)
            assert isinstance(got[0], wire.Invalid) == deep, (depth, args, kwargs)
            assert isinstance(got[1], wire.Request)
