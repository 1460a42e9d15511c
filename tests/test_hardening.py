"""Regression tests of the numbered attacks of the hardening issue: each one
once took the kernel down, froze it, or slipped past a limit."""

import os

import pytest

import llmagentos

NAN, INF = float("nan"), float("inf")


def attached(c, run_dir, **kw) -> tuple[int, llmagentos.Client]:
    """A child process of the caller that lives on a connection of this test."""
    child = c.proc.attach(None, None, kw.get("limits"))
    return child["pid"], llmagentos.connect(token=child["token"], run_dir=run_dir, timeout=30)


# --- 6. NaN limits ---------------------------------------------------------------------
@pytest.mark.parametrize("bad", [NAN, INF, -INF, -1, 2**64 - 1])
def test_setlimit_refuses_values_that_are_not_finite_non_negative(shared_kernel, bad):
    with shared_kernel.client() as c:
        pid, cc = attached(c, shared_kernel.run_dir, limits={"max_children": 1})
        with cc:
            for name in ("max_children", "tool_calls", "tokens", "wall_time"):
                with pytest.raises(ValueError) as e:
                    cc.proc.setlimit(pid, name, bad)
                assert e.value.name == "EINVAL"
            assert cc.proc.stat()["limits"] == {"max_children": 1}


def test_nan_max_children_does_not_lift_the_limit(shared_kernel):
    """NaN passed the 'only lower' check and then every 'live >= limit'
    comparison: a process with max_children=1 spawned four children."""
    with shared_kernel.client() as c:
        pid, cc = attached(c, shared_kernel.run_dir, limits={"max_children": 1})
        with cc:
            with pytest.raises(ValueError):
                cc.proc.setlimit(pid, "max_children", NAN)
            first = cc.proc.spawn(["sleep", "30"])
            with pytest.raises(BlockingIOError) as e:  # EAGAIN
                cc.proc.spawn(["sleep", "30"])
            assert e.value.name == "EAGAIN"
            cc.proc.kill(first, "KILL")
            cc.proc.wait(first, 10)


@pytest.mark.parametrize("bad", [NAN, INF, -INF, -0.5, 2**63])
def test_spawn_and_attach_limits_are_checked_the_same_way(shared_kernel, bad):
    with shared_kernel.client() as c:
        for name in ("max_children", "tool_calls", "fs_bytes", "wall_time"):
            with pytest.raises(ValueError, match=name):
                c.proc.spawn(["true"], None, None, None, None, {name: bad})
            with pytest.raises(ValueError, match=name):
                c.proc.attach(None, None, {name: bad})


def test_nan_tool_calls_is_not_unlimited(shared_kernel):
    with shared_kernel.client() as c:
        with pytest.raises(ValueError):
            c.proc.attach(None, None, {"tool_calls": NAN})
        pid, cc = attached(c, shared_kernel.run_dir, limits={"tool_calls": 1})
        with cc:
            with pytest.raises(ValueError):
                cc.proc.setlimit(pid, "tool_calls", NAN)
            cc.tool.call("calc.eval", {"expression": "1+1"})
            with pytest.raises(llmagentos.KernelError) as e:
                cc.tool.call("calc.eval", {"expression": "1+1"})
            assert e.value.name == "EDQUOT"


@pytest.mark.parametrize("call,args", [
    ("proc.wait", [2, NAN]), ("proc.wait", [2, INF]), ("proc.wait", [2, -1]),
    ("tool.call", ["calc.eval", {"expression": "1"}, NAN]),
    ("tool.call", ["calc.eval", {"expression": "1"}, INF]),
    ("sys.shutdown", [NAN]), ("sys.shutdown", [-INF]),
    ("traj.step", [1, None, None, NAN]), ("fs.seek", [3, 2**63]), ("fs.seek", [3, 0, 7]),
    ("proc.logs", [1, 2**63]), ("ctx.read", [0, None, True, 2**64 - 1]),
    ("proc.nice", [1, 20]), ("mem.search", ["q", 0]), ("proc.spawn", [["true"], None, None,
                                                                        None, None, None, -21]),
])
def test_numbers_out_of_range_are_einval_before_any_handler(shared_kernel, call, args):
    with shared_kernel.client() as c:
        with pytest.raises(ValueError) as e:
            c.call(call, *args)
        assert e.value.name == "EINVAL" and "parameter" in e.value.message


