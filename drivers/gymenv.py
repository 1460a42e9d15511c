"""The env driver: Gymnasium environments served by the kernel.

Two halves, no I/O and no kernel imports in either:

- the wire form of spaces, observations and actions lives in
  syscalls/spaces.py (it is the `env` group's ABI, shared with userland).
- `EnvTable`: the environments of every process, by handle, with the text a
  language model reads for each observation (`observation_text`).
"""

from __future__ import annotations

import difflib
import functools
import re
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import gymnasium as gym
import msgpack
import numpy as np
from gymnasium import spaces

from llmagentos.syscalls.errno import SyscallError
from llmagentos.syscalls.spaces import _einval, space_to_wire, value_from_wire, value_to_wire

MAX_KWARGS_BYTES = 64 * 1024  # env.make's kwargs, msgpack-encoded
MAX_PER_OWNER = 16  # open environments per process: beyond it is EMFILE

# --- text for a language model ------------------------------------------------------
@dataclass(frozen=True)
class EnvNotes:
    """What the driver knows about a family of environments, for the text."""

    actions: tuple[str, ...] = ()  # action i's meaning (Discrete action spaces)
    labels: tuple[str, ...] = ()  # observation component names
    marks: dict[str, str] = field(default_factory=dict)  # ANSI style -> what it marks
    about: str = ""  # one line: the map's legend, the rules


_GRID = EnvNotes(("Left", "Down", "Right", "Up"), (), {"bg:red": "you"},
                 "S start, F frozen (safe), H hole (the episode ends), G goal (reward 1)")
_CLIFF = EnvNotes(("Up", "Right", "Down", "Left"), (), {},
                  "x you, o safe, C cliff (reward -100, back to start), T target; -1 a step")
NOTES: dict[str, EnvNotes] = {
    "FrozenLake": _GRID, "FrozenLake8x8": _GRID,
    "CliffWalking": _CLIFF, "CliffWalkingSlippery": _CLIFF,
    "Taxi": EnvNotes(("South", "North", "East", "West", "Pickup", "Dropoff"), (),
                     {"bg:yellow": "taxi (empty)", "bg:green": "taxi (with the passenger)",
                      "fg:blue": "passenger", "fg:magenta": "destination"},
                     "R G Y B are stands; | is a wall; pick the passenger up and drop "
                     "them at the destination (+20); -1 a step, -10 a wrong pickup/dropoff"),
    "Blackjack": EnvNotes(("Stick", "Hit"), ("your sum", "dealer showing", "usable ace"), {},
                          "get closer to 21 than the dealer without going over"),
    "CartPole": EnvNotes(("Push left", "Push right"),
                         ("cart position", "cart velocity", "pole angle", "pole angular velocity"),
                         {}, "keep the pole upright: +1 a step"),
    "MountainCar": EnvNotes(("Accelerate left", "Don't accelerate", "Accelerate right"),
                            ("position", "velocity"), {}, "reach the flag at position 0.5"),
    "Acrobot": EnvNotes(("Torque -1", "Torque 0", "Torque +1"),
                        ("cos(theta1)", "sin(theta1)", "cos(theta2)", "sin(theta2)",
                         "theta1 velocity", "theta2 velocity"), {}, ""),
    "Pendulum": EnvNotes((), ("cos(theta)", "sin(theta)", "angular velocity"), {}, ""),
}

_SGR = re.compile(r"\x1b\[([0-9;]*)m")
_ACTION_LINE = re.compile(r"^\s*\(([\w ]+)\)\s*$")
_COLORS = ("black", "red", "green", "yellow", "blue", "magenta", "cyan", "white")


@functools.lru_cache(maxsize=256)
def _styles(codes: str, current: frozenset[str]) -> frozenset[str]:
    out = set(current)
    for c in (codes or "0").split(";"):
        n = int(c) if c.isdigit() else 0
        if n == 0:
            out.clear()
        elif n == 1:
            out.add("bold")
        elif 30 <= n <= 37 or 90 <= n <= 97:
            out = {s for s in out if not s.startswith("fg:")} | {f"fg:{_COLORS[n % 10]}"}
        elif 40 <= n <= 47 or 100 <= n <= 107:
            out = {s for s in out if not s.startswith("bg:")} | {f"bg:{_COLORS[n % 10]}"}
    return frozenset(out)


def _mark(style: frozenset[str], marks: dict[str, str], seg: str, row: int, col: int) -> str:
    name = next((marks[s] for s in sorted(style) if s in marks), None)
    if name is None:  # a colour this driver has no word for: name the colour
        name = " ".join(s[3:] + (" background" if s.startswith("bg:") else "")
                        for s in sorted(style) if s != "bold") or "bold"
    return f"{name}: row {row}, col {col} (on {seg!r})"


