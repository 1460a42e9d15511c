"""The call table is the single source of truth and checks arguments once."""

import pytest

from llmagentos.syscalls import caps
from llmagentos.syscalls.errno import ERRNO, SyscallError
from llmagentos.syscalls.table import TABLE


def test_numbers_and_names_unique_and_grouped():
    nums = [sc.number for sc in TABLE]
    assert len(nums) == len(set(nums))
    for sc in TABLE:
        assert "." in sc.name and sc.doc


def test_errno_names_are_posix_and_numbers_unique():
    nums = [n for n, _ in ERRNO.values()]
    assert len(nums) == len(set(nums))
    assert ERRNO["ENOENT"][0] == 2 and ERRNO["EACCES"][0] == 13 and ERRNO["ENOSYS"][0] == 38


def test_bind_fills_defaults_and_checks_types():
    sc = TABLE["proc.wait"]
    assert sc.bind([3]) == {"pid": 3, "timeout": None}
    assert sc.bind([3, 1]) == {"pid": 3, "timeout": 1.0}
    with pytest.raises(SyscallError, match="must be int") as e:
        sc.bind(["3"])
    assert e.value.name == "EINVAL"
    with pytest.raises(SyscallError, match="missing"):
        sc.bind([])
    with pytest.raises(SyscallError, match="at most"):
        sc.bind([1, 2, 3])
    with pytest.raises(SyscallError, match="must be int"):
        sc.bind([True])  # a bool is not a pid


def test_every_float_parameter_refuses_nan_infinities_and_values_out_of_bounds():
    """A float in bounds passes without the full check (the fast path of the
    positional binding): the values next to it still go to the full one."""
    nan, inf = float("nan"), float("inf")
    seen = 0
    for sc in TABLE:
        for i, p in enumerate(sc.params):
            if "float" not in p.type.rstrip("?").split("|") or p.choices is not None:
                continue
            seen += 1
            args = [q.default if not q.required else {
                "int": 1, "float": 0.5, "str": "x", "bool": False, "bytes": b"x",
                "list": ["x"], "dict": {}, "any": 1}[q.type.rstrip("?").split("|")[0]]
                for q in sc.params]

            def bind(value, i=i, sc=sc, args=args):
                return sc.bind([*args[:i], value, *args[i + 1:]])

            for bad in (nan, inf, -inf, *(
                    [p.lo - 0.5] if p.lo is not None else []), *(
                    [p.hi + 0.5] if p.hi is not None else [])):
                with pytest.raises(SyscallError) as e:
                    bind(bad)
                assert e.value.name == "EINVAL", (sc.name, p.name, bad)
            ok = float(p.lo if p.lo is not None else 0.0)
            assert bind(ok)[p.name] == ok and type(bind(ok)[p.name]) is float
            if "int" not in p.type and int(ok) == ok:
                assert type(bind(int(ok))[p.name]) is float  # an int is taken as a float
    assert seen >= 10


def test_bind_keywords():
    sc = TABLE["proc.kill"]
    assert sc.bind([5], {"signal": "STOP"}) == {"pid": 5, "signal": "STOP", "payload": None}
    with pytest.raises(SyscallError, match="unknown argument"):
        sc.bind([5], {"sig": 9})
    with pytest.raises(SyscallError, match="given twice"):
        sc.bind([5], {"pid": 6})


def test_unknown_call_is_enosys():
    with pytest.raises(SyscallError) as e:
        TABLE["nope.nope"]
    assert e.value.name == "ENOSYS"


def test_capability_globs_and_bounding():
    assert caps.covers(["tool:*"], "tool:calc.eval")
    assert caps.covers(["*"], "proc.kill_any")
    assert not caps.covers(["fs.read"], "fs.write")
    assert caps.bounded(["fs.read", "tool:calc.*"], ["fs.read", "tool:calc.eval"]) == []
    assert caps.bounded(["fs.read"], ["fs.read", "exec"]) == ["exec"]
    assert caps.bounded(["tool:calc.*"], ["tool:*"]) == ["tool:*"]  # no widening by glob


def test_docs_are_generated_from_the_table():
    from pathlib import Path

    from llmagentos.syscalls.table import markdown
    doc = Path(__file__).parent.parent / "docs" / "syscalls.md"
    assert doc.read_text().strip() == markdown(TABLE).strip(), \
        "docs/syscalls.md is stale: run `llmos syscalls --markdown > docs/syscalls.md`"


