"""The device contract: what the scheduler drives, and the operations it sends.

A compute device holds `n_seq_max` slots (sequences of one KV cache). The
scheduler plans a tick on the event loop, then hands the device a list of
typed operations and a plan (the slots to decode) in one call, on the
device's compute thread: the operations move state between slots (save,
restore, copy a shared prefix, prepare a prompt, attach a request's
generation) or give cells back, then `step(plan)` decodes one batch.
`apply` runs one operation and `run_tick` a whole tick: every device runs
its operations through them.

The KV cache is one pool of ``kv_size`` cells shared by every slot (a cell
holds one token of one or more sequences: a copied prefix shares its cells).
A device reports ``kv_used()`` (cells held) and ``exclusive_cells()`` (per
slot, the cells that releasing it would free), both kept by ``KvCells``; the
scheduler admits requests while the pool holds them (kernel/scheduler/).

Implementations: the llama.cpp device (drivers/llama/), the Ray
device actor's local proxy (drivers/ray_device.py, which runs a whole tick
in one round trip: `tick(ops, plan)`; its actor runs the same ops with
`run_tick`), and the simulated device (drivers/simdevice.py: deterministic
tokens, a fixed decode time). tests/test_device_contract.py runs one
conformance suite against the simulated and the real device.

A device that runs in this process names its ``compute_thread``: the one
thread its work runs on (llama.cpp's reasons are in drivers/llama/runtime.py).
The scheduler runs each whole tick there and awaits it with
``ComputeThread.run``: one hand-off to the thread and one back per tick.
"""

from __future__ import annotations

import itertools
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol, Sequence, runtime_checkable

import outcome
import trio

from llmagentos.syscalls.errno import SyscallError

FINISH_STOP = "stop"      # a stop string appeared
FINISH_LENGTH = "length"  # max_tokens, or the slot's context is full
FINISH_EOG = "eog"        # the model emitted an end-of-generation token


class DeviceFullError(SyscallError):
    """llama_decode found no room in the KV cache even for one token per slot."""

    def __init__(self, message: str) -> None:
        super().__init__("ENOSPC", message)


@dataclass
class TokenEvent:
    """What one step did for one slot whose logits were sampled."""

    slot: int
    token: int | None          # the sampled token; None when the step only finished the slot
    piece: str                 # text now safe to show (may be "" while UTF-8 or a stop is held)
    finished: bool = False
    reason: str | None = None  # FINISH_STOP | FINISH_LENGTH | FINISH_EOG when finished


@dataclass
class StepResult:
    events: list[TokenEvent]
    fed: dict[int, int]        # slot -> tokens decoded for it this step (prefill + 1 per decode)
    n_decode: int              # slots that got logits (one new token each)
    n_prefill: int             # prompt tokens decoded
    seconds: float             # wall time of the step (decode + sampling)
    retries: int = 0           # decode retries with a smaller batch (KV cache full)
    # slot -> seconds its own sampling took (grammar, penalties): a cost of that request
    # alone, where the decode's is shared by every slot in the batch.
    sample_seconds: dict[int, float] = field(default_factory=dict)


class KvCells:
    """Which cells of a unified KV cache each slot holds, without asking llama.cpp.

    A *run* is cells one slot appended in order; a slot holds a list of runs, each
    up to some length (``[run, n]``): a copied prefix holds the source's runs, a
    truncation shortens the last ones. Every holder of a run holds a prefix of it,
    so the cells in use are, per run, the most any slot holds of it: exactly the
    cells llama.cpp keeps (a cell is freed when no sequence is left in it).
    """

    def __init__(self, n_slots: int) -> None:
        self._slots: list[list[list[int]]] = [[] for _ in range(n_slots)]  # [[run, n], ...]
        self._held: dict[int, dict[int, int]] = {}  # run -> {slot: cells of it held}
        self._owner: dict[int, int] = {}            # run -> the slot that appends to it
        self._ids = itertools.count()
        self._used = 0  # sum over runs of the most any slot holds: kept as they change

    def used(self) -> int:
        return self._used  # asked after every tick: O(1), not O(runs)

    def exclusive(self) -> list[int]:
        """Per slot, the cells no other slot holds: what releasing it frees."""
        out = [0] * len(self._slots)
        for held in self._held.values():
            if len(held) == 1:
                (slot, n), = held.items()
                out[slot] += n
            else:
                top = sorted(held.values())
                if top[-1] > top[-2]:
                    out[max(held, key=held.__getitem__)] += top[-1] - top[-2]
        return out

    def append(self, slot: int, n: int) -> None:
        """``n`` new cells at the end of the slot."""
        if n <= 0:
            return
        runs = self._slots[slot]
        if runs:
            run, have = runs[-1]
            held = self._held[run]
            if self._owner[run] == slot and have >= max(held.values()):
                runs[-1][1] = held[slot] = have + n  # the tip of its own run grows
                self._used += n
                return
        run = next(self._ids)
        self._held[run] = {slot: n}
        self._owner[run] = slot
        runs.append([run, n])
        self._used += n

    def truncate(self, slot: int, n: int) -> None:
        """Keep the slot's first ``n`` cells."""
        runs, total = self._slots[slot], 0
        for i, (run, have) in enumerate(runs):
            if total + have > n:
                keep = n - total
                for run2, _ in runs[i + (1 if keep else 0):]:
                    self._drop(run2, slot)
                if keep:
                    held = self._held[run]
                    top = max(held.values())
                    runs[i][1] = held[slot] = keep
                    self._used += max(held.values()) - top
                del runs[i + (1 if keep else 0):]
                return
            total += have

    def copy(self, src: int, dst: int, n: int) -> None:
        """``dst`` (emptied) shares the first ``n`` cells of ``src``."""
        self.release(dst)
        total = 0
        for run, have in self._slots[src]:
            take = min(have, n - total)
            if take <= 0:
                break
            self._held[run][dst] = take  # no more than src holds: used() is unchanged
            self._slots[dst].append([run, take])
            total += take

    def release(self, slot: int) -> None:
        for run, _ in self._slots[slot]:
            self._drop(run, slot)
        self._slots[slot] = []

    def _drop(self, run: int, slot: int) -> None:
        held = self._held[run]
        top = max(held.values())
        del held[slot]
        self._used += max(held.values(), default=0) - top
        if not held:
            del self._held[run]
            del self._owner[run]


