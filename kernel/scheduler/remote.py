"""The run queue of a remote model (an OpenAI-compatible server): who may have a
request in flight, and in what order the rest wait.

A remote backend has no slots or KV state of ours, only a bound on requests in
flight (``max_concurrency``). ``RemoteQueue`` keeps the Scheduler's API where it
applies (generate, embed, stop, cont, release, set_nice, usage, stats, run),
so the kernel drives a remote model as it drives a local one:

* At most ``max_concurrency`` requests are in flight; the others wait in a
  queue ordered by the kernel's policy objects (policy.py). An owner is
  charged its requests' seconds in flight as device time, with the policy's
  weighting, so nice and fairness hold across processes as on the local
  device (charged when an attempt ends: the queue cannot see inside a request).
* The HTTP request runs in the caller's task, inside a cancel scope of its own:
  cancelling the caller, STOP and release close the connection at once.
* STOP cancels the owner's in-flight requests and holds them and its queued
  ones; CONT queues them again. A stopped request's partial output is
  **discarded** and the request is re-issued whole (the API can neither pause a
  server's generation nor resume a chat mid-message). A caller that streams is
  not shown again the characters it already got: with greedy or seeded
  sampling the re-issued text repeats them exactly; otherwise what it was shown
  may differ from the result's text.
* ``run`` is the admission task (start it in the kernel's nursery); when it
  ends, what is queued or in flight gets ESHUTDOWN and the HTTP client closes.
"""

from __future__ import annotations

import inspect
import itertools
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from llmagentos.drivers.openai_backend import (
    Completion,
    OnPiece,
    OpenAIBackend,
    OpenAIConfig,
    sampling_body,
)
from llmagentos.drivers.sampling import SamplingParams
from llmagentos.syscalls.errno import SyscallError

from .policy import policy_named
from .requests import EmbedResult, Owner, Owners, Result, StatsWindow

STATS_WINDOW = 10.0
T = TypeVar("T")


@dataclass(eq=False)
class RemoteRequest:
    id: int
    owner: Owner
    seq: int                         # queue position key (fifo/rr); kept across a STOP
    submitted: float
    wake: trio.Event = field(default_factory=trio.Event)  # admitted, or failed (``error``)
    state: str = "queued"            # queued | running | done
    error: Exception | None = None   # what the caller gets instead of a result
    scope: trio.CancelScope | None = None  # of the attempt in flight
    wait_since: float | None = None  # runnable and waiting since
    queue_wait: float = 0.0
    device_time: float = 0.0         # seconds in flight, every attempt
    attempts: int = 0


