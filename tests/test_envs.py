"""Gymnasium environments served by the kernel: the wire form of spaces and
values, the env.* syscalls from real processes, and `KernelEnv`, the proxy
that makes a kernel environment an ordinary `gymnasium.Env`."""

import json
import textwrap
import time
import warnings

import gymnasium as gym
import msgpack
import numpy as np
import pytest
from conftest import PY, wait_for
from gymnasium import spaces
from gymnasium.utils.env_checker import check_env, data_equivalence

import llmagentos
from llmagentos.drivers.gymenv import EnvTable, ansi_to_text
from llmagentos.envs import KernelEnv
from llmagentos.syscalls.errno import SyscallError
from llmagentos.syscalls.spaces import (
    space_from_wire,
    space_to_wire,
    value_from_wire,
    value_to_wire,
)


def over_the_wire(obj):
    """What the other end decodes (the kernel's codec settings)."""
    return msgpack.unpackb(msgpack.packb(obj, use_bin_type=True), raw=False,
                           strict_map_key=False)


def scalars_plain(x):
    """numpy scalars as Python numbers: the one thing the wire does not keep
    (a Discrete observation comes back as the int most environments return;
    a shape-() Box value as a 0-d array)."""
    if isinstance(x, np.generic) or isinstance(x, np.ndarray) and x.ndim == 0:
        return x.item()
    if isinstance(x, tuple):
        return tuple(scalars_plain(v) for v in x)
    if isinstance(x, dict):
        return {k: scalars_plain(v) for k, v in x.items()}
    return x


SPACES = [
    spaces.Discrete(5, start=-2),
    spaces.Box(-np.inf, np.inf, (3,), np.float32),
    spaces.Box(np.array([-1.0, 0.0, -np.inf]), np.array([1.0, np.inf, 2.5]), dtype=np.float64),
    spaces.Box(0, 255, (4, 5, 3), np.uint8),
    spaces.Box(-3, 3, (), np.int8),
    spaces.MultiDiscrete([3, 4, 2], start=[1, 0, -1]),
    spaces.MultiBinary(4),
    spaces.MultiBinary([2, 3]),
    spaces.Tuple((spaces.Discrete(32), spaces.Discrete(11), spaces.Discrete(2))),
    spaces.Dict({"pos": spaces.Box(0, 1, (2,)), "key": spaces.Discrete(3),
                 "nested": spaces.Tuple((spaces.MultiBinary(2), spaces.Text(4)))}),
    spaces.Text(8, min_length=2, charset="abc"),
    spaces.Sequence(spaces.Discrete(4)),
    spaces.OneOf((spaces.Discrete(2), spaces.Box(-1, 1, (2,), np.float32))),
]


# --- the wire form (no kernel) -------------------------------------------------------
@pytest.mark.parametrize("space", SPACES, ids=lambda s: type(s).__name__)
def test_spaces_and_their_values_survive_the_wire(space):
    wire = over_the_wire(space_to_wire(space))
    json.dumps(wire, allow_nan=False)  # plain data: even infinite bounds are JSON-safe
    back = space_from_wire(wire)
    assert back == space and type(back) is type(space)
    space.seed(0)
    for _ in range(5):
        v = space.sample()
        got = value_from_wire(over_the_wire(value_to_wire(v)), back)
        assert data_equivalence(scalars_plain(v), scalars_plain(got), exact=True), (v, got)
        assert got in back


def test_large_arrays_travel_as_bytes_and_come_back_exact():
    a = np.random.default_rng(0).standard_normal((32, 32)).astype(np.float32)
    wire = value_to_wire(a)
    assert isinstance(wire["ndarray"], bytes) and len(wire["ndarray"]) == a.nbytes
    back = value_from_wire(over_the_wire(wire))  # no space needed: the form says its dtype
    assert back.dtype == np.float32 and np.array_equal(back, a)


def test_info_values_become_plain_data():
    info = {"prob": np.float64(0.5), "mask": np.array([1, 0], np.int8), 3: (np.int64(4), None),
            "obj": object()}
    wire = over_the_wire(value_to_wire(info))
    assert wire["prob"] == 0.5 and wire[3] == [4, None] and wire["obj"].startswith("<object")
    assert value_from_wire(wire)["mask"].dtype == np.int8


def test_unsupported_spaces_are_described_not_rebuilt():
    g = spaces.Graph(node_space=spaces.Discrete(3), edge_space=None)
    wire = space_to_wire(g)
    assert wire["type"] == "unsupported" and "Graph" in wire["repr"]
    with pytest.raises(SyscallError, match="cannot describe") as e:
        space_from_wire(wire)
    assert e.value.name == "EINVAL"
    for bad in ({"type": "Box", "dtype": "object", "low": 0, "high": 1, "shape": [1]},
                {"type": "Nope"}, "Discrete(3)"):
        with pytest.raises(SyscallError):
            space_from_wire(bad)