def test_every_call_has_a_kernel_handler():
    from llmagentos.kernel import kernel  # noqa: F401  (registers every handler)
    from llmagentos.kernel.dispatch import missing
    assert missing() == []


def _handlers():
    from llmagentos.kernel import kernel  # noqa: F401  (registers every handler)
    from llmagentos.kernel.dispatch import HANDLERS
    return HANDLERS


def test_every_handler_signature_matches_its_table_row():
    import inspect
    for name, entry in _handlers().items():
        params = list(inspect.signature(entry.fn).parameters)
        assert params[0] == "call", name
        assert params[1:] == [p.name for p in TABLE[name].params], name


def test_where_a_handler_runs_is_declared_and_inline_ones_never_wait():
    """An inline handler is answered in its connection's own loop: it must not
    await anything (a worker thread, the device, another process)."""
    import inspect
    for name, entry in _handlers().items():
        assert entry.runs in ("inline", "task"), name
        if entry.runs == "inline":
            body = inspect.getsource(entry.fn).split(":\n", 1)[1]
            assert "await " not in body, f"{name} waits but runs inline"
    # the calls that held up their own connection while a worker thread ran
    for name in ("ctx.pin", "ctx.delete", "env.make", "proc.spawn", "drv.register"):
        assert _handlers()[name].runs == "task", name


async def test_a_slow_call_does_not_hold_its_connection(shared_kernel):
    """env.make (like ctx.pin and ctx.delete) ran its worker thread inline: a
    sys.null pipelined behind it on the same connection waited for it."""
    import trio

    import llmagentos
    async with llmagentos.aconnect(run_dir=shared_kernel.run_dir) as c:
        order = []

        async def make():
            await c.env.make("CartPole-v1")
            order.append("env.make")

        async def null():
            await trio.sleep(0.001)
            await c.sys.null()
            order.append("sys.null")
        async with trio.open_nursery() as n:
            n.start_soon(make)
            n.start_soon(null)
    assert order == ["sys.null", "env.make"], order


def test_every_notification_the_kernel_sends_is_in_the_abi():
    import re
    from pathlib import Path

    from llmagentos.syscalls import wire
    root = Path(__file__).resolve().parent.parent / "kernel"
    sent = set()
    for f in root.rglob("*.py"):
        sent |= set(re.findall(r'notify\("([a-z_.]+)"', f.read_text()))
    assert sent and sent <= set(wire.NOTIFICATIONS), sent - set(wire.NOTIFICATIONS)


def test_abi_facts_live_in_syscalls():
    """Limit names and the agent-name rule are the ABI's, checked in one place."""
    from llmagentos.syscalls.table import LIMITS, check_limit, check_name
    assert "tokens" in LIMITS and "exec_memory" in LIMITS
    with pytest.raises(SyscallError, match="unknown limit"):
        check_limit("bogus", 1)
    with pytest.raises(SyscallError, match="finite"):
        check_limit("tokens", float("nan"))
    with pytest.raises(SyscallError, match="control"):
        check_name("a\x00b")


def test_the_positional_binder_agrees_with_the_checks_argument_by_argument():
    """Each call's positional binder (code written for its parameters) against
    binding every argument through Param.check: the same result, or the same
    errno and message, for hostile values in every position and argument lists
    of every length."""
    import random

    from test_abi import HOSTILE

    rng = random.Random(7)
    values = [*HOSTILE, 0.5, 60.0, 86400.0, 86400.5, -0.5, "agent:x", {"from": 1}, {1: 2},
              {"type": "t"}, ["a", 1], (1, 2), b"\x00" * 3, 10**30, -10**30]

    def outcome(fn, args):
        try:
            out = fn(args)
        except SyscallError as e:
            return e.name, e.message
        # with each value's type: an int where check() gives a float is a difference
        return "ok", out and [(k, type(v), v) for k, v in out.items()]

    compared = 0
    for sc in TABLE:
        n = len(sc.params)
        lists = [[v if j == i else p.default if not p.required else 1
                  for j, p in enumerate(sc.params)] for i in range(n) for v in values]
        lists += [[rng.choice(values) for _ in range(rng.randint(0, n + 1))] for _ in range(60)]
        for args in lists:
            fast = outcome(sc._positional, args)
            if fast == ("ok", None):
                continue  # not its to bind: too many, or one missing
            compared += 1
            general = outcome(sc.bind_checked, args)
            assert fast == general, (sc.name, args)
            assert outcome(lambda a: sc.bind(a), args) == general
    assert compared > 5000
