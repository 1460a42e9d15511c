"""The floor for a mailbox round trip: a bare trio + msgpack server with the
kernel's framing and socket type that relays ipc.send / ipc.sendrecv / ipc.recv
between connections (the token a client says hello with is its pid) and
answers anything else at once, as echo_server.py does. A message goes as the
kernel's does: a waiting receiver is answered in the sender's own step, by a
write to its socket, with no task in between (the socket is written directly:
small frames on a Unix socket, which it takes whole). No checks, no bounds, no
envelope: what two processes and one relay cost on this machine."""

import os
import sys
from collections import deque

import echo_server  # the listener it shares (run from bench/, which is on sys.path)
import msgpack
import trio

WAITING: dict[int, tuple[int, int]] = {}  # pid -> (fd, msgid) of its waiting receive
QUEUED: dict[int, deque] = {}  # pid -> messages nobody waited for


def answer(fd: int, msgid: int, result: object) -> None:
    os.write(fd, msgpack.packb([1, msgid, None, result]))


async def handle(stream: trio.SocketStream) -> None:
    unpacker = msgpack.Unpacker(raw=False)
    fd = stream.socket.fileno()
    me = 0
    try:
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            unpacker.feed(data)
            for _, msgid, method, args in unpacker:
                if method == "sys.hello":
                    me = int(args[0])
                    answer(fd, msgid, {"pid": me})
                    continue
                if method in ("ipc.send", "ipc.sendrecv"):
                    mail = {"from": me, "message": args[1]}
                    waiting = WAITING.pop(args[0], None)
                    if waiting is not None:
                        answer(*waiting, mail)
                    else:
                        QUEUED.setdefault(args[0], deque()).append(mail)
                if method in ("ipc.sendrecv", "ipc.recv"):
                    if QUEUED.get(me):
                        answer(fd, msgid, QUEUED[me].popleft())
                    else:
                        WAITING[me] = (fd, msgid)
                else:
                    answer(fd, msgid, None)
    except (trio.BrokenResourceError, OSError):
        pass
    finally:
        WAITING.pop(me, None)


if __name__ == "__main__":
    trio.run(echo_server.main, sys.argv[1], handle)
