"""Handlers of the `env` group: Gymnasium environments served by the kernel.

The environments live in one `EnvTable` (drivers/gymenv.py), a kernel
service (``call.sys.envs``); each belongs to the process that made it and is
closed when that process exits (an `on_exit` hook, kernel/services.py). The
shell user is init, which never exits: its environments die instead with the
connection that made them (swept at the next env.make).

Where the work runs (measured on the 2-core dev machine, others' tests
running beside: numbers move by half between runs, the ratios hold):

- reset and step run inline, on the event loop. A FrozenLake step with its
  text costs about 40 us in the driver (the step itself 5-7 us); a worker
  thread hop adds about 85 us to that (trio, interleaved runs). Through the
  kernel a step takes 110-145 us inline against 290-300 us via a thread
  (CartPole 90-130 against 250-340; `sys.null` is 60 us; a direct
  Gymnasium step 5-7 us). An environment whose calls average over
  `SLOW_CALL` (physics, pixels) moves to a worker thread from then on, so it
  cannot hold up other processes' syscalls or the device loop; the average
  is kept in either place, so it moves back when its calls get cheap again.
- env.make always runs in a worker thread: building an environment may
  import modules or precompute tables (a Taxi-v4 make: about 5 ms). With
  one process making Taxi environments in a loop, another's `sys.null` took
  42 us median / 4.8 ms p99 with make in a thread, 320 us / 19 ms inline.

A call on an environment that is busy in a worker thread (say from a second
connection of the same process) is EBUSY; a close meanwhile takes effect
when that call ends.
"""

from __future__ import annotations

from typing import Any

from .dispatch import Call, handler
from .proc import INIT_PID

SLOW_CALL = 0.002  # seconds per reset/step, on average, above which calls leave the loop


async def _run(call: Call, handle: int, method: str, *args: Any) -> Any:
    with call.sys.envs.use(call.caller.pid, handle) as rec:
        fn = getattr(rec, method)
        if rec.cost > SLOW_CALL:
            return await call.in_thread(fn, *args)
        return fn(*args)


@handler("env.make", runs="task")
async def make(call: Call, env_id: str, kwargs: dict | None) -> dict:
    table = call.sys.envs
    pid = call.caller.pid
    req = table.prepare(pid, env_id, kwargs)
    env = await call.in_thread(table.create, req)
    holder = call.conn if pid == INIT_PID else None
    return table.add(pid, req, env, holder)


@handler("env.reset", runs="task")
async def reset(call: Call, handle: int, seed: int | None, options: dict | None) -> dict:
    return await _run(call, handle, "reset", seed, options)


@handler("env.step", runs="task")
async def step(call: Call, handle: int, action: Any) -> dict:
    return await _run(call, handle, "step", action)


@handler("env.render", runs="task")
async def render(call: Call, handle: int) -> str:
    return await _run(call, handle, "render")


@handler("env.close", runs="task")
async def close(call: Call, handle: int) -> None:
    call.sys.envs.close(call.caller.pid, handle)


@handler("env.list")
async def list_(call: Call, prefix: str | None) -> list[str]:
    return call.sys.envs.list(prefix)
