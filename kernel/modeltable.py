"""The models a kernel has loaded: name -> device and run queue, the one place.

Each loaded model is a `Loaded` entry: its ``device`` (vocabulary, chat
template, embeddings; None for a model served elsewhere) and its ``queue``
(a Scheduler over the device, a DeviceSet of Ray device actors, or for
``kind = "openai"`` a RemoteQueue), all under the kernel's one policy. The
table resolves names (aliases included; ENOENT lists the known ones and says
how to add one), knows the kernel's default model (the first loaded), loads
and unloads at run time (each queue's loop in the kernel's nursery), keeps
local GGUF loads within the memory budget, and fans process events out to
every queue.

Local queues take tokens (``generate(owner, tokens, params, ...)``); remote
ones take text: ``generate(owner, prompt, messages, params, *, nice,
on_token)`` and ``embed(owner, texts, *, nice)``. kernel/sysllm.py branches
on `Loaded.local`.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from llmagentos.drivers.models import LOCAL_KINDS, ModelRegistry, ModelSpec, open_device
from llmagentos.syscalls.bootopts import KernelConfig
from llmagentos.syscalls.errno import SyscallError

from .scheduler import Scheduler

log = logging.getLogger("llmagentos.kernel")

MB = 1 << 20


@dataclass(eq=False)
class Loaded:
    """One loaded model."""

    name: str
    kind: str
    device: Any  # None for a model served elsewhere (kind "openai")
    queue: Any
    size: int = 0  # bytes counted against the memory budget
    scope: trio.CancelScope | None = None  # its queue's loop, once started
    stopped: trio.Event = field(default_factory=trio.Event)

    @property
    def local(self) -> bool:
        return self.device is not None

    @property
    def n_ctx(self) -> int | None:
        return self.device.n_ctx if self.device is not None else None

    def summary(self) -> dict[str, Any]:
        st = self.queue.stats()
        return {k: st.get(k) for k in ("running", "queue_length", "tokens_per_s", "steps",
                                       "tokens_out", "n_slots", "utilization")}


def open_queue(spec: ModelSpec, policy: str) -> Any:
    """The run queue of a model served elsewhere (kind "openai"): its RemoteQueue."""
    if spec.kind != "openai":
        raise SyscallError("EINVAL", f"model {spec.name!r} is of kind {spec.kind!r}, which "
                                     "this kernel has no backend for")
    from .scheduler.remote import RemoteQueue  # loads the HTTP client: only when needed

    return RemoteQueue.from_entry(spec.options, policy, name=spec.name)


def memory_budget(config: KernelConfig) -> int:
    """--model-memory, or half the machine's RAM."""
    if config.model_memory:
        return config.model_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError):
        return 8 << 30


