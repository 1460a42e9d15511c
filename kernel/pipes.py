"""Pipes: a bounded byte buffer between processes, held by fds (kernel/fdtable.py).

A pipe counts the fds open on each of its ends, wherever they are (the fd
tables of several processes, the kernel's own pumps). The rules are Unix's:

- A write blocks while the buffer is full (the writer's task parks: no
  polling) and returns once every byte is in; a write of at most PIPE_BUF
  bytes goes in whole, never interleaved with another writer's.
- With no read end left a write is EPIPE (or, when some of its bytes went in
  before the last reader left, the count of those).
- A read returns what is there (at most n), parking while the buffer is empty
  and a write end is open; with every write end closed an empty buffer reads
  as EOF (b"").
- Closing the last end of a side wakes whoever waits on the other.

The buffer never holds more than `capacity` bytes; `peak` records the most it
ever held, for `proc.stat` and the tests that check the bound.

A child spawned with `stdin=`/`stdout=` a pipe end gets plain OS pipes for
its standard streams; `pump_in`/`pump_out` move the bytes between those and
the kernel pipe with backpressure both ways.
"""

from __future__ import annotations

import os

import trio

from llmagentos.syscalls.errno import SyscallError

CAPACITY = 64 * 1024
PIPE_BUF = 4096  # writes up to this size are atomic
OS_CHUNK = 64 * 1024  # what a pump moves at once


class Pipe:
    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self.buffer = bytearray()
        self.readers = 0  # open read ends
        self.writers = 0  # open write ends
        self.peak = 0  # the most bytes ever buffered (never over capacity)
        self.bytes_through = 0
        self._changed = trio.lowlevel.ParkingLot()  # data, room, or an end closed

    def _wake(self) -> None:
        self._changed.unpark_all()

    async def read(self, end: "PipeEnd", n: int) -> bytes:
        if n == 0:
            return b""
        want = self.capacity if n < 0 else n
        while not self.buffer:
            if self.writers == 0:
                return b""  # EOF
            await self._changed.park()
            end.check_open()
        data = bytes(self.buffer[:want])
        del self.buffer[:len(data)]
        self._wake()
        return data

    async def write(self, end: "PipeEnd", data: bytes) -> int:
        view, done = memoryview(data), 0
        atomic = len(view) <= PIPE_BUF
        while done < len(view):
            if self.readers == 0:
                if done:
                    return done
                raise SyscallError("EPIPE", "the pipe has no reader left")
            room = self.capacity - len(self.buffer)
            if room == 0 or (atomic and room < len(view)):
                await self._changed.park()
                end.check_open()
                continue
            chunk = view[done:done + room]
            self.buffer += chunk
            done += len(chunk)
            self.bytes_through += len(chunk)
            self.peak = max(self.peak, len(self.buffer))
            self._wake()
        return done


class PipeEnd:
    """One open fd on one side of a pipe. `dup` makes another fd on the same side."""

    def __init__(self, pipe: Pipe, side: str) -> None:
        self.pipe = pipe
        self.side = side  # "read" | "write"
        self.closed = False
        # A child's fd 0 when the kernel feeds its OS stdin from it: that one
        # reader is the feed (pump_in), and fs.read on it would race the feed
        # for the same bytes, so it is EBUSY; closing it stops the feed.
        self.feeds_stdin = False
        if side == "read":
            pipe.readers += 1
        else:
            pipe.writers += 1

    @property
    def readable(self) -> bool:
        return self.side == "read"

    def dup(self) -> "PipeEnd":
        return PipeEnd(self.pipe, self.side)

    def check_open(self) -> None:
        if self.closed:  # closed by another call of its process while this one waited
            raise SyscallError("EBADF", f"the pipe's {self.side} end was closed")

    async def read(self, n: int) -> bytes:
        if not self.readable:
            raise SyscallError("EBADF", "this fd is the write end of a pipe")
        self.check_open()
        return await self.pipe.read(self, n)

    async def write(self, data: bytes) -> int:
        if self.readable:
            raise SyscallError("EBADF", "this fd is the read end of a pipe")
        return await self.pipe.write(self, data)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.readable:
            self.pipe.readers -= 1
            if self.pipe.readers == 0:
                self.pipe.buffer.clear()  # nobody will read it: the memory goes now
        else:
            self.pipe.writers -= 1
        self.pipe._wake()

    def describe(self) -> dict:
        p = self.pipe
        return {"kind": "pipe", "end": self.side, "buffered": len(p.buffer),
                "capacity": p.capacity, "peak": p.peak, "readers": p.readers,
                "writers": p.writers, "bytes": p.bytes_through,
                **({"feeds_stdin": True} if self.feeds_stdin else {})}


def make_pipe(capacity: int = CAPACITY) -> tuple[PipeEnd, PipeEnd]:
    pipe = Pipe(capacity)
    return PipeEnd(pipe, "read"), PipeEnd(pipe, "write")


async def pump_out(os_fd: int, end: PipeEnd) -> None:
    """A child's OS stdout (os_fd, our read side of it) into a pipe's write end,
    until the child's side closes. When the pipe has no reader left, os_fd is
    closed: the child's next write fails with EPIPE, as under a Unix shell."""
    stream = trio.lowlevel.FdStream(os_fd)
    try:
        while data := await stream.receive_some(OS_CHUNK):
            await end.write(data)
    except (SyscallError, trio.BrokenResourceError, OSError):
        pass
    finally:
        end.close()
        await stream.aclose()


async def pump_in(end: PipeEnd, os_fd: int, done: trio.Event) -> None:
    """A pipe's read end (the child's fd 0) into its OS stdin (os_fd, our write
    side of it), until EOF (the child then reads EOF), the child closes its
    stdin or its fd 0, or it exits (`done`): then the read end closes and
    writers see EPIPE."""
    stream = trio.lowlevel.FdStream(os_fd)
    try:
        async with trio.open_nursery() as nursery:
            async def until_exit() -> None:
                await done.wait()
                nursery.cancel_scope.cancel()

            async def move() -> None:
                try:
                    while data := await end.read(OS_CHUNK):
                        await stream.send_all(data)
                except (SyscallError, trio.BrokenResourceError, OSError):
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(until_exit)
            nursery.start_soon(move)
    finally:
        end.close()
        await stream.aclose()


def os_pipe() -> tuple[int, int]:
    """An OS pipe whose ends are not inherited by anything else the kernel starts."""
    return os.pipe2(os.O_CLOEXEC)