# --- 4. a driver's schema froze the kernel -----------------------------------------------
EVIL = "^(a+)+$"  # backtracks 2**n steps in Python's re on "a"*n + "!"


def _null_rtts(socket_run_dir, stop) -> list[float]:
    import time
    out = []
    with llmagentos.connect(run_dir=socket_run_dir) as c:
        while not stop.is_set():
            t = time.perf_counter()
            c.sys.null()
            out.append(time.perf_counter() - t)
    return out


@pytest.mark.parametrize("schema,args", [
    ({"type": "object", "properties": {"s": {"type": "string", "pattern": EVIL}}},
     {"s": "a" * 28 + "!"}),
    ({"type": "object", "patternProperties": {EVIL: {"type": "integer"}}, "required": ["z"]},
     {"a" * 28 + "!": 1}),
    ({"type": "object", "patternProperties": {EVIL: {}}, "additionalProperties": False},
     {"a" * 28 + "!": 1}),
])
def test_catastrophic_pattern_cannot_freeze_the_kernel(shared_kernel, schema, args):
    import threading
    import time
    ns = f"evil{abs(hash(str(schema))) % 10**6}"
    with shared_kernel.client(timeout=60) as c:
        c.drv.register(ns, [{"name": "t", "schema": schema}])
        stop = threading.Event()
        rtts: list[float] = []
        t = threading.Thread(target=lambda: rtts.extend(_null_rtts(shared_kernel.run_dir, stop)))
        t.start()
        try:
            time.sleep(0.1)
            t0 = time.monotonic()
            with pytest.raises(llmagentos.KernelError) as e:
                c.tool.call(f"{ns}.t", args, 5.0)
            took = time.monotonic() - t0
        finally:
            stop.set()
            t.join()
        c.drv.unregister(ns)
    assert e.value.name == "EINVAL"
    assert took < 2.0
    assert max(rtts) < 1.0


@pytest.mark.parametrize("schema,why", [
    ({"type": "string", "pattern": "(a)\\1"}, "not supported"),
    ({"type": "string", "pattern": "(?=a)b"}, "not supported"),
    ({"patternProperties": {"(?<!x)y": {}}}, "not supported"),
    ({"pattern": "a" * 5000}, "longer than"),
    ({"patternProperties": {"a": {}}, "unevaluatedProperties": False}, "unevaluatedProperties"),
    ({"type": "string", "pattern": "["}, "JSON schema"),
])
def test_patterns_re2_cannot_match_are_refused_at_register(shared_kernel, schema, why):
    with shared_kernel.client() as c:
        with pytest.raises(ValueError, match=why):
            c.drv.register("badpattern", [{"name": "t", "schema": schema}])
        assert "badpattern.t" not in {t["name"] for t in c.tool.list()}


def test_patterns_still_match(shared_kernel):
    with shared_kernel.client() as c:
        c.drv.register("goodpattern", [{"name": "t", "schema": {
            "type": "object", "properties": {"id": {"type": "string", "pattern": "^[a-z]+-\\d+$"}},
            "patternProperties": {"^x-": {"type": "integer"}}, "additionalProperties": False}}])
        try:
            for bad in ({"id": "abc"}, {"id": "ABC-1"}, {"x-a": "s"}, {"y": 1}):
                with pytest.raises(ValueError):
                    c.tool.call("goodpattern.t", bad, 2.0)
            with pytest.raises(TimeoutError):  # valid: reaches the driver, which is silent
                c.tool.call("goodpattern.t", {"id": "abc-12", "x-n": 3}, 0.5)
        finally:
            c.drv.unregister("goodpattern")


# --- worker threads: each process has a fair share ------------------------------------------
def test_parked_exec_calls_of_one_process_leave_threads_for_others(shared_kernel):
    """40 exec.run calls parked in sleep by one process took every worker
    thread: another agent's calc.eval went from 0.8 ms to 19 s."""
    import threading
    import time
    with shared_kernel.client(timeout=60) as c:
        token = c.proc.attach(None)["token"]  # the hog: one process, 40 connections
        conns = [llmagentos.connect(token=token, run_dir=shared_kernel.run_dir, timeout=60)
                 for _ in range(40)]
        started = threading.Barrier(41)

        def park(cc):
            started.wait()
            try:
                cc.tool.call("exec.run", {"lang": "sh", "code": "exec sleep 3"}, 30.0)
            except (llmagentos.KernelError, OSError):
                pass  # closed under it at the end of the test

        threads = [threading.Thread(target=park, args=(cc,), daemon=True) for cc in conns]
        for t in threads:
            t.start()
        started.wait()
        time.sleep(0.5)  # all forty are in the kernel now
        try:
            took = []
            for _ in range(5):
                t0 = time.monotonic()
                assert c.tool.call("calc.eval", {"expression": "6*7"}, 10.0)["value"] == 42
                took.append(time.monotonic() - t0)
        finally:
            for cc in conns:
                cc.close()
    assert max(took) < 1.0, took