class ModelTable:
    """name -> Loaded; see the module doc."""

    def __init__(self, registry: ModelRegistry, config: KernelConfig) -> None:
        self.registry = registry
        self.config = config
        self.loaded: dict[str, Loaded] = {}
        self.default: str | None = None  # the kernel's default model: the first loaded
        self.budget = memory_budget(config)
        self.nursery: trio.Nursery | None = None  # set by start: loads from then on run there
        self._lock = trio.Lock()  # one load or unload at a time (the budget is checked whole)

    # --- names ----------------------------------------------------------------------------
    def get(self, name: str | None = None) -> Loaded:
        """The loaded entry ``name`` stands for (None: the default model)."""
        if name is None:
            if self.default is None:
                raise SyscallError("ENOSYS", "this kernel has no model loaded (booted with "
                                             "--model none); llm.load one")
            return self.loaded[self.default]
        if not isinstance(name, str) or not name:
            raise SyscallError("EINVAL", "a model name must be a non-empty string")
        key = self.registry.canonical(name)  # ENOENT naming the known ones
        entry = self.loaded.get(key)
        if entry is None:
            raise SyscallError("ENOENT", f"model {key!r} is known but not loaded (loaded: "
                                         f"{', '.join(self.loaded) or 'none'}); llm.load it, "
                                         f"or boot with --model {key}")
        return entry

    def for_process(self, pcb: Any, name: str | None = None) -> Loaded:
        """The model a call of ``pcb`` uses: the one it names, else the process's own."""
        return self.get(name if name is not None else pcb.model)

    def check(self, name: str | None) -> str | None:
        """A process's default model as given to proc.spawn/attach: its loaded name."""
        return None if name is None else self.get(name).name

    # --- loading --------------------------------------------------------------------------
    async def load(self, name: str) -> Loaded:
        """Load a registered model (an alias is its model): open its device in a worker
        thread, make its run queue, and once the kernel runs, start its loop."""
        if not isinstance(name, str) or not name:  # "" would be the registry's default
            raise SyscallError("EINVAL", "a model name must be a non-empty string")
        async with self._lock:
            spec = self.registry.resolve(name) if not name.endswith(".gguf") else None
            key = spec.name if spec is not None else name
            if key in self.loaded:
                return self.loaded[key]
            entry = await trio.to_thread.run_sync(self._open, name, spec)
            self.loaded[entry.name] = entry
            if self.default is None:
                self.default = entry.name
            if self.nursery is not None:
                await self.nursery.start(self._run, entry)
            return entry

    def _open(self, name: str, spec: ModelSpec | None) -> Loaded:
        cfg = self.config
        if spec is not None and spec.kind not in LOCAL_KINDS:
            return Loaded(spec.name, spec.kind, None, open_queue(spec, cfg.policy))
        size = self._check_budget(name, spec)
        log.info("loading model %s", name)
        device = open_device(spec or name, registry=self.registry, n_seq_max=cfg.slots,
                             n_ctx=cfg.n_ctx, n_threads=cfg.threads,
                             n_gpu_layers=cfg.n_gpu_layers, kv_memory=cfg.kv_memory)
        key = spec.name if spec is not None else device.model_name
        queue = Scheduler(device, cfg.policy, cfg.quantum, cfg.snapshot_ram,
                          str(cfg.state_dir / "kv" / key))
        cell_bytes = getattr(device, "kv_cell_bytes", None)
        if size and cell_bytes:  # what it took, not the estimate: the pool's real size
            size = self._file_bytes(name, spec) + device.kv_size * cell_bytes
        log.info("model %s loaded: up to %d sequences of %d tokens sharing a KV pool of %d "
                 "cells%s", key, device.n_seq_max, device.n_ctx, device.kv_size,
                 f" ({device.kv_size * cell_bytes / 2**20:.0f} MiB, {cell_bytes} bytes a cell)"
                 if cell_bytes else "")
        return Loaded(key, spec.kind if spec is not None else "gguf", device, queue, size)

    @staticmethod
    def _file_bytes(name: str, spec: ModelSpec | None) -> int:
        return (spec.gguf_path() if spec is not None else Path(name)).stat().st_size

    def _check_budget(self, name: str, spec: ModelSpec | None) -> int:
        """ENOMEM when this load would take the loaded local models past the budget."""
        if spec is not None and spec.kind != "gguf":
            return 0
        path = spec.gguf_path() if spec is not None else Path(name)
        cfg = self.config
        # The KV pool: --kv-memory, else every slot at full length with --slots, else
        # (a share of the free memory, known once loaded) at least one slot's.
        if cfg.kv_memory is not None:
            need = path.stat().st_size + cfg.kv_memory
        else:
            need = estimate_bytes(path, (cfg.slots or 1) * cfg.n_ctx)
        used = sum(e.size for e in self.loaded.values())
        if used + need > self.budget:
            held = ", ".join(f"{e.name} {e.size / MB:.0f} MB" for e in self.loaded.values()
                             if e.size) or "nothing"
            raise SyscallError("ENOMEM", f"loading {name!r} needs about {need / MB:.0f} MB "
                                         f"(GGUF file + KV cache); loaded: {held}; that is past "
                                         f"the model memory budget of {self.budget / MB:.0f} MB "
                                         "(--model-memory)")
        return need

    async def unload(self, name: str) -> None:
        """Stop the model's loop (its requests fail with ECANCELED naming the model)
        and free its device. The kernel's default model stays."""
        async with self._lock:
            entry = self.get(name)
            if entry.name == self.default:
                raise SyscallError("EBUSY", f"model {entry.name!r} is the kernel's default "
                                            "model (context memory and processes without a "
                                            "model use it); it stays loaded")
            del self.loaded[entry.name]
            if hasattr(entry.queue, "stop_error"):
                entry.queue.stop_error = SyscallError(
                    "ECANCELED", f"model {entry.name!r} was unloaded")
            if entry.scope is not None:
                entry.scope.cancel()
                await entry.stopped.wait()
            if entry.device is not None:
                await trio.to_thread.run_sync(entry.device.close)
            log.info("model %s unloaded", entry.name)

    async def start(self, nursery: trio.Nursery) -> None:
        """Start every loaded queue's loop in the kernel's nursery; later loads start theirs."""
        self.nursery = nursery
        for entry in list(self.loaded.values()):
            await nursery.start(self._run, entry)

    async def _run(self, entry: Loaded, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with trio.CancelScope() as entry.scope:
                await entry.queue.run(task_status=task_status)
        finally:
            entry.stopped.set()

    def add(self, entry: Loaded) -> None:
        """A model loaded elsewhere (the Ray cluster's DeviceSet)."""
        self.loaded[entry.name] = entry
        if self.default is None:
            self.default = entry.name

    # --- process events, to every queue ---------------------------------------------------
    def stop(self, owner: int) -> None:
        for e in list(self.loaded.values()):
            e.queue.stop(owner)

    def cont(self, owner: int) -> None:
        for e in list(self.loaded.values()):
            e.queue.cont(owner)

    def set_nice(self, owner: int, nice: int) -> None:
        for e in list(self.loaded.values()):
            e.queue.set_nice(owner, nice)

    async def release(self, owner: int) -> None:
        for e in list(self.loaded.values()):
            await e.queue.release(owner)

    # --- what llm.models shows ------------------------------------------------------------
    def rows(self) -> list[dict[str, Any]]:
        """Every known model: loaded or not, with the loaded ones' device summary.
        Only what the registry says publicly (no paths, no key variables)."""
        out = []
        for m in self.registry.describe():
            entry = self.loaded.get(m["name"])
            row = {"name": m["name"], "kind": m["kind"], "loaded": entry is not None,
                   "n_ctx": (entry.n_ctx if entry is not None else
                             None if m["kind"] not in LOCAL_KINDS else m["n_ctx"]),
                   "aliases": m["aliases"], "default": m["name"] == self.default,
                   "description": m["description"]}
            if entry is not None:
                row["device"] = entry.summary()
            out.append(row)
        # models loaded from a path have no registry row
        out += [{"name": e.name, "kind": e.kind, "loaded": True, "n_ctx": e.n_ctx,
                 "aliases": [], "default": e.name == self.default, "description": "",
                 "device": e.summary()}
                for e in self.loaded.values() if e.name not in self.registry]
        out.sort(key=lambda r: (not r["default"], not r["loaded"], r["name"]))
        return out

    def close(self) -> None:
        for e in self.loaded.values():
            if e.device is not None:
                e.device.close()
        self.loaded.clear()


# --- the estimate a local load is budgeted by ---------------------------------------------
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
                 11: "q", 12: "d"}
