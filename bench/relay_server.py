"""The floor for a mailbox round trip: a bare trio + msgpack server with the
kernel's framing and socket type that relays ipc.send / ipc.sendrecv / ipc.recv between
connections (the token a client says hello with is its pid) and answers
anything else at once, as echo_server.py does. No checks, no bounds: what two
processes and one relay cost on this machine."""

import sys

import echo_server  # the listener it shares (run from bench/, which is on sys.path)
import msgpack
import trio

BOXES: dict[int, tuple[trio.MemorySendChannel, trio.MemoryReceiveChannel]] = {}


def box(pid: int) -> tuple[trio.MemorySendChannel, trio.MemoryReceiveChannel]:
    if pid not in BOXES:
        BOXES[pid] = trio.open_memory_channel(1024)
    return BOXES[pid]


async def handle(stream: trio.SocketStream) -> None:
    unpacker = msgpack.Unpacker(raw=False)
    me = 0

    async def answer(msgid: int, method: str, args: list) -> None:
        if method in ("ipc.send", "ipc.sendrecv"):
            box(args[0])[0].send_nowait({"from": me, "message": args[1]})
        result = await box(me)[1].receive() if method in ("ipc.sendrecv", "ipc.recv") else None
        await stream.send_all(msgpack.packb([1, msgid, None, result]))

    try:
        async with trio.open_nursery() as nursery:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    nursery.cancel_scope.cancel()
                    return
                unpacker.feed(data)
                for msg in unpacker:
                    if msg[2] == "sys.hello":
                        me = int(msg[3][0])
                        await stream.send_all(msgpack.packb([1, msg[1], None, {"pid": me}]))
                    else:
                        nursery.start_soon(answer, msg[1], msg[2], msg[3])
    except trio.BrokenResourceError:
        pass


if __name__ == "__main__":
    trio.run(echo_server.main, sys.argv[1], handle)
