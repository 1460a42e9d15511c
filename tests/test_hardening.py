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