def test_actions_as_plain_data_take_the_space_dtype_only_when_nothing_is_lost():
    box = spaces.Box(-1, 1, (2,), np.float32)
    a = value_from_wire([0.5, -1], box)
    assert a.dtype == np.float32 and a in box
    ints = spaces.MultiDiscrete([3, 3])
    assert value_from_wire([1, 2], ints) in ints
    for bad, space in (([0.5, 1], ints), (True, spaces.Discrete(2)), ("x", spaces.Discrete(2)),
                       ({"ndarray": [1], "dtype": "object", "shape": [1]}, box),
                       ({"ndarray": [1, 2], "dtype": "float32", "shape": [3]}, box),
                       ([1], spaces.Tuple((spaces.Discrete(2), spaces.Discrete(2))))):
        with pytest.raises(SyscallError) as e:
            value_from_wire(bad, space)
        assert e.value.name == "EINVAL"


def test_ansi_renderings_become_plain_text_with_the_marks_in_words():
    rendered = "  (Down)\n\x1b[41mS\x1b[0mFFF\nFH\x1b[1;34mF\x1b[0mH\n"
    text = ansi_to_text(rendered, {"bg:red": "you"})
    assert "\x1b" not in text
    assert text.splitlines() == ["SFFF", "FHFH", "you: row 0, col 0 (on 'S')",
                                 "blue: row 1, col 2 (on 'F')", "last action: Down"]


# --- the table of environments (no kernel) ---------------------------------------------
def errno_of(fn, *args):
    try:
        fn(*args)
    except SyscallError as e:
        return e.name, e.message
    raise AssertionError("no error")


def test_env_table_checks_ids_kwargs_handles_and_its_cap():
    t = EnvTable(max_per_owner=2)
    name, msg = errno_of(t.make, 7, "Taxi-v3")  # deprecated in Gymnasium 1.x
    assert name == "ENOENT" and "Taxi-v4" in msg
    assert errno_of(t.make, 7, "os:system")[0] == "ENOENT"  # never imports a client's module
    assert errno_of(t.make, 7, "FrozenLake-v1", {"no_such_arg": 1})[0] == "EINVAL"
    assert errno_of(t.make, 7, "FrozenLake-v1", {"render_mode": "human"})[0] == "EINVAL"
    assert errno_of(t.make, 7, "FrozenLake-v1", {"desc": b"SFFG"})[0] == "EINVAL"
    h = t.make(7, "FrozenLake-v1")["handle"]
    t.make(7, "CartPole-v1")
    assert errno_of(t.make, 7, "CartPole-v1")[0] == "EMFILE"
    t.make(8, "CartPole-v1")  # the cap is per process
    foreign = errno_of(t.step, 8, h, 0)
    missing = errno_of(t.step, 8, 10_000, 0)
    assert foreign[0] == missing[0] == "EBADF"
    assert foreign[1].replace(str(h), "N") == missing[1].replace("10000", "N")  # no leak
    assert t.close_owner(7) == 2 and len(t) == 1
    assert t.stats["env.made"] == 3 and t.stats["env.closed"] == 2


def test_a_busy_environment_refuses_a_second_call_and_closes_when_the_first_ends():
    # What the kernel relies on when a slow environment's step runs in a worker thread.
    t = EnvTable()
    h = t.make(7, "CartPole-v1")["handle"]
    closes = []
    with t.use(7, h) as rec:
        rec.env.close = lambda: closes.append(h)
        rec.reset(0, None)
        assert errno_of(t.step, 7, h, 0)[0] == "EBUSY"
        assert t.close_owner(7) == 1  # the process exits meanwhile
        assert rec.doomed and closes == []  # not closed under the running call
        rec.step(0)
    assert closes == [h]
    assert errno_of(t.step, 7, h, 0)[0] == "EBADF"


# --- through the kernel -----------------------------------------------------------------
def spawn(c, body, caps=None):
    pid = c.proc.spawn([PY, "-c", textwrap.dedent(body)], None, None, None, caps, None)
    st = c.proc.wait(pid, 60)
    out = c.proc.logs(pid)["data"].decode()
    assert st["exit_code"] == 0, out
    return out


@pytest.mark.parametrize("env_id", ["FrozenLake-v1", "CartPole-v1", "Taxi-v4", "Blackjack-v1"])
def test_the_proxy_passes_gymnasiums_env_checker(shared_kernel, env_id):
    # Taxi-v3 is deprecated in Gymnasium 1.x (make raises DeprecatedEnv): v4 is today's.
    with shared_kernel.client() as c, KernelEnv(env_id, client=c) as env:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no spec, no render_fps: warnings only
            check_env(env)
        assert env.unwrapped is env


def test_a_frozen_lake_episode_through_the_kernel(shared_kernel):
    with shared_kernel.client() as c:
        env = llmagentos.make("FrozenLake-v1", client=c, is_slippery=False)
        assert env.observation_space == spaces.Discrete(16)
        assert env.action_names == ["Left", "Down", "Right", "Up"]
        obs, info = env.reset(seed=0)
        assert obs == 0 and "you: row 0, col 0 (on 'S')" in env.last_text
        assert "actions: 0 Left, 1 Down, 2 Right, 3 Up" in env.last_text
        path = [1, 1, 2, 2, 1, 2]  # down, down, right, right, down, right
        total, seen = 0.0, [obs]
        for i, a in enumerate(path):
            obs, reward, terminated, truncated, info = env.step(a)
            seen.append(obs)
            total += reward
            assert terminated == (i == len(path) - 1) and not truncated
        assert seen == [0, 4, 8, 9, 10, 14, 15] and total == 1.0
        assert "you: row 3, col 3 (on 'G')" in env.last_text
        assert "last action: Right" in env.render()
        env.close()
        env.close()  # twice is fine
        with pytest.raises(llmagentos.KernelError, match="closed"):
            env.step(0)


