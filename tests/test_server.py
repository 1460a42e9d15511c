"""A connection's sending (kernel/server.py): streamed tokens are queued without
waiting, frames that pile up while the socket is busy go out in one write, and
the frames and their order are what they would be one write each."""

from __future__ import annotations

from types import SimpleNamespace

import trio
import trio.testing

from llmagentos.kernel.server import Connection
from llmagentos.syscalls import wire


class CountingStream(trio.abc.HalfCloseableStream):
    """A socket stream that counts its writes (the connection writes to ``socket``
    directly when it is free, and through ``send_all`` when it is not)."""

    def __init__(self, inner: trio.SocketStream) -> None:
        self.inner = inner
        self.socket = inner.socket
        self.writes = 0

    async def send_all(self, data) -> None:
        self.writes += 1
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes=None):
        return await self.inner.receive_some(max_bytes)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


def connection(nursery: trio.Nursery) -> tuple[Connection, CountingStream, trio.SocketStream]:
    ours, theirs = trio.socket.socketpair()
    stream = CountingStream(trio.SocketStream(ours))
    conn = Connection(SimpleNamespace(config=SimpleNamespace(max_frame=1 << 24)), stream, "t")
    conn.nursery = nursery
    return conn, stream, trio.SocketStream(theirs)


async def read_messages(peer: trio.SocketStream, n: int) -> list:
    dec = wire.Decoder(1 << 24)
    out: list = []
    while len(out) < n:
        dec.feed(await peer.receive_some(1 << 16))
        out += list(dec.messages())
    return out


async def test_tokens_piled_up_behind_a_busy_socket_go_out_in_one_write(nursery):
    conn, stream, peer = connection(nursery)
    # The peer reads nothing yet: fill the socket until a write has to wait.
    big = "x" * 60_000
    n_big = 0
    while stream.writes == 0:
        conn.notify_nowait("llm.token", [1, big])
        n_big += 1
        await trio.lowlevel.checkpoint()
        assert n_big < 10_000
    for i in range(300):  # tokens while the socket is busy
        conn.notify_nowait("llm.token", [1, f"t{i}"])
    msgs: list = []

    async def reader() -> None:
        msgs.extend(await read_messages(peer, n_big + 301))

    async with trio.open_nursery() as n:
        n.start_soon(reader)
        await conn.send(wire.encode_response(1, None, "done"))  # the call's answer, last
    assert [m.args[1] for m in msgs[:n_big]] == [big] * n_big
    assert [m.args[1] for m in msgs[n_big:-1]] == [f"t{i}" for i in range(300)]
    assert isinstance(msgs[-1], wire.Response) and msgs[-1].result == "done"
    # The pieces that waited went out together, not one write each.
    assert stream.writes <= 3, stream.writes


async def test_a_free_socket_takes_each_token_at_once_without_a_task(nursery):
    conn, stream, peer = connection(nursery)
    for i in range(5):
        conn.notify_nowait("llm.token", [7, str(i)])
    msgs = await read_messages(peer, 5)
    assert [(m.method, m.args) for m in msgs] == [("llm.token", [7, str(i)]) for i in range(5)]
    assert stream.writes == 0  # written where they were queued


async def test_tokens_for_a_gone_client_are_dropped_quietly(nursery):
    conn, stream, peer = connection(nursery)
    await peer.aclose()
    for i in range(100):  # EPIPE / reset: nothing raised into the device loop
        conn.notify_nowait("llm.token", [1, "x" * 1000])
    await trio.testing.wait_all_tasks_blocked()
    await stream.aclose()
    conn.notify_nowait("llm.token", [1, "after close"])  # a closed socket: dropped too
    await trio.testing.wait_all_tasks_blocked()