# --- operations of a tick, in the order the scheduler planned them -----------------------

@dataclass(frozen=True)
class Save:
    """Save a slot's KV state (a preemption, or a resident owner's state
    before its slot is reused); the result is (tokens, bytes)."""
    slot: int
    key: Any             # the scheduler's: where the state goes in its snapshot store
    pinned: bool = False  # the scheduler's: a preempted request's own state, kept longest


@dataclass(frozen=True)
class Restore:
    """Load a saved state into a slot; the result is the bytes loaded (0: it
    did not fit, prefill instead)."""
    slot: int
    snapshot: Any  # kernel.kvstore snapshot: .load() -> bytes, .tokens


@dataclass(frozen=True)
class Copy:
    """Share the first n tokens of src with dst (a common system prompt)."""
    src: int
    dst: int
    n: int


@dataclass(frozen=True)
class Prepare:
    """Make a slot hold a prompt: keep the longest cached prefix, queue the
    rest; the result is the number of tokens reused."""
    slot: int
    tokens: Sequence[int]
    request: Any = None  # the scheduler's own bookkeeping, opaque to the device


@dataclass(frozen=True)
class Attach:
    slot: int
    generation: Any


@dataclass(frozen=True)
class Detach:
    slot: int


@dataclass(frozen=True)
class Release:
    slot: int


@dataclass(frozen=True)
class EmbedRelease:
    """Give back the embedding cells an embed job's half-done text holds (it was
    withdrawn, or its owner is parked); the text starts over when stepped again."""
    job: Any


Op = Save | Restore | Copy | Prepare | Attach | Detach | Release | EmbedRelease


@runtime_checkable
class ComputeDevice(Protocol):
    """What every device gives the scheduler. Called on the compute thread
    only (llama.cpp state is not thread-safe), except the attributes."""

    n_seq_max: int  # slots
    n_ctx: int  # tokens per slot
    n_batch: int  # tokens one step may decode
    kv_size: int  # cells in the KV pool, shared by all slots

    def kv_used(self) -> int:
        """Cells of the KV pool held now."""

    def exclusive_cells(self) -> list[int]:
        """Per slot, the cells only it holds (what releasing it would free)."""

    def generation(self, prompt_tokens: Sequence[int], params: Any) -> Any:
        """A request's decoding state (sampler, output); EINVAL for an empty or
        out-of-vocabulary prompt, E2BIG past n_ctx."""

    def slot_tokens(self, slot: int) -> list[int]:
        """The tokens a slot's KV cache holds now."""

    def prepare(self, slot: int, prompt_tokens: Sequence[int]) -> int: ...

    def copy_prefix(self, src: int, dst: int, n: int) -> int: ...

    def save(self, slot: int) -> bytes | bytearray: ...

    def restore(self, slot: int, data: bytes | bytearray, tokens: Sequence[int]) -> int: ...

    def release(self, slot: int) -> None: ...

    def attach(self, slot: int, gen: Any) -> None: ...

    def detach(self, slot: int) -> Any: ...

    def step(self, plan: Sequence[int]) -> Any:
        """Decode one batch for the planned slots; a StepResult with the
        sampled token events and what each slot was fed."""

    # A device that computes embeddings also has embedding(texts),
    # embed_runnable(job), embed_step(job) and embed_release(job).


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two sequences share: what a slot can keep of a
    prompt, and what a saved state or another slot can give it."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def check_prompt(prompt_tokens: Sequence[int], n_ctx: int, n_vocab: int) -> None:
    """What every device refuses in a prompt: empty or out-of-vocabulary is
    EINVAL, one that leaves no room in a slot of ``n_ctx`` tokens is E2BIG."""
    if not prompt_tokens:
        raise SyscallError("EINVAL", "empty prompt")
    if len(prompt_tokens) >= n_ctx:
        raise SyscallError(
            "E2BIG", f"prompt of {len(prompt_tokens)} tokens does not fit a slot of {n_ctx}")
    bad = [t for t in prompt_tokens if not 0 <= t < n_vocab]
    if bad:
        raise SyscallError("EINVAL", f"token ids out of range 0..{n_vocab - 1}: {bad[:5]}")