# --- 1. a deep tree took the kernel down at exit ---------------------------------------------
DEEP = 1500


def _tree_gone(k, pid: int) -> bool:
    from llmagentos.kernel.names import path_name
    trash = k.state_dir / "trash"
    return not (k.state_dir / "fs" / path_name(f"pid:{pid}")).exists() and (
        not trash.exists() or not any(trash.iterdir()))


def test_exit_after_exec_made_a_1500_deep_tree(shared_kernel):
    """shutil.rmtree recursed at release and raised RecursionError, which its
    ignore_errors does not catch: the kernel died."""
    from conftest import wait_for
    with shared_kernel.client(timeout=60) as c:
        pid, cc = attached(c, shared_kernel.run_dir)
        with cc:
            res = cc.tool.call("exec.run", {"lang": "python", "timeout": 30, "code": (
                f"import os\nfor _ in range({DEEP}):\n    os.mkdir('d'); os.chdir('d')\n"
                "print(len(os.getcwd().split('/d')) - 1)")}, 60.0)
            assert res["exit_code"] == 0, res
            assert int(res["stdout"]) == DEEP
            assert cc.fs.stat("/d")["type"] == "dir"
        wait_for(lambda: _tree_gone(shared_kernel, pid), timeout=20)
        assert c.proc.getpid() == 1  # the kernel is up
    assert shared_kernel.proc.poll() is None


def test_exit_after_fs_mkdir_made_a_1500_deep_tree(shared_kernel):
    import time

    from conftest import wait_for
    with shared_kernel.client(timeout=60) as c:
        pid, cc = attached(c, shared_kernel.run_dir, limits={"fs_files": 10_000})
        with cc:
            t0 = time.monotonic()
            cc.fs.mkdir("/" + "/".join(["d"] * DEEP), True)
            assert time.monotonic() - t0 < 5  # one walk down, not one per level
            assert cc.fs.usage()["files"] == DEEP
            cc.fs.mkdir("/" + "/".join(["d"] * DEEP), True)  # exists: fine, as mkdir -p
            with pytest.raises(FileExistsError):
                cc.fs.mkdir("/" + "/".join(["d"] * DEEP))
            cc.fs.write_file("/d/d/f", b"x")
            with pytest.raises(NotADirectoryError):
                cc.fs.mkdir("/d/d/f/g", True)
        wait_for(lambda: _tree_gone(shared_kernel, pid), timeout=20)
        assert c.proc.getpid() == 1
    assert shared_kernel.proc.poll() is None


def test_trash_is_emptied_whatever_the_shape(tmp_path):
    """The remover is iterative and shallow: depth, width, symlinks out of the
    tree (never followed), files without write permission."""
    from llmagentos.drivers.sandbox import discard, empty_trash
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("k")
    root = tmp_path / "root"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY)
    for _ in range(3000):  # deeper than PATH_MAX: made one level at a time
        os.mkdir("d", dir_fd=fd)
        fd, old = os.open("d", os.O_RDONLY, dir_fd=fd), fd
        os.close(old)
    os.symlink(outside, "link", dir_fd=fd)
    os.close(fd)
    for i in range(200):
        (root / f"f{i}").write_text("x")
    os.symlink(outside, root / "link")
    os.chmod(root / "f0", 0)
    trash = tmp_path / "trash"
    assert discard(root, trash) and not root.exists()
    assert not discard(root, trash)  # already gone
    assert empty_trash(trash) >= 3000 + 200
    assert list(trash.iterdir()) == []
    assert (outside / "keep").read_text() == "k"


# --- wire and connections: size checks before work --------------------------------------------
def _raw(path):
    import socket
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(path)
    return s


