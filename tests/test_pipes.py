"""Pipes (ipc.pipe): fds of the caller's fd table, a bounded buffer between
processes, inherited as a child's stdin/stdout by proc.spawn."""

from __future__ import annotations

import hashlib
import subprocess
import threading
import time

import pytest
from conftest import PY, wait_for

import llmagentos

CAPACITY = 64 * 1024
MB10 = 10 * 1024 * 1024

# Writes 10 MiB of a known, position-dependent pattern to its OS stdout.
PRODUCER = f"""
import sys
out = sys.stdout.buffer
for i in range({MB10} // 4096):
    out.write(i.to_bytes(4, "big") * 1024)
"""
# Waits a second before reading (the pipes behind it fill), then hashes its OS
# stdin and writes the digest and the length to its log (stderr).
CONSUMER = """
import hashlib, sys, time
time.sleep(1.0)
h, n = hashlib.sha256(), 0
while chunk := sys.stdin.buffer.read(65536):
    h.update(chunk)
    n += len(chunk)
print(n, h.hexdigest(), file=sys.stderr)
"""


def expected_digest() -> str:
    h = hashlib.sha256()
    for i in range(MB10 // 4096):
        h.update(i.to_bytes(4, "big") * 1024)
    return h.hexdigest()


def errno_of(fn, *args):
    try:
        fn(*args)
    except llmagentos.KernelError as e:
        return e.name
    return None


def pipe_fd(c, pid: int, fd: int) -> dict | None:
    return next((f for f in c.proc.stat(pid)["fds"] if f["fd"] == fd), None)


def test_three_processes_move_10mb_in_order_with_backpressure(shared_kernel):
    with shared_kernel.client() as c:
        p1, p2 = c.ipc.pipe(), c.ipc.pipe()
        a = c.proc.spawn([PY, "-c", PRODUCER], stdout=p1["write"])
        b = c.proc.spawn(["cat"], stdin=p1["read"], stdout=p2["write"])
        z = c.proc.spawn([PY, "-c", CONSUMER], stdin=p2["read"])
        for fd in [*p1.values(), *p2.values()]:  # the children hold the only ends now
            c.fs.close(fd)
        # The consumer has not read yet: both pipes fill and stop there, and the
        # producer, far from done, is held back.
        full = wait_for(lambda: (pipe_fd(c, b, 1) or {}).get("buffered") == CAPACITY
                        and (pipe_fd(c, b, 0) or {}).get("buffered") == CAPACITY)
        assert full
        assert c.proc.stat(a)["state"] != "ZOMBIE"
        peaks = []
        while c.proc.stat(z)["state"] != "ZOMBIE":
            for pid, fd in ((a, 1), (b, 0), (b, 1)):
                f = pipe_fd(c, pid, fd)
                if f is not None:
                    assert f["buffered"] <= f["capacity"] == CAPACITY
                    peaks.append(f["peak"])
            time.sleep(0.02)
        assert max(peaks) == CAPACITY  # filled, never past it
        for pid in (a, b, z):
            assert c.proc.wait(pid, 30)["exit_code"] == 0
        log = c.proc.logs(z)["data"].decode().split()
        assert log == [str(MB10), expected_digest()]


def test_writer_gets_epipe_after_the_reader_is_killed(shared_kernel):
    with shared_kernel.client() as c, shared_kernel.client() as other:
        p = c.ipc.pipe()
        r = c.proc.spawn([PY, "-c", "import time; time.sleep(60)"], stdin=p["read"])
        c.fs.close(p["read"])
        result = {}

        def write_much():
            try:
                result["n"] = c.fs.write(p["write"], b"x" * (1 << 20))
            except llmagentos.KernelError as e:
                result["errno"] = e.name
        t = threading.Thread(target=write_much)
        t.start()
        # The reader never reads: the write is parked on a full pipe ...
        wait_for(lambda: pipe_fd(other, 1, p["write"])["buffered"] == CAPACITY)
        assert t.is_alive()
        other.proc.kill(r, "SIGKILL")
        t.join(10)
        assert not t.is_alive()
        # ... and comes back with what went in before the reader left, then EPIPE.
        assert 0 < result.get("n", 0) < (1 << 20) or result.get("errno") == "EPIPE"
        with pytest.raises(BrokenPipeError) as e:
            c.fs.write(p["write"], b"more")
        assert e.value.name == "EPIPE"
        assert other.proc.wait(r, 10)["signal_name"] == "SIGKILL"


def test_eof_only_after_every_writer_closed(shared_kernel):
    with shared_kernel.client() as c, shared_kernel.client() as other:
        p = c.ipc.pipe()
        kids = [c.proc.spawn(["echo", word], stdout=p["write"]) for word in ("one", "two")]
        for pid in kids:
            c.proc.wait(pid, 10)
        got = b""
        while len(got) < 8:
            got += c.fs.read(p["read"], 100)
        assert sorted(got.split()) == [b"one", b"two"]
        done = {}
        t = threading.Thread(target=lambda: done.update(data=c.fs.read(p["read"], 100)))
        t.start()
        t.join(0.5)
        assert t.is_alive()  # our own write end is still open: no EOF, the read waits
        other.call("fs.close", p["write"])
        t.join(10)
        assert done == {"data": b""}
        assert c.fs.read(p["read"], 100) == b""  # EOF stays EOF


def test_seek_is_espipe_and_closed_or_wrong_ends_are_ebadf(shared_kernel):
    with shared_kernel.client() as c:
        p = c.ipc.pipe()
        r, w = p["read"], p["write"]
        assert errno_of(c.fs.seek, r, 0, 0) == errno_of(c.fs.seek, w, 0, 0) == "ESPIPE"
        assert errno_of(c.fs.write, r, b"x") == "EBADF"
        assert errno_of(c.fs.read, w, 1) == "EBADF"
        assert c.fs.write(w, "é") == 2  # str goes in as UTF-8
        assert c.fs.read(r, 0) == b"" and c.fs.read(r, -1) == "é".encode()
        c.fs.close(r)
        for fn, args in ((c.fs.read, (r, 1)), (c.fs.write, (r, b"x")), (c.fs.close, (r,)),
                         (c.fs.seek, (r, 0, 0))):
            assert errno_of(fn, *args) == "EBADF"
        assert errno_of(c.fs.write, w, b"x") == "EPIPE"  # its only reader is gone
        assert errno_of(c.fs.read, 0, 1) == errno_of(c.fs.read, 2**40, 1) == "EBADF"


def test_files_and_pipes_share_one_fd_table(shared_kernel):
    with shared_kernel.client() as c:
        f = c.fs.open("/notes", "w")
        p = c.ipc.pipe()
        assert len({f, p["read"], p["write"]}) == 3
        c.fs.close(f)
        again = c.fs.open("/notes", "r")
        assert again == f  # lowest free number, whichever kind
        assert errno_of(c.fs.write, again, b"x") == "EBADF"
        assert c.fs.write(p["write"], b"abc") == 3 and c.fs.read(p["read"], 10) == b"abc"
        kinds = {d["fd"]: d["kind"] for d in c.proc.stat()["fds"]}
        assert kinds == {f: "file", p["read"]: "pipe", p["write"]: "pipe"}


def test_fd_table_is_bounded(shared_kernel):
    with shared_kernel.client() as c:
        for _ in range(32):
            c.ipc.pipe()
        assert errno_of(c.ipc.pipe) == errno_of(c.fs.open, "/x", "w") == "EMFILE"


def test_a_shell_commands_fds_close_with_its_connection(shared_kernel):
    with shared_kernel.client() as c:
        p = c.ipc.pipe()
        reader = c.proc.spawn([PY, "-c", "import sys; print(len(sys.stdin.read()), "
                                          "file=sys.stderr)"], stdin=p["read"])
        c.fs.close(p["read"])
        c.fs.write(p["write"], b"12345")
    # the connection is gone with the write end it held: the child reads EOF
    with shared_kernel.client() as c:
        assert c.proc.wait(reader, 10)["exit_code"] == 0
        assert c.proc.logs(reader)["data"].strip() == b"5"
        assert c.proc.stat()["fds"] == []


def test_a_child_that_writes_into_a_closed_pipe_stops(shared_kernel):
    with shared_kernel.client() as c:
        p = c.ipc.pipe()
        a = c.proc.spawn([PY, "-c", "import sys\nwhile True: sys.stdout.write('y' * 4096)"],
                         stdout=p["write"])
        c.fs.close(p["write"])
        assert c.fs.read(p["read"], 10) == b"y" * 10
        c.fs.close(p["read"])  # like `yes | head -c 10`: the writer learns it is alone
        st = c.proc.wait(a, 20)
        assert st["exit_code"] != 0 or st["signal"] is not None


def test_a_childs_pipes_are_its_fd_0_and_1(shared_kernel):
    """fd 1 takes fs.write beside the OS stdout; fd 0 feeds the OS stdin, so
    fs.read on it is EBUSY (it would race the feed for the same bytes)."""
    script = ("import sys, llmagentos\nc = llmagentos.connect()\n"
              "try:\n    c.fs.read(0, 1)\nexcept llmagentos.KernelError as e:\n"
              "    print(e.name, file=sys.stderr)\n"
              "c.fs.write(1, sys.stdin.read().upper())\n")
    with shared_kernel.client() as c:
        pin, pout = c.ipc.pipe(), c.ipc.pipe()
        kid = c.proc.spawn([PY, "-c", script], stdin=pin["read"], stdout=pout["write"])
        c.fs.close(pin["read"])
        c.fs.close(pout["write"])
        fds = {f["fd"]: f for f in c.proc.stat(kid)["fds"]}
        assert (fds[0]["end"], fds[0]["feeds_stdin"], fds[1]["end"]) == ("read", True, "write")
        c.fs.write(pin["write"], b"shout")
        c.fs.close(pin["write"])
        got = b""
        while chunk := c.fs.read(pout["read"], 100):
            got += chunk
        assert got == b"SHOUT"
        assert c.proc.wait(kid, 10)["exit_code"] == 0
        assert c.proc.logs(kid)["data"].strip() == b"EBUSY"


def test_closing_fd_0_stops_the_feed(shared_kernel):
    script = ("import sys, llmagentos\nc = llmagentos.connect()\nc.fs.close(0)\n"
              "print(repr(sys.stdin.read()), file=sys.stderr)\n")
    with shared_kernel.client() as c:
        p = c.ipc.pipe()
        kid = c.proc.spawn([PY, "-c", script], stdin=p["read"])
        c.fs.close(p["read"])
        assert c.proc.wait(kid, 10)["exit_code"] == 0  # its stdin read EOF
        assert c.proc.logs(kid)["data"].strip() == b"''"
        assert errno_of(c.fs.write, p["write"], b"late") == "EPIPE"


def test_spawn_takes_only_the_right_pipe_ends(shared_kernel):
    with shared_kernel.client() as c:
        p = c.ipc.pipe()
        f = c.fs.open("/f", "w")
        argv = ["true"]
        for kw in ({"stdin": p["write"]}, {"stdout": p["read"]}, {"stdin": f}, {"stdout": f}):
            assert errno_of(lambda: c.proc.spawn(argv, **kw)) == "EINVAL", kw
        assert errno_of(lambda: c.proc.spawn(argv, stdin=99)) == "EBADF"
        assert errno_of(lambda: c.proc.spawn(argv, stdin=True)) == "EINVAL"
        # A spawn that fails holds nothing back: the only reader is still ours.
        assert errno_of(lambda: c.proc.spawn(["/no/such/program"], stdin=p["read"])) == "ENOENT"
        c.fs.close(p["read"])
        assert errno_of(c.fs.write, p["write"], b"x") == "EPIPE"


def test_ipc_pipe_needs_the_ipc_capability(shared_kernel):
    script = ("import llmagentos\nc = llmagentos.connect()\n"
              "try:\n    c.ipc.pipe()\n    print('ok')\n"
              "except llmagentos.KernelError as e:\n    print(e.name)\n")
    with shared_kernel.client() as c:
        without = c.proc.spawn([PY, "-c", script], caps=["fs.read", "fs.write"])
        with_ipc = c.proc.spawn([PY, "-c", script], caps=["ipc"])
        for pid, want in ((without, b"EACCES"), (with_ipc, b"ok")):
            assert c.proc.wait(pid, 20)["exit_code"] == 0
            assert c.proc.logs(pid)["data"].strip() == want




def test_llmos_spawn_makes_a_shell_pipeline_between_processes(shared_kernel):
    llmos = f"{PY} -m llmagentos.cli"
    line = (f"{llmos} spawn --pipe-stdout -- {PY} -c 'for i in range(3): print(\"line\", i)'"
            f" | {llmos} spawn --pipe-stdin --pipe-stdout -- tr a-z A-Z"
            f" | {llmos} spawn --pipe-stdin --pipe-stdout -- sh -c 'sort -r; exit 3'")
    r = subprocess.run(["bash", "-c", line + "; echo ${PIPESTATUS[@]}"],
                       env=shared_kernel.env(), capture_output=True, timeout=60)
    out = r.stdout.decode().splitlines()
    assert out == ["LINE 2", "LINE 1", "LINE 0", "0 0 3"], r.stderr.decode()
