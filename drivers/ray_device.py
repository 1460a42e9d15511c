"""A compute device on a Ray cluster: the same llama.cpp ``Device`` inside a Ray actor.

``DeviceActor`` hosts one ``Device`` (its own model, context and slots) in a
Ray worker process on whatever node Ray places it. ``RemoteDevice`` is the
kernel-side proxy with the synchronous methods the Scheduler uses, so a
Scheduler drives a remote device exactly as it drives a local one.

What cannot cross processes stays in the actor: a request's decoding state
(``Generation``: sampler chain, grammar, ctypes) lives there, keyed by a
request id; the kernel holds a ``RemoteGeneration`` mirror (prompt, output
tokens, text, finish reason) that the events of each tick keep true.

One round trip per tick: ``RemoteDevice.tick(ops, plan)`` ships the whole list
of planned operations (drivers/device.py's typed ops, as plain data: see
``op_to_wire``) plus the step to the actor, which turns them back into typed
ops and runs them with ``run_tick`` like any device. It gets back their
results, the step's events and what changed in each slot's resident tokens.
The kernel keeps those tokens mirrored so that planning (``slot_tokens``, on
the trio thread) never waits on the network. Saved KV state travels to the
kernel's snapshot store: a preempted sequence moves only by its saved state.

Faults: a call that finds the actor dead (``RayError``) marks the device dead,
forgets the mirror and the actor-side requests, and reports EIO for the tick
(the Scheduler fails the requests in it). Ray restarts the actor
(``max_restarts``); ``probe()`` notices it is back. A request that lived on
the lost actor is rebuilt there from its context (prompt + output so far).

Ray is optional: this module imports ``ray`` lazily, in the functions that
need it, so importing it without ray installed is harmless.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from llmagentos.drivers.device import (
    Attach,
    Copy,
    Detach,
    DeviceFullError,
    Op,
    Prepare,
    Release,
    Restore,
    Save,
    StepResult,
    check_prompt,
    common_prefix,
    run_tick,
)
from llmagentos.drivers.sampling import SamplingParams
from llmagentos.syscalls.errno import SyscallError

log = logging.getLogger(__name__)

_EMPTY_STEP = StepResult([], {}, 0, 0, 0.0)


def require_ray() -> Any:
    """The ray module, or a clear error saying how to get it."""
    try:
        import ray
    except ImportError:
        raise SyscallError("ENOSYS", "Ray is not installed: pip install 'llmagentos[ray]'") \
            from None
    return ray


# -- inside the actor ----------------------------------------------------------------------

class DeviceActor:
    """Runs in a Ray worker: one Device, the requests attached to it, a token diff per slot."""

    def __init__(self, model: str, kwargs: dict[str, Any],
                 models_config: str | None = None) -> None:
        from llmagentos.drivers.models import ModelRegistry, open_device

        try:  # Ray starts workers niced; the device is the node's main work, not a chore
            os.setpriority(os.PRIO_PROCESS, 0, 0)
        except OSError:  # not permitted: keep Ray's niceness
            pass
        registry = ModelRegistry(models_config) if models_config else None
        self.device = open_device(model, registry=registry, **kwargs)
        self.gens: dict[int, Any] = {}
        self._reported: list[list[int]] = [[] for _ in range(self.device.n_seq_max)]
        self._lock = threading.Lock()

    def info(self) -> dict[str, Any]:
        import ray

        d = self.device
        ctx = ray.get_runtime_context()
        return {"model_name": d.model_name, "n_seq_max": d.n_seq_max, "n_ctx": d.n_ctx,
                "n_vocab": d.n_vocab, "chat_stop": d.chat_stop, "node_id": ctx.get_node_id(),
                "node_ip": ray.util.get_node_ip_address(), "pid": os.getpid()}

    def ping(self) -> tuple[int, str, str]:
        """Who answers: (pid, node id, node address); a restart may have moved it."""
        import ray

        return os.getpid(), ray.get_runtime_context().get_node_id(), \
            ray.util.get_node_ip_address()

    def tick(self, closed: list[int], new: dict[int, tuple], wire: list[tuple],
             plan: list[int]) -> tuple[list[Any], StepResult, dict, list[tuple], tuple | None,
                                       int | None]:
        """Run the ops (in wire form) then one step; never raises (what ran before a
        failure is reported with it). Last: the KV pool's free cells after it."""
        with self._lock:
            d = self.device
            for gid in closed:
                gen = self.gens.pop(gid, None)
                if gen is not None:
                    gen.close()
            try:
                for gid, (prompt, params) in new.items():
                    gen = d.generation(prompt, params)
                    gen.rid = gid
                    self.gens[gid] = gen
            except Exception as exc:
                return [], _EMPTY_STEP, {}, self._diff(), _error_to_wire(exc), self._kv_free()
            results, step, exc = run_tick(d, (op_from_wire(w, self.gens) for w in wire), plan)
            finished = {}
            for ev in step.events:
                gen = d.attached(ev.slot)
                if ev.finished and gen is not None:
                    finished[ev.slot] = (gen.text, gen.reason)
            error = None if exc is None else _error_to_wire(exc)
            return results, step, finished, self._diff(), error, self._kv_free()

    def _kv_free(self) -> int | None:
        d = self.device
        return d.kv_size - d.kv_used() if hasattr(d, "kv_used") else None

    def _diff(self) -> list[tuple[int, int, list[int]]]:
        """(slot, kept, appended) for every slot whose resident tokens changed."""
        out = []
        for s, old in enumerate(self._reported):
            cur = self.device._slots[s].tokens
            if cur == old:
                continue
            if len(cur) >= len(old) and cur[:len(old)] == old:
                keep = len(old)
            else:
                keep = common_prefix(old, cur)
            out.append((s, keep, cur[keep:]))
            self._reported[s] = list(cur)
        return out

    def embed(self, texts: list[str]) -> list[list[float]]:
        with self._lock:
            return self.device.embed(texts)