def ansi_to_text(rendered: str, marks: dict[str, str] | None = None) -> str:
    """An ANSI rendering as plain text: escapes removed, and what the colours
    marked said in words ("you: row 1, col 2 (on 'F')"), rows and columns
    counted from 0 at the top left of the map as printed."""
    marks = marks or {}
    rows: list[str] = []
    found: list[str] = []
    last_action = None
    for line in rendered.split("\n"):
        plain, col, style, pos = [], 0, frozenset(), 0
        for sgr in _SGR.finditer(line + "\x1b[0m") if "\x1b" in line else ():
            seg = line[pos:sgr.start()]
            if style and seg:
                found.append(_mark(style, marks, seg, len(rows), col))
            plain.append(seg)
            col += len(seg)
            style = _styles(sgr.group(1), style)
            pos = sgr.end()
        text = "".join(plain) if plain else line
        m = _ACTION_LINE.match(text)
        if m:
            last_action = m.group(1)
        elif text.strip():
            rows.append(text.rstrip())
    out = rows + found
    if last_action:
        out.append(f"last action: {last_action}")
    return "\n".join(out)


def _num(x: Any) -> str:
    if isinstance(x, (float, np.floating)):
        return f"{float(x):.4g}"
    return str(x.item() if isinstance(x, np.generic) else x)


def describe_value(obs: Any, space: spaces.Space | None, labels: tuple[str, ...] = ()) -> str:
    """A compact description of an observation (no rendering available)."""
    if isinstance(obs, np.ndarray):
        if obs.size > 32:
            return (f"array {obs.shape} {obs.dtype.name}, min {_num(obs.min())}, "
                    f"max {_num(obs.max())}, mean {_num(obs.mean())}")
        flat = [_num(v) for v in obs.ravel()]
        if labels and len(labels) == len(flat):
            return ", ".join(f"{n} {v}" for n, v in zip(labels, flat))
        return "[" + ", ".join(flat) + "]" if obs.ndim <= 1 else str(obs.round(4).tolist())
    if isinstance(obs, tuple):
        subs = space.spaces if isinstance(space, spaces.Tuple) else [None] * len(obs)
        parts = [describe_value(v, s) for v, s in zip(obs, subs)]
        if labels and len(labels) == len(parts):
            return ", ".join(f"{n} {v}" for n, v in zip(labels, parts))
        return "(" + ", ".join(parts) + ")"
    if isinstance(obs, dict):
        subs = space.spaces if isinstance(space, spaces.Dict) else {}
        return "{" + ", ".join(f"{k}: {describe_value(v, subs.get(k))}"
                               for k, v in obs.items()) + "}"
    return _num(obs)


# --- the table of open environments -------------------------------------------------
@dataclass
class EnvRecord:
    handle: int
    owner: int  # pid
    env_id: str
    env: gym.Env
    notes: EnvNotes
    ansi: bool  # made with render_mode="ansi": env.render() is the text
    holder: Any = None  # an object with .closed (a connection): the env dies with it
    last_obs: Any = None
    steps: int = 0
    episodes: int = 0
    cost: float = 0.0  # seconds per reset/step, a moving average: where to run it
    busy: bool = False  # a call is running on it (maybe in a worker thread)
    doomed: bool = False  # closed while busy: close when that call ends

    def text(self, obs: Any) -> str:
        if self.ansi:
            try:
                rendered = self.env.render()
            except Exception:  # a rendering bug must not cost the step
                rendered = None
            if isinstance(rendered, str):
                return ansi_to_text(rendered, self.notes.marks) + \
                    f"\nobservation: {describe_value(obs, self.env.observation_space)}"
        return "observation: " + describe_value(obs, self.env.observation_space, self.notes.labels)

    def _timed(self, t0: float) -> None:
        dt = time.perf_counter() - t0
        self.cost = dt if self.cost == 0.0 else 0.8 * self.cost + 0.2 * dt

    def reset(self, seed: int | None, options: dict | None) -> dict:
        t0 = time.perf_counter()
        try:
            obs, info = self.env.reset(seed=seed, options=options)
        except (TypeError, ValueError) as e:
            raise _einval(f"{self.env_id}: reset(seed={seed!r}, options=...) failed: {e}") \
                from None
        except Exception as e:
            raise SyscallError("EIO", f"{self.env_id}: reset failed: {type(e).__name__}: {e}") \
                from None
        self._timed(t0)
        self.last_obs, self.episodes = obs, self.episodes + 1
        text = self.text(obs)
        if self.notes.actions:
            text += "\nactions: " + ", ".join(f"{i} {a}" for i, a in enumerate(self.notes.actions))
        if self.notes.about:
            text += "\n" + self.notes.about
        return {"observation": value_to_wire(obs), "info": value_to_wire(info), "text": text}

    def step(self, action: Any) -> dict:
        space = self.env.action_space
        try:
            a = value_from_wire(action, space)
            ok = space.contains(a)
        except SyscallError as e:
            raise _einval(f"action {action!r:.100} is not in the action space {space}: "
                          f"{e.message}") from None
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise _einval(f"action {action!r:.100} is not in the action space {space}")
        t0 = time.perf_counter()
        try:
            obs, reward, terminated, truncated, info = self.env.step(a)
        except gym.error.ResetNeeded:
            raise _einval(f"{self.env_id}: reset the environment before stepping it") from None
        except Exception as e:
            raise SyscallError("EIO", f"{self.env_id}: step failed: {type(e).__name__}: {e}") \
                from None
        self._timed(t0)
        self.last_obs, self.steps = obs, self.steps + 1
        return {"observation": value_to_wire(obs), "reward": value_to_wire(reward),
                "terminated": bool(terminated), "truncated": bool(truncated),
                "info": value_to_wire(info), "text": self.text(obs)}

    def render(self) -> str:
        if self.ansi:
            try:
                rendered = self.env.render()
            except gym.error.ResetNeeded:
                raise _einval(f"{self.env_id}: reset the environment before rendering it") \
                    from None
            if isinstance(rendered, str):
                return ansi_to_text(rendered, self.notes.marks)
        if self.last_obs is None:
            raise _einval(f"{self.env_id}: reset the environment before rendering it")
        return self.text(self.last_obs)

    def close(self) -> None:
        try:
            self.env.close()
        except Exception:
            pass  # closing is best effort: the record is gone either way


