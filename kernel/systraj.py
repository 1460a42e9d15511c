"""Handlers of the `traj` group: recording and reading experience."""

from __future__ import annotations

from typing import Any

from llmagentos.syscalls.errno import SyscallError

from .dispatch import Call, handler
from .sysctx import identity, owner_arg


@handler("traj.begin")
async def begin(call: Call, task: str, family: str | None, kind: str, meta: dict | None) -> int:
    pcb = call.caller
    return call.sys.trajectories.begin(identity(pcb), pcb.pid, task, family, kind, meta)


@handler("traj.step")
async def step(call: Call, episode: int, observation: Any, action: Any, reward: float,
               info: dict | None) -> int:
    return call.sys.trajectories.step(owner_arg(call.caller), episode, observation, action,
                                      reward, info)


@handler("traj.end")
async def end(call: Call, episode: int, success: bool | None, meta: dict | None) -> dict:
    return call.sys.trajectories.end(owner_arg(call.caller), episode, success, meta)


@handler("traj.list")
async def list_(call: Call, family: str | None, kind: str | None, agent: str | None,
                limit: int) -> list:
    if not 1 <= limit <= 10_000:
        raise SyscallError("EINVAL", "limit must be in 1..10000")
    owner = None if agent is None else (agent if ":" in agent else f"agent:{agent}")
    return call.sys.trajectories.list(family, kind, owner, limit)


@handler("traj.get")
async def get(call: Call, episode: int) -> dict:
    return call.sys.trajectories.get(episode)


@handler("traj.search")
async def search(call: Call, query: str, family: str | None, kind: str, k: int,
                 success: bool | None) -> list:
    if not 1 <= k <= 50:
        raise SyscallError("EINVAL", "k must be in 1..50")
    return call.sys.trajectories.search(query, family, kind, k, success)


@handler("traj.stats")
async def stats(call: Call, family: str) -> dict:
    return call.sys.trajectories.stats(family)