def _until_closed(s) -> list:
    import msgpack
    u = msgpack.Unpacker(raw=False)
    out = []
    while True:
        try:
            data = s.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        u.feed(data)
        out.extend(u)
    return out


def _hello(s, token):
    import msgpack
    s.sendall(msgpack.packb([0, 1, "sys.hello", [token]]))
    u = msgpack.Unpacker(raw=False)
    while True:
        u.feed(s.recv(65536))
        for m in u:
            assert m[2] is None
            return


@pytest.mark.parametrize("frame,why", [
    (lambda: __import__("msgpack").packb([0, 2, "mem.put", ["k", {str(i): 0 for i in
                                                                 range(1_000_000)}]]),
     "exceeds max_map_len"),
    (lambda: b"\x94\x00\x02\xa8sys.null\xdd" + (4_000_000).to_bytes(4, "big") + b"\x90" * 4_000_000,
     "exceeds max_array_len"),
    (lambda: __import__("msgpack").packb([0, 2, "sys.null", [[[]] * 60_000] * 3]),
     "more than 65536"),
])
def test_huge_frames_are_refused_before_they_are_built(shared_kernel, frame, why):
    import time
    data = frame()
    with shared_kernel.client() as c:
        s = _raw(shared_kernel.socket)
        _hello(s, shared_kernel.token)
        t0 = time.monotonic()
        try:
            s.sendall(data)
        except BrokenPipeError:
            pass  # closed before all of it arrived: the reason is still there to read
        msgs = _until_closed(s)
        assert time.monotonic() - t0 < 5
        assert msgs[-1][1] == "sys.close" and why in msgs[-1][2][0]
        assert c.proc.getpid() == 1


def test_deep_arguments_are_einval_and_the_connection_goes_on(shared_kernel):
    import msgpack
    s = _raw(shared_kernel.socket)
    _hello(s, shared_kernel.token)
    deep = b"\x91" * 1000 + b"\x90"
    s.sendall(b"\x94\x00\x02\xa7mem.put\x92\xa1k" + deep)
    s.sendall(msgpack.packb([0, 3, "sys.null", []]))
    u = msgpack.Unpacker(raw=False)
    got = {}
    while len(got) < 2:
        u.feed(s.recv(65536))
        for m in u:
            got[m[1]] = m
    assert got[2][2]["name"] == "EINVAL" and "nested deeper" in got[2][2]["message"]
    assert got[3][2] is None


def test_a_big_frame_before_hello_closes_the_connection(shared_kernel):
    import msgpack
    s = _raw(shared_kernel.socket)
    try:
        s.sendall(msgpack.packb([0, 1, "sys.hello", ["x" * 200_000]]))
    except BrokenPipeError:
        pass
    msgs = _until_closed(s)
    assert msgs and msgs[-1][1] == "sys.close" and "before sys.hello" in msgs[-1][2][0]


def test_connection_caps(tmp_path):
    from conftest import boot_kernel
    k = boot_kernel(tmp_path, "--max-connections", "6", "--max-unauthenticated", "3")
    try:
        idle = [_raw(k.socket) for _ in range(3)]  # never say hello
        extra = _raw(k.socket)
        msgs = _until_closed(extra)
        assert msgs[-1][1] == "sys.close" and "have not said hello" in msgs[-1][2][0]
        for s in idle:
            s.close()
        import time
        time.sleep(0.3)
        clients = [k.client() for _ in range(6)]
        refused = _raw(k.socket)
        assert "too many connections" in _until_closed(refused)[-1][2][0]
        assert clients[0].proc.getpid() == 1
        clients[0].close()
        time.sleep(0.3)
        with k.client() as c:  # a slot is free again
            assert c.sys.stats()["counters"]["connections_refused"] == 2
        for c in clients[1:]:
            c.close()
    finally:
        k.stop()


def test_a_15mb_prompt_is_refused_by_size(shared_kernel):
    with shared_kernel.client() as c:
        for call, args in (("llm.tokenize", ["a" * 15_000_000]),
                           ("llm.generate", ["é" * 600_000]),
                           ("llm.generate", [None, [{"role": "user",
                                                     "content": "x" * 1_100_000}]])):
            with pytest.raises(llmagentos.KernelError) as e:
                c.call(call, *args)
            assert e.value.name == "E2BIG"