def apply(device: ComputeDevice, op: Op) -> Any:
    """Run one operation on a device; its result (see each op)."""
    match op:
        case Save(slot=slot):
            return device.slot_tokens(slot), device.save(slot)
        case Restore(slot=slot, snapshot=snap):
            try:
                return device.restore(slot, snap.load(), snap.tokens)
            except OSError:  # a spilled snapshot that cannot be read: prefill instead
                return 0
        case Copy(src=src, dst=dst, n=n):
            return device.copy_prefix(src, dst, n)
        case Prepare(slot=slot, tokens=tokens):
            return device.prepare(slot, tokens)
        case Attach(slot=slot, generation=gen):
            device.attach(slot, gen)
        case Detach(slot=slot):
            device.detach(slot)
        case Release(slot=slot):
            device.release(slot)
        case EmbedRelease(job=job):
            device.embed_release(job)
        case _:
            raise TypeError(f"not a device operation: {op!r}")
    return None


def run_tick(device: ComputeDevice, ops: Iterable[Op],
             plan: Sequence[int]) -> tuple[list[Any], StepResult, Exception | None]:
    """One tick on the compute thread: the operations in order, then one step of
    ``plan`` (none when it is empty). Never raises: the results of the operations
    that ran before a failure come back with it, so bookkeeping stays true."""
    results: list[Any] = []
    try:
        for op in ops:
            results.append(apply(device, op))
        step = device.step(plan) if plan else StepResult([], {}, 0, 0, 0.0)
    except Exception as exc:
        return results, StepResult([], {}, 0, 0, 0.0), exc
    return results, step, None


class ComputeThread:
    """One thread that runs a device's work, started on first use.

    ``call`` blocks the calling thread until the work is done; ``run`` is its
    async form for trio, which parks the awaiting task and has the compute
    thread reschedule it through the trio token: no worker thread in between
    (trio.to_thread's would be a second hop per tick). A call made on the
    compute thread itself runs at once.
    """

    def __init__(self, name: str = "compute") -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def _submit(self, job: Callable[[], None]) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    # A daemon: an idle compute thread must not hold the process at exit.
                    self._thread = threading.Thread(target=self._serve, args=(self._jobs,),
                                                    name=self.name, daemon=True)
                    self._thread.start()
        self._jobs.put(job)

    @staticmethod
    def _serve(jobs: queue.SimpleQueue) -> None:
        while (job := jobs.get()) is not None:
            job()

    def on_thread(self) -> bool:
        t = self._thread
        return t is not None and t.ident == threading.get_ident()

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the compute thread and return its result (blocking)."""
        if self.on_thread():
            return fn(*args)
        fut: Future = Future()

        def job() -> None:
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:  # handed to the caller, raised there
                fut.set_exception(exc)

        self._submit(job)
        return fut.result()

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``call`` for a trio task. Not abandoned on cancel (the thread owns the
        device's state): a cancel takes effect once ``fn`` has returned."""
        return await self.submit(fn, *args).wait()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Pending:
        """Queue ``fn(*args)`` from a trio task without waiting: jobs run in the order
        submitted, so a device can have its next tick queued while one computes."""
        pending = Pending(trio.lowlevel.current_trio_token())

        def job() -> None:
            result = outcome.Value(None) if pending.revoked else outcome.capture(fn, *args)
            try:
                pending.token.run_sync_soon(pending.arrive, result)
            except trio.RunFinishedError:
                pass  # nobody waits any more

        self._submit(job)
        return pending

    def stop(self) -> None:
        """End the thread once the work queued so far is done; the next call starts
        a new one."""
        with self._lock:
            if self._thread is not None:
                self._jobs.put(None)
                self._jobs = queue.SimpleQueue()
                self._thread = None


class Pending:
    """A job submitted to a ComputeThread from trio; ``wait`` for its result."""

    __slots__ = ("token", "revoked", "_result", "_task")

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self.token = token
        self.revoked = False  # set before the job starts: it does not run (result None)
        self._result: outcome.Outcome | None = None
        self._task: Any = None

    def arrive(self, result: outcome.Outcome) -> None:
        """On the trio thread: the job is over."""
        self._result = result
        if self._task is not None:
            trio.lowlevel.reschedule(self._task, result)

    async def wait(self) -> Any:
        """The job's result (or what it raised). Not abandoned on cancel: a cancel
        takes effect once the job is over."""
        if self._result is not None:
            return self._result.unwrap()
        self._task = trio.lowlevel.current_task()
        return await trio.lowlevel.wait_task_rescheduled(
            lambda _raise_cancel: trio.lowlevel.Abort.FAILED)