# -- in the kernel -------------------------------------------------------------------------

class RemoteGeneration:
    """The kernel's mirror of a request whose decoding state lives in the actor."""

    def __init__(self, device: RemoteDevice, gid: int, prompt_tokens: Sequence[int],
                 params: SamplingParams) -> None:
        self._device = device
        self.id = gid
        self.prompt_tokens = list(prompt_tokens)
        self.params = params
        self.tokens: list[int] = []
        self.text = ""
        self.finished = False
        self.reason: str | None = None

    @property
    def context(self) -> list[int]:
        return self.prompt_tokens + self.tokens

    def close(self) -> None:
        self._device._closed.append(self.id)


class RemoteDevice:
    """Proxy of a DeviceActor with the Device methods the Scheduler calls (synchronous:
    the Scheduler calls them from its worker thread, except ``generation`` and
    ``slot_tokens`` which answer locally)."""

    def __init__(self, actor: Any, info: dict[str, Any], *, validator: Any = None,
                 index: int = 0) -> None:
        self.actor = actor
        self.index = index
        self.validator = validator  # a local Device (vocab): checks grammars without a trip
        self.model_name = info["model_name"]
        self.n_seq_max = info["n_seq_max"]
        self.n_ctx = info["n_ctx"]
        self.n_vocab = info["n_vocab"]
        self.chat_stop = list(info["chat_stop"])
        self.node_id = info["node_id"]
        self.node_ip = info["node_ip"]
        self.actor_pid = info["pid"]
        self.nodes_lost: list[str] = []  # nodes the actor lived on before a restart moved it
        self.alive = True
        self.failures = 0
        self.last_error: str | None = None
        self._ids = itertools.count(1)
        self._known: set[int] = set()      # request ids the actor holds
        self._gens: dict[int, RemoteGeneration] = {}
        self._closed: list[int] = []
        self._slots: list[list[int]] = [[] for _ in range(self.n_seq_max)]
        self._attached: list[RemoteGeneration | None] = [None] * self.n_seq_max
        self._kv_free_cells: int | None = None  # as the actor reported after its last tick

    # -- answered locally ------------------------------------------------------------------

    def generation(self, prompt_tokens: Sequence[int],
                   params: SamplingParams | dict | None) -> RemoteGeneration:
        if not isinstance(params, SamplingParams):
            params = SamplingParams.from_dict(params)
        prompt = list(prompt_tokens)
        check_prompt(prompt, self.n_ctx, self.n_vocab)
        if self.validator is not None:  # a bad grammar is EINVAL now, not EIO in a tick
            self.validator.generation(prompt, params).close()
        gen = RemoteGeneration(self, next(self._ids), prompt, params)
        self._gens[gen.id] = gen
        return gen

    def slot_tokens(self, slot: int) -> list[int]:
        return list(self._slots[slot])

    def kv_free(self) -> int | None:
        """Free cells of the actor's KV pool after its last tick (None: unknown)."""
        return self._kv_free_cells

    # -- one round trip ----------------------------------------------------------------------

    def tick(self, ops: Sequence[Op], plan: list[int]) -> tuple[list[Any], StepResult,
                                                                 Exception | None]:
        """The Scheduler's whole tick (its ops, then one step) in one actor call."""
        ray = require_ray()
        new: dict[int, tuple] = {}
        for op in ops:
            if isinstance(op, Attach) and op.generation.id not in self._known:
                new[op.generation.id] = self._rebuild(op.generation)
        wire = [op_to_wire(op) for op in ops]
        closed, self._closed = self._closed, []
        for gid in closed:
            self._gens.pop(gid, None)
        try:
            results, step, finished, diff, error, self._kv_free_cells = ray.get(
                self.actor.tick.remote([g for g in closed if g in self._known], new, wire, plan))
        except ray.exceptions.RayError as exc:
            self._lost(exc)
            return [], _EMPTY_STEP, SyscallError(
                "EIO", f"device {self.index} on node {self.node_ip} failed: "
                       f"{type(exc).__name__}")
        self._known.difference_update(closed)
        self._known.update(new)
        self._mirror(ops[:len(results)], step, finished, diff)
        return results, step, None if error is None else _error_from_wire(error)

    def _rebuild(self, gen: RemoteGeneration) -> tuple:
        """What the actor needs to make the request's decoding state: on a restarted
        actor, the output so far becomes part of the prompt."""
        if not gen.tokens:
            return gen.prompt_tokens, gen.params
        left = max(0, gen.params.max_tokens - len(gen.tokens))
        return gen.context, replace(gen.params, max_tokens=left)

    def _mirror(self, ops: Sequence[Op], step: StepResult, finished: dict, diff: list) -> None:
        for op in ops:
            match op:
                case Attach(slot=slot, generation=gen):
                    self._attached[slot] = gen
                case Detach(slot=slot) | Release(slot=slot):
                    self._attached[slot] = None
        for slot, keep, tail in diff:
            self._slots[slot] = self._slots[slot][:keep] + list(tail)
        for ev in step.events:
            gen = self._attached[ev.slot]
            if gen is None:
                continue
            if ev.token is not None and not (ev.finished and ev.reason == "eog"):
                gen.tokens.append(ev.token)
            gen.text += ev.piece
            if ev.finished:
                gen.finished = True
                gen.reason = finished.get(ev.slot, (None, ev.reason))[1] or ev.reason

    def _lost(self, exc: BaseException) -> None:
        log.error("device actor %d on %s failed: %r", self.index, self.node_ip, exc)
        self.alive = False
        self.failures += 1
        self.last_error = type(exc).__name__
        self._known.clear()
        self._kv_free_cells = None
        self._slots = [[] for _ in range(self.n_seq_max)]
        self._attached = [None] * self.n_seq_max

    def probe(self, timeout: float = 5.0) -> bool:
        """Is the actor answering (again)? Blocking: call from a worker thread."""
        ray = require_ray()
        try:
            pid, node_id, node_ip = ray.get(self.actor.ping.remote(), timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            return False
        except ray.exceptions.RayError as exc:
            if self.alive:
                self._lost(exc)
            return False
        if pid != self.actor_pid:  # restarted: a fresh device with empty slots
            if self.alive:
                self._lost(RuntimeError("restarted"))
            self.actor_pid = pid
        if node_id != self.node_id:  # re-placed: Ray restarted it on another node
            log.warning("device actor %d moved from node %s to %s", self.index, self.node_ip,
                        node_ip)
            self.nodes_lost.append(self.node_id)
            self.node_id, self.node_ip = node_id, node_ip
        self.alive = True
        return True

    # -- the rest of the Device API, one op per call ------------------------------------------

    def _one(self, op: Op) -> Any:
        results, _, error = self.tick([op], [])
        if error is not None:
            raise error
        return results[0]

    def release(self, slot: int) -> None:
        self._one(Release(slot))

    def save(self, slot: int) -> bytearray:
        return self._one(Save(slot, None))[1]

    def copy_prefix(self, src: int, dst: int, n: int) -> int:
        return self._one(Copy(src, dst, n))

    def prepare(self, slot: int, prompt_tokens: Sequence[int]) -> int:
        return self._one(Prepare(slot, list(prompt_tokens)))

    def attach(self, slot: int, gen: RemoteGeneration) -> None:
        self._one(Attach(slot, gen))

    def detach(self, slot: int) -> None:
        self._one(Detach(slot))

    def step(self, plan: Sequence[int]) -> StepResult:
        _, step, error = self.tick([], list(plan))
        if error is not None:
            raise error
        return step

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        ray = require_ray()
        return ray.get(self.actor.embed.remote(list(texts)))

    def describe(self) -> dict[str, Any]:
        return {"kind": "ray", "node_id": self.node_id, "node": self.node_ip,
                "actor_pid": self.actor_pid, "alive": self.alive, "failures": self.failures,
                "last_error": self.last_error, "nodes_lost": list(self.nodes_lost)}

    def close(self) -> None:
        ray = require_ray()
        try:
            ray.kill(self.actor, no_restart=True)
        except Exception:  # already gone
            pass


def start_device_actors(n: int, model: str, kwargs: dict[str, Any], *,
                        models_config: str | None = None, num_cpus: float = 1,
                        num_gpus: float = 0, max_restarts: int = 3,
                        timeout: float = 300) -> list[tuple[Any, dict[str, Any]]]:
    """Place ``n`` DeviceActors on the cluster and wait until each has loaded its model.
    Blocking: call from a worker thread."""
    ray = require_ray()
    cls = ray.remote(DeviceActor).options(
        num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts,
        max_concurrency=2)  # ping/embed may answer while a tick runs (the lock orders them)
    actors = [cls.remote(model, kwargs, models_config) for _ in range(n)]
    try:
        infos = ray.get([a.info.remote() for a in actors], timeout=timeout)
    except Exception:
        for a in actors:
            ray.kill(a, no_restart=True)
        raise
    return list(zip(actors, infos))


# -- the wire: typed ops as plain data, and back --------------------------------------------

class _ShippedSnapshot:
    """A saved state that crossed the wire; ``data`` None: the kernel could not read it."""

    def __init__(self, tokens: list[int], data: bytes | bytearray | None) -> None:
        self.tokens = tokens
        self.data = data

    def load(self) -> bytes | bytearray:
        if self.data is None:  # apply() then reports 0: the request prefills instead
            raise OSError("the saved state could not be read in the kernel")
        return self.data


def op_to_wire(op: Op) -> tuple:
    """A tick operation as plain data for the actor: a saved state travels loaded
    (the kernel's spill files are not on the actor's node), a request by its id."""
    match op:
        case Save(slot=slot):
            return ("save", slot)
        case Restore(slot=slot, snapshot=snap):
            try:
                data = snap.load()
            except OSError:
                data = None
            return ("restore", slot, data, list(snap.tokens))
        case Copy(src=src, dst=dst, n=n):
            return ("copy", src, dst, n)
        case Prepare(slot=slot, tokens=tokens):
            return ("prepare", slot, list(tokens))
        case Attach(slot=slot, generation=gen):
            return ("attach", slot, gen.id)
        case Detach(slot=slot):
            return ("detach", slot)
        case Release(slot=slot):
            return ("release", slot)
    raise TypeError(f"not an operation a remote device runs: {op!r}")


def op_from_wire(item: tuple, gens: dict[int, Any]) -> Op:
    """The typed operation again, in the actor; ``gens``: its requests by id."""
    match item:
        case ("save", slot):
            return Save(slot, None)
        case ("restore", slot, data, tokens):
            return Restore(slot, _ShippedSnapshot(tokens, data))
        case ("copy", src, dst, n):
            return Copy(src, dst, n)
        case ("prepare", slot, tokens):
            return Prepare(slot, tokens)
        case ("attach", slot, gid):
            return Attach(slot, gens[gid])
        case ("detach", slot):
            return Detach(slot)
        case ("release", slot):
            return Release(slot)
    raise TypeError(f"not a device operation on the wire: {item!r}")


def _error_to_wire(exc: Exception) -> tuple:
    """A tick's failure as plain data (never raised through Ray)."""
    if isinstance(exc, DeviceFullError):
        return ("DeviceFullError", exc.name, exc.message)
    if isinstance(exc, SyscallError):
        return ("SyscallError", exc.name, exc.message)
    return ("Exception", "EIO", repr(exc))  # reported as EIO by the kernel


def _error_from_wire(error: tuple) -> SyscallError:
    kind, name, message = error
    return DeviceFullError(message) if kind == "DeviceFullError" else SyscallError(name, message)