F16_BYTES = 2


def estimate_bytes(path: Path, kv_cells: int) -> int:
    """The GGUF file's size plus an F16 KV cache of ``kv_cells`` cells, from the
    model's header (layers x KV heads x head size); the file alone if the header
    does not say."""
    size = path.stat().st_size
    try:
        meta = gguf_metadata(path)
    except (OSError, ValueError, struct.error):
        return size
    arch = meta.get("general.architecture")
    layers = meta.get(f"{arch}.block_count")
    heads = meta.get(f"{arch}.attention.head_count")
    kv_heads = meta.get(f"{arch}.attention.head_count_kv", heads)
    embd = meta.get(f"{arch}.embedding_length")
    if not all(isinstance(v, int) for v in (layers, heads, kv_heads, embd)) or not heads:
        return size
    k_len = meta.get(f"{arch}.attention.key_length", embd // heads)
    v_len = meta.get(f"{arch}.attention.value_length", embd // heads)
    return size + kv_cells * layers * kv_heads * (k_len + v_len) * F16_BYTES


def gguf_metadata(path: Path) -> dict[str, Any]:
    """The scalar key/values of a GGUF header (arrays skipped)."""
    out: dict[str, Any] = {}
    with path.open("rb") as f:
        def read(fmt: str) -> Any:
            n = struct.calcsize("<" + fmt)
            data = f.read(n)
            if len(data) != n:
                raise ValueError("truncated GGUF header")
            return struct.unpack("<" + fmt, data)[0]

        def string() -> str:
            n = read("Q")
            if n > 1 << 20:
                raise ValueError("GGUF string too long")
            return f.read(n).decode("utf-8", "replace")

        def value(t: int) -> Any:
            if t in _GGUF_SCALARS:
                return read(_GGUF_SCALARS[t])
            if t == 8:
                return string()
            if t == 9:
                et, n = read("I"), read("Q")
                if et in _GGUF_SCALARS:
                    f.seek(n * struct.calcsize("<" + _GGUF_SCALARS[et]), 1)
                else:
                    for _ in range(n):
                        value(et)
                return None
            raise ValueError(f"unknown GGUF value type {t}")

        if f.read(4) != b"GGUF":
            raise ValueError("not a GGUF file")
        read("I")  # version
        read("Q")  # tensors
        for _ in range(read("Q")):
            key = string()
            out[key] = value(read("I"))
    return out