def test_same_seed_same_trajectory_and_the_same_as_direct_gymnasium(shared_kernel):
    def trajectory(env, seed):
        obs, _ = env.reset(seed=seed)
        rng = np.random.default_rng(seed)
        out = [obs]
        for _ in range(40):
            obs, r, term, trunc, _ = env.step(int(rng.integers(env.action_space.n)))
            out.append((obs, r, term, trunc))
            if term or trunc:
                out.append(env.reset()[0])
        return out

    with shared_kernel.client() as c:
        for env_id in ("FrozenLake-v1", "CartPole-v1"):  # slippery: the seed decides
            with KernelEnv(env_id, client=c) as a, KernelEnv(env_id, client=c) as b:
                ta, tb = trajectory(a, 5), trajectory(b, 5)
                assert data_equivalence(ta, tb, exact=True)
                assert not data_equivalence(ta, trajectory(a, 6), exact=True)
            direct = gym.make(env_id)
            assert data_equivalence(ta, trajectory(direct, 5), exact=True)


def test_errnos_through_the_kernel(shared_kernel):
    with shared_kernel.client() as c:
        with pytest.raises(FileNotFoundError, match="did you mean"):
            c.env.make("FrozenLake-v9")
        with pytest.raises(ValueError, match="unexpected keyword"):
            c.env.make("FrozenLake-v1", {"slippery": False})
        assert "FrozenLake-v1" in c.env.list("Frozen") and "CartPole-v1" not in c.env.list("F")
        h = c.env.make("FrozenLake-v1")["handle"]
        with pytest.raises(ValueError, match=r"not in the action space Discrete\(4\)"):
            c.env.step(h, 4)
        with pytest.raises(ValueError, match="reset the environment"):
            c.env.step(h, 0)
        c.env.reset(h, 1)
        # Another process cannot touch it, nor learn that it exists; one without
        # the env capability cannot make environments at all (env.list needs none).
        out = spawn(c, f"""
            import llmagentos
            c = llmagentos.connect()
            for h in ({h}, 999999):
                for fn, args in ((c.env.step, (h, 0)), (c.env.render, (h,)), (c.env.close, (h,))):
                    try:
                        fn(*args)
                    except llmagentos.KernelError as e:
                        print(e.name)
            """)
        assert out.split() == ["EBADF"] * 6
        out = spawn(c, """
            import llmagentos
            c = llmagentos.connect()
            try:
                c.env.make("FrozenLake-v1")
            except PermissionError as e:
                print(e.name, len(c.env.list()) > 10)
            """, caps=["proc.spawn"])
        assert out.split() == ["EACCES", "True"]
        assert c.env.step(h, 0)["observation"] in range(16)  # still ours, still working
        c.env.close(h)
        with pytest.raises(llmagentos.KernelError) as e:
            c.env.close(h)
        assert e.value.name == "EBADF"


def test_environments_are_closed_when_their_process_exits(shared_kernel):
    def closed(c):
        return c.sys.stats()["counters"].get("env.closed", 0)

    with shared_kernel.client() as c:
        before = closed(c)
        out = spawn(c, """
            import llmagentos
            c = llmagentos.connect()
            print(c.env.make("CartPole-v1")["handle"], c.env.make("Taxi-v4")["handle"])
            """)  # exits without closing them
        assert len(out.split()) == 2
        assert closed(c) == before + 2
        # The shell user (init) never exits: its environments go with the
        # connection that made them, swept at the next env.make.
        with shared_kernel.client() as other:
            other.env.make("CartPole-v1")
        mine = 0

        def swept():  # the kernel sees the connection end a moment later
            nonlocal mine
            c.env.close(c.env.make("CartPole-v1")["handle"])
            mine += 1
            return closed(c) == before + 3 + mine

        wait_for(swept, timeout=5)


def test_step_latency_through_the_kernel_vs_direct(shared_kernel):
    n = 500

    def per_step(env):
        env.reset(seed=0)
        t = time.perf_counter()
        for i in range(n):
            _, _, term, trunc, _ = env.step(i % 2)
            if term or trunc:
                env.reset()
        return (time.perf_counter() - t) / n * 1e6

    with shared_kernel.client() as c:
        for env_id in ("FrozenLake-v1", "CartPole-v1"):
            with KernelEnv(env_id, client=c) as k:
                kernel_us = per_step(k)
            direct_us = per_step(gym.make(env_id))
            print(f"\n{env_id}: {kernel_us:.0f} us/step through the kernel, "
                  f"{direct_us:.1f} us/step direct")
