"""The ceiling for syscall overhead: a bare trio + msgpack server that answers
every request at once, with the same framing and socket type as the kernel."""

import sys

import msgpack
import trio


async def handle(stream: trio.SocketStream) -> None:
    unpacker = msgpack.Unpacker(raw=False)
    try:
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            unpacker.feed(data)
            for msg in unpacker:
                result = {"pid": 1} if msg[2] == "sys.hello" else None
                await stream.send_all(msgpack.packb([1, msg[1], None, result]))
    except trio.BrokenResourceError:
        pass


async def main(path: str, handler=handle) -> None:
    """Serve ``handler`` on a Unix socket at ``path``; "ready" once it listens."""
    sock = trio.socket.socket(trio.socket.AF_UNIX)
    await sock.bind(path)
    sock.listen(128)
    print("ready", flush=True)
    await trio.serve_listeners(handler, [trio.SocketListener(sock)])


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
