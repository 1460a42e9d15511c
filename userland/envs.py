"""Gymnasium environments served by the kernel, as ordinary `gymnasium.Env`s.

    env = llmagentos.KernelEnv("FrozenLake-v1", is_slippery=False)
    obs, info = env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(2)
    print(env.last_text)          # what a language model reads
    env.close()

The environment itself runs in the kernel (env.make / reset / step / close);
this proxy rebuilds its spaces as real Gymnasium spaces and its observations
as numpy values of the right dtype, so anything written for Gymnasium
(wrappers, `check_env`, learners) works on it unchanged. Seeding is the
kernel's: `reset(seed=s)` seeds the real environment; the proxy's own
`np_random` is seeded with the same value and used by nothing.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym

from llmagentos.syscalls.errno import SyscallError
from llmagentos.syscalls.spaces import space_from_wire, value_from_wire, value_to_wire

from .aclient import AsyncClient
from .client import Client, connect
from .errors import ERRORS, KernelError


class KernelEnv(gym.Env):
    """A kernel-served environment. `client`: a sync `llmagentos.Client`
    (default: `llmagentos.connect()`, closed with the environment);
    keyword arguments go to the environment's constructor, as in `gym.make`."""

    metadata = {"render_modes": ["ansi"]}

    def __init__(self, env_id: str, client: Client | None = None, **kwargs: Any):
        if isinstance(client, AsyncClient):
            raise TypeError("KernelEnv needs a sync client (llmagentos.connect()); "
                            "with an AsyncClient call its env.* syscalls directly")
        self._own_client = client is None
        self.client: Client = connect() if client is None else client
        self.handle: int | None = None
        try:
            info = self.client.env.make(env_id, kwargs or None)
            self.handle = info["handle"]
            self.observation_space = _space(info["observation_space"])
            self.action_space = _space(info["action_space"])
        except BaseException:
            self.close()
            raise
        self.env_id = env_id
        self.kernel_spec: dict | None = info.get("spec")  # the kernel-side EnvSpec, as data
        self.action_names: list[str] | None = info.get("actions")
        self.about: str | None = info.get("about")
        self.render_mode = "ansi"  # render() is always text: the kernel's rendering
        self.metadata = {"render_modes": ["ansi"], "render_fps": info.get("render_fps")}
        self.last_text: str | None = None  # the text of the last observation

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        super().reset(seed=seed)
        r = self.client.env.reset(self._live(), seed, options)
        self.last_text = r.get("text")
        return value_from_wire(r["observation"], self.observation_space), \
            value_from_wire(r["info"])

    def step(self, action: Any) -> tuple[Any, Any, bool, bool, dict]:
        r = self.client.env.step(self._live(), value_to_wire(action))
        self.last_text = r.get("text")
        return (value_from_wire(r["observation"], self.observation_space), r["reward"],
                r["terminated"], r["truncated"], value_from_wire(r["info"]))

    def render(self) -> str:
        return self.client.env.render(self._live())

    def close(self) -> None:
        """Close the kernel's environment (and the client, if this made it).
        Closing twice is allowed."""
        handle, self.handle = self.handle, None
        try:
            if handle is not None:
                self.client.env.close(handle)
        except (KernelError, OSError):
            pass  # the kernel, or our process, is already gone: so is the environment
        finally:
            if self._own_client:
                self.client.close()  # idempotent

    def _live(self) -> int:
        if self.handle is None:
            raise ERRORS["EBADF"](f"environment {getattr(self, 'env_id', '?')} is closed")
        return self.handle

    def __repr__(self) -> str:
        state = f"handle {self.handle}" if self.handle is not None else "closed"
        return f"<KernelEnv {getattr(self, 'env_id', '?')} ({state})>"


def _space(d: dict) -> gym.Space:
    try:
        return space_from_wire(d)
    except SyscallError as e:
        raise ERRORS[e.name](e.message) from None


def make(env_id: str, client: Client | None = None, **kwargs: Any) -> KernelEnv:
    """`gym.make`, served by the kernel."""
    return KernelEnv(env_id, client=client, **kwargs)


__all__ = ["KernelEnv", "make"]