def _plain(v: Any, depth: int = 0) -> bool:
    """Plain data only: what msgpack decodes, nothing that could run code."""
    if depth > 16:
        return False
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    if isinstance(v, (list, tuple)):
        return all(_plain(x, depth + 1) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain(x, depth + 1) for k, x in v.items())
    return False


@dataclass(frozen=True)
class MakeRequest:
    """A checked env.make: a registered id and plain keyword arguments."""

    env_id: str
    kwargs: dict


class EnvTable:
    """Every open environment of this boot, by handle; each belongs to one pid.

    Handles are never reused in a boot. A handle of another process is EBADF,
    with the same message as one that never existed.
    """

    def __init__(self, max_per_owner: int = MAX_PER_OWNER, stats: Counter | None = None):
        self.max_per_owner = max_per_owner
        self.stats: Counter = stats if stats is not None else Counter()
        self._envs: dict[int, EnvRecord] = {}
        self._next = 1

    def __len__(self) -> int:
        return len(self._envs)

    # --- make -------------------------------------------------------------------
    @staticmethod
    def list(prefix: str | None = None) -> list[str]:
        return sorted(i for i in gym.envs.registry if not prefix or i.startswith(prefix))

    def prepare(self, owner: int, env_id: str, kwargs: dict | None) -> MakeRequest:
        """Check an env.make before anything is built: ENOENT, EINVAL, EMFILE."""
        if env_id not in gym.envs.registry:
            # Only registered ids: "module:Env" ids would import a module the client named.
            close = difflib.get_close_matches(env_id, list(gym.envs.registry), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see env.list()"
            raise SyscallError("ENOENT", f"no environment {env_id!r}{hint}")
        kwargs = dict(kwargs or {})
        if not _plain(kwargs):
            raise _einval("env.make kwargs must be plain data (maps with string keys, lists, "
                          "strings, numbers, booleans, nil)")
        if len(msgpack.packb(kwargs)) > MAX_KWARGS_BYTES:
            raise _einval(f"env.make kwargs over {MAX_KWARGS_BYTES} bytes")
        if kwargs.pop("render_mode", None) not in (None, "ansi"):
            raise _einval("render_mode is the kernel's choice: text ('ansi') where the "
                          "environment has it, else a description of the observation")
        mes = kwargs.get("max_episode_steps")
        if mes is not None and (isinstance(mes, bool) or not isinstance(mes, int)):
            raise _einval("max_episode_steps must be an integer")
        self.sweep()
        self._room(owner)
        return MakeRequest(env_id, kwargs)

    @staticmethod
    def create(req: MakeRequest) -> gym.Env:
        """Build the environment (may be slow: imports, assets). Thread-safe.
        With text rendering ("ansi") wherever the environment has it."""
        kwargs = dict(req.kwargs)
        try:
            if "ansi" in _render_modes(req.env_id):
                kwargs["render_mode"] = "ansi"
            return gym.make(req.env_id, **kwargs)
        except gym.error.DependencyNotInstalled as e:
            raise SyscallError("EIO", f"{req.env_id} needs packages that are not installed: "
                                      f"{e}") from None
        except ImportError as e:
            raise SyscallError("EIO", f"{req.env_id} cannot be loaded here: {e}") from None
        except (TypeError, ValueError, AssertionError, KeyError, gym.error.Error) as e:
            raise _einval(f"{req.env_id}{_show(req.kwargs)}: {type(e).__name__}: {e}") from None
        except Exception as e:
            raise SyscallError("EIO", f"{req.env_id}: make failed: {type(e).__name__}: {e}") \
                from None

    def add(self, owner: int, req: MakeRequest, env: gym.Env, holder: Any = None) -> dict:
        """Give a built environment a handle; returns env.make's answer."""
        try:
            self._room(owner)  # others may have been made while this one was built
        except SyscallError:
            env.close()
            raise
        name = env.spec.name if env.spec is not None else req.env_id
        ansi = env.render_mode == "ansi"
        rec = EnvRecord(self._next, owner, req.env_id, env, NOTES.get(name, EnvNotes()),
                        ansi, holder)
        self._next += 1
        self._envs[rec.handle] = rec
        self.stats["env.made"] += 1
        return {"handle": rec.handle,
                "observation_space": space_to_wire(env.observation_space),
                "action_space": space_to_wire(env.action_space),
                "spec": _spec_to_wire(env.spec),
                "render_mode": env.render_mode,
                "render_fps": env.metadata.get("render_fps"),
                "actions": list(rec.notes.actions) or None,
                "about": rec.notes.about or None}

    def make(self, owner: int, env_id: str, kwargs: dict | None = None,
             holder: Any = None) -> dict:
        req = self.prepare(owner, env_id, kwargs)
        return self.add(owner, req, self.create(req), holder)

    def _room(self, owner: int) -> None:
        n = sum(1 for r in self._envs.values() if r.owner == owner)
        if n >= self.max_per_owner:
            raise SyscallError("EMFILE", f"pid {owner} has {n} environments open "
                                         f"(at most {self.max_per_owner}): env.close some")

    # --- use ------------------------------------------------------------------------
    def get(self, owner: int, handle: int) -> EnvRecord:
        rec = self._envs.get(handle)
        if rec is None or rec.owner != owner:
            raise SyscallError("EBADF", f"no environment with handle {handle} in pid {owner}")
        return rec

    @contextmanager
    def use(self, owner: int, handle: int) -> Iterator[EnvRecord]:
        """Hold an environment for one call (which may run in a worker thread):
        a second call meanwhile is EBUSY; a close meanwhile waits for its end."""
        rec = self.get(owner, handle)
        if rec.busy:
            raise SyscallError("EBUSY", f"environment {handle} is in the middle of another call")
        rec.busy = True
        try:
            yield rec
        finally:
            rec.busy = False
            if rec.doomed:
                rec.close()

    def reset(self, owner: int, handle: int, seed: int | None = None,
              options: dict | None = None) -> dict:
        with self.use(owner, handle) as rec:
            return rec.reset(seed, options)

    def step(self, owner: int, handle: int, action: Any) -> dict:
        with self.use(owner, handle) as rec:
            return rec.step(action)

    def render(self, owner: int, handle: int) -> str:
        with self.use(owner, handle) as rec:
            return rec.render()

    # --- close ----------------------------------------------------------------------
    def _drop(self, rec: EnvRecord) -> None:
        self._envs.pop(rec.handle, None)
        self.stats["env.closed"] += 1
        if rec.busy:
            rec.doomed = True
        else:
            rec.close()

    def close(self, owner: int, handle: int) -> None:
        self._drop(self.get(owner, handle))

    def close_owner(self, pid: int) -> int:
        """The process is gone: close its environments. Returns how many."""
        mine = [r for r in self._envs.values() if r.owner == pid]
        for rec in mine:
            self._drop(rec)
        return len(mine)

    def sweep(self) -> int:
        """Close environments whose holder (a connection) has closed."""
        gone = [r for r in self._envs.values()
                if r.holder is not None and getattr(r.holder, "closed", False)]
        for rec in gone:
            self._drop(rec)
        return len(gone)


def _render_modes(env_id: str) -> list[str]:
    """The render modes an id declares, read from its class without building it."""
    spec = gym.envs.registry[env_id]
    creator = gym.envs.registration.load_env_creator(spec.entry_point) \
        if isinstance(spec.entry_point, str) else spec.entry_point
    return list(getattr(creator, "metadata", {}).get("render_modes", []) or [])


def _spec_to_wire(spec: Any) -> dict | None:
    if spec is None:
        return None
    return {"id": spec.id, "max_episode_steps": spec.max_episode_steps,
            "reward_threshold": spec.reward_threshold,
            "nondeterministic": bool(spec.nondeterministic),
            "kwargs": {k: v for k, v in spec.kwargs.items() if _plain(v)}}


def _show(kwargs: dict) -> str:
    shown = {k: v for k, v in kwargs.items() if k != "render_mode"}
    return f"({', '.join(f'{k}={v!r:.40}' for k, v in shown.items())})" if shown else ""
