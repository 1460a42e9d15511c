"""`llmos spawn --pipe-stdin/--pipe-stdout`: a child joined to the shell's own
stdin/stdout through kernel pipes, so agents make Unix pipelines:

    llmos spawn --pipe-stdout -- A | llmos spawn --pipe-stdin --pipe-stdout -- B | ...

The command stays in the foreground: it copies its stdin into the child's
pipe (EOF closes it) and the child's pipe to its stdout, then waits for the
child and exits with its status, as `llmos wait` does. Each direction has its
own connection, so neither waits behind the other; the shell's fds close with
their connection, so an interrupted command leaves the child EOF or EPIPE.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading

from .cli_io import client
from .errors import KernelError

CHUNK = 64 * 1024


def add_spawn_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--pipe-stdin", action="store_true",
                    help="feed this command's stdin to the child's (through a kernel pipe)")
    sp.add_argument("--pipe-stdout", action="store_true",
                    help="copy the child's stdout to this command's (through a kernel pipe)")


def spawn_piped(args: argparse.Namespace, cmd: list[str], spawn_kw: dict) -> int:
    feed = client(args) if args.pipe_stdin else None
    drain = client(args) if args.pipe_stdout else None
    with client(args) as c:
        into = feed.ipc.pipe() if feed else None
        outof = drain.ipc.pipe() if drain else None
        try:
            pid = c.proc.spawn(cmd, **spawn_kw, stdin=into and into["read"],
                               stdout=outof and outof["write"])
        finally:  # the child holds its own ends now (or none, when spawn failed)
            if into:
                feed.fs.close(into["read"])
            if outof:
                drain.fs.close(outof["write"])
        if feed:  # a daemon: our stdin may never end (a terminal), the child may
            threading.Thread(target=_feed, args=(feed, into["write"]), daemon=True).start()
        if drain:
            _drain(drain, outof["read"])
        st = c.proc.wait(pid)
    return st["exit_code"] if st["signal"] is None else 128 + st["signal"]


def _feed(c, fd: int) -> None:
    try:
        while data := os.read(sys.stdin.fileno(), CHUNK):
            c.fs.write(fd, data)
        c.fs.close(fd)  # EOF for the child
    except (KernelError, OSError):
        pass  # EPIPE: the child is done reading; or our stdin failed
    finally:
        c.close()


def _drain(c, fd: int) -> None:
    out = sys.stdout.buffer
    try:
        while data := c.fs.read(fd, CHUNK):
            out.write(data)
            out.flush()
    except BrokenPipeError:  # our reader left (`| head`): the child's writes now fail
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # quiet at exit
    finally:
        c.close()