class RemoteQueue:
    """The run queue of one remote backend. See the module doc."""

    def __init__(self, backend: OpenAIBackend, policy: str = "fair", *,
                 name: str | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._policy = policy_named(policy)
        self.backend = backend
        self.policy = policy
        self.model_name = name or backend.config.model
        self.max_concurrency = backend.config.max_concurrency
        self.n_slots = self.max_concurrency  # its "slots": requests in flight at once
        self.clock = clock
        self._owners = Owners(self._queued_owners)
        self._queue: list[RemoteRequest] = []
        self._running: set[RemoteRequest] = set()
        self._ids = itertools.count(1)
        self._seqs = itertools.count()
        self._wake = trio.Event()
        self._loop = False
        self._started = clock()
        self._window = StatsWindow(STATS_WINDOW)
        # Counters for stats().
        self.completed = 0
        self.failed = 0
        self.reissued = 0
        self.tokens_in = 0
        self.tokens_out = 0
        self.device_time = 0.0

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any], policy: str = "fair", *,
                   name: str | None = None) -> RemoteQueue:
        """From a registry entry of ``kind = "openai"`` (drivers/openai_backend.py)."""
        return cls(OpenAIBackend(OpenAIConfig.from_entry(entry, f"model {name!r}")), policy,
                   name=name)

    # -- the API the kernel uses ---------------------------------------------------------

    async def generate(
        self,
        owner: int,
        prompt: str | None = None,
        messages: list | None = None,
        params: SamplingParams | dict | None = None,
        *,
        nice: int | None = None,
        on_token: OnPiece = None,
    ) -> Result:
        """One completion (``prompt``) or chat answer (``messages``) for process
        ``owner``; returns when it finishes. ``on_token`` gets each new piece of text
        (a plain function is called as the piece arrives and must not block; a
        coroutine function is awaited); what it raises ends the request and is
        raised here. ``Result.tokens`` is empty: a remote server gives text only."""
        params = SamplingParams.from_dict(params)
        sampling_body(params)  # EINVAL for what the API cannot express, before queueing
        if (prompt is None) == (messages is None):
            raise SyscallError("EINVAL", "give exactly one of prompt or messages")
        sent_box = [0]  # characters handed to on_token, over every attempt

        async def attempt(req: RemoteRequest) -> Completion:
            if on_token is None:
                return await self.backend.generate(prompt, messages, params)
            seen = [0]
            if _is_async(on_token):
                async def on_piece(piece: str) -> None:
                    new = _unseen(seen, piece, sent_box)
                    if new:
                        await on_token(new)
            else:
                def on_piece(piece: str) -> None:
                    new = _unseen(seen, piece, sent_box)
                    if new:
                        on_token(new)
            return await self.backend.generate(prompt, messages, params, on_piece=on_piece)

        out, req = await self._submit(owner, nice, attempt)
        usage = {"prompt_tokens": out.prompt_tokens, "cached_tokens": 0,
                 "completion_tokens": out.completion_tokens, "device_time": req.device_time,
                 "queue_wait": req.queue_wait}
        self._account(req, out.prompt_tokens, out.completion_tokens)
        return Result(out.text, [], out.finish_reason, usage)

    async def embed(self, owner: int, texts: list[str], *, nice: int | None = None
                    ) -> EmbedResult:
        """Embed ``texts`` for ``owner`` through the same queue."""
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise SyscallError("EINVAL", "texts must be a non-empty list of strings")
        out, req = await self._submit(owner, nice, lambda req: self.backend.embed(texts))
        usage = {"prompt_tokens": out.prompt_tokens, "cached_tokens": 0,
                 "completion_tokens": 0, "device_time": req.device_time,
                 "queue_wait": req.queue_wait}
        self._account(req, out.prompt_tokens, 0)
        return EmbedResult(out.vectors, usage)

    def stop(self, owner: int) -> None:
        """SIGSTOP: cancel the owner's requests in flight and hold them, and its
        queued ones, until CONT (see the module doc: the partial output is discarded)."""
        acct = self._owners.of(owner)
        if acct.stopped:
            return
        self._owners.note_floor()
        acct.stopped = True
        now = self.clock()
        for req in self._queue:
            if req.owner is acct and req.wait_since is not None:
                req.queue_wait += now - req.wait_since
                req.wait_since = None
        for req in [r for r in self._running if r.owner is acct]:
            self._running.discard(req)
            req.state = "queued"
            self._queue.append(req)
            self.reissued += 1
            if req.scope is not None:
                req.scope.cancel()
        self._kick()

    def cont(self, owner: int) -> None:
        """SIGCONT: the owner's requests queue again (a stopped one is re-issued)."""
        acct = self._owners.of(owner)
        if not acct.stopped:
            return
        acct.stopped = False
        now = self.clock()
        for req in self._queue:
            if req.owner is acct:
                req.wait_since = now
        self._owners.activate(acct)
        self._kick()

    async def release(self, owner: int) -> None:
        """The process is gone: its requests in flight are cancelled (their connections
        closed) and every caller of its gets ECANCELED."""
        self._owners.note_floor()
        acct = self._owners.pop(owner, None)
        if acct is not None:
            err = SyscallError("ECANCELED", f"process {owner} released")
            for req in [r for r in self._queue + list(self._running) if r.owner is acct]:
                self._fail(req, err)
        self._kick()
        await trio.lowlevel.checkpoint()

    def set_nice(self, owner: int, nice: int) -> None:
        self._owners.set_nice(owner, nice)

    def usage(self, owner: int) -> dict[str, Any]:
        return self._owners.usage(owner)

    def load(self) -> int:
        """Requests queued or in flight."""
        return len(self._queue) + len(self._running)

    def holds(self, owner: int) -> bool:
        return any(r.owner.pid == owner for r in self._queue + list(self._running))

    def stats(self) -> dict[str, Any]:
        now = self.clock()
        span = min(STATS_WINDOW, max(now - self._started, 1e-9))
        w_tokens, w_busy, _, _ = self._window.totals(now)
        return {
            "kind": self.backend.kind,
            "model": self.model_name,
            "policy": self.policy,
            "max_concurrency": self.max_concurrency,
            "n_slots": self.max_concurrency,
            "running": len(self._running),
            "queue_length": len(self._queue),
            "completed": self.completed,
            "failed": self.failed,
            "reissued": self.reissued,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "device_time": self.device_time,
            "tokens_per_s": w_tokens / span,
            "utilization": min(1.0, w_busy / span / self.max_concurrency),
            "backend": self.backend.describe(),
            "owners": self._owners.rows(),
        }

    # -- admission -----------------------------------------------------------------------

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """The admission task. Start it in the kernel's nursery (``nursery.start``)."""
        if self._loop:
            raise RuntimeError("RemoteQueue.run() is already running")
        self._loop = True
        try:
            task_status.started()
            while True:
                self._admit()
                await self._wake.wait()
                self._wake = trio.Event()
        finally:
            self._loop = False
            err = SyscallError("ESHUTDOWN", "the remote run queue stopped")
            for req in self._queue + list(self._running):
                self._fail(req, err)
            await self.backend.aclose()

    def _admit(self) -> None:
        """Fill the free places in flight, in policy order."""
        free = self.max_concurrency - len(self._running)
        if free <= 0:
            return
        waiting = sorted((r for r in self._queue if not r.owner.stopped), key=self._policy.key)
        now = self.clock()
        for req in waiting[:free]:
            self._queue.remove(req)
            self._running.add(req)
            req.state = "running"
            if req.wait_since is not None:
                req.queue_wait += now - req.wait_since
                req.wait_since = None
            req.wake.set()

    async def _submit(self, owner: int, nice: int | None,
                      call: Callable[[RemoteRequest], Awaitable[T]]) -> tuple[T, RemoteRequest]:
        """Queue a request, and run ``call`` in this task each time it is admitted,
        until an attempt finishes; cancelling this task withdraws it."""
        acct = self._owners.of(owner)
        if nice is not None:
            self.set_nice(owner, nice)
        now = self.clock()
        req = RemoteRequest(next(self._ids), acct, next(self._seqs), now)
        req.wait_since = None if acct.stopped else now
        acct.usage.requests += 1
        self._owners.activate(acct)
        self._queue.append(req)
        self._kick()
        try:
            while True:
                await req.wake.wait()
                req.wake = trio.Event()
                if req.error is not None:
                    raise req.error
                req.attempts += 1
                t0 = self.clock()
                try:
                    with trio.CancelScope() as req.scope:
                        out = await call(req)
                        return out, req
                finally:
                    req.scope = None
                    self._charge(req, self.clock() - t0)
                # Cancelled by STOP (queued again) or release (``error`` set): go round.
        except SyscallError:
            self.failed += 1
            raise
        finally:
            self._retire(req)

    def _fail(self, req: RemoteRequest, error: Exception) -> None:
        """Its caller gets ``error``; an attempt in flight is cancelled."""
        if req.state == "done" or req.error is not None:
            return
        req.error = error
        if req.scope is not None:
            req.scope.cancel()
        req.wake.set()

    def _retire(self, req: RemoteRequest) -> None:
        """The request leaves the queue for good."""
        if req.state == "done":
            return
        self._owners.note_floor()
        if req in self._queue:
            self._queue.remove(req)
        self._running.discard(req)
        req.state = "done"
        self._kick()

    def _charge(self, req: RemoteRequest, seconds: float) -> None:
        acct = req.owner
        req.device_time += seconds
        acct.usage.device_time += seconds
        self.device_time += seconds
        self._policy.charge(acct, seconds)

    def _account(self, req: RemoteRequest, n_in: int, n_out: int) -> None:
        u = req.owner.usage
        u.tokens_in += n_in
        u.tokens_out += n_out
        u.queue_wait += req.queue_wait
        self.tokens_in += n_in
        self.tokens_out += n_out
        self.completed += 1
        self._window.add(self.clock(), n_out, req.device_time, 1)

    def _queued_owners(self) -> set[Owner]:
        return {r.owner for r in self._queue} | {r.owner for r in self._running}

    def _kick(self) -> None:
        self._wake.set()


def _is_async(fn: Any) -> bool:
    return inspect.iscoroutinefunction(fn)


def _unseen(seen: list[int], piece: str, sent: list[int]) -> str:
    """The part of ``piece`` not yet shown to the caller: ``seen[0]`` counts this
    attempt's characters, ``sent[0]`` those shown over every attempt."""
    start = seen[0]
    seen[0] += len(piece)
    if seen[0] <= sent[0]:
        return ""
    new = piece[max(0, sent[0] - start):]
    sent[0] = seen[0]
    return new
