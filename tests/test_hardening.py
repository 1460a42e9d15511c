"""Regression tests of the numbered attacks of the hardening issue: each one
once took the kernel down, froze it, or slipped past a limit."""

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
