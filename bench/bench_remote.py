"""A remote model's overhead: N agents through the kernel (syscalls to a kernel
whose registry has the server as a `kind = "openai"` model) and N callers of a
bare RemoteQueue (kernel/scheduler/remote.py), each against N direct concurrent
httpx clients of the same server, TOKENS greedy tokens each (goal: kernel ÷
direct >= 0.95).

The server is llama-cpp-python's own OpenAI-compatible server on the packaged
Gemma-3-270M (bench/openai_server.py). It runs one request at a time, so both
sides queue there: the ratio (queue tok/s ÷ direct tok/s) measures what the
queue, the backend's request building and its SSE parsing cost, not batching.
Both sides stream (as the kernel does for a caller that streams) and the sides
alternate, direct / queue / kernel, for --rounds rounds; tokens are the pieces
counted (the kernel's: completion tokens as the server reports them).

    python bench/bench_remote.py [--rounds 2] [--clients 16] [--tokens 48]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).parent))

from _kernel import BenchKernel  # noqa: E402
from openai_server import OpenAIServer  # noqa: E402

import llmagentos  # noqa: E402
from llmagentos.drivers.openai_backend import OpenAIBackend, OpenAIConfig  # noqa: E402
from llmagentos.kernel.scheduler.remote import RemoteQueue  # noqa: E402

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a steam engine works, step by step.",
    "Describe a busy market in a small coastal town at dawn.",
    "Tell the history of the printing press and why it mattered.",
]


async def direct(url: str, clients: int, tokens: int) -> tuple[int, float]:
    """N plain httpx clients, each streaming one completion."""
    counts = [0] * clients

    async def one(i: int) -> None:
        body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": tokens,
                "temperature": 0.0, "stream": True}
        async with httpx.AsyncClient(timeout=600) as client:
            async with client.stream("POST", url + "/v1/completions", json=body) as resp:
                async for line in resp.aiter_lines():
                    if line.startswith("data:") and line[5:].strip() != "[DONE]":
                        choice = json.loads(line[5:])["choices"][0]
                        counts[i] += bool(choice.get("text"))

    t0 = time.perf_counter()
    async with trio.open_nursery() as n:
        for i in range(clients):
            n.start_soon(one, i)
    return sum(counts), time.perf_counter() - t0


async def queued(url: str, clients: int, tokens: int) -> tuple[int, float]:
    """N callers (one process each) through one RemoteQueue."""
    backend = OpenAIBackend(OpenAIConfig(url, "m", max_concurrency=clients, timeout=600))
    queue = RemoteQueue(backend, "fair")
    counts = [0] * clients

    async def one(i: int) -> None:
        res = await queue.generate(i + 1, PROMPTS[i % len(PROMPTS)], None,
                                   {"temperature": 0.0, "max_tokens": tokens},
                                   on_token=lambda piece: None)
        counts[i] = res.usage["completion_tokens"]

    async with trio.open_nursery() as outer:
        await outer.start(queue.run)
        t0 = time.perf_counter()
        async with trio.open_nursery() as n:
            for i in range(clients):
                n.start_soon(one, i)
        wall = time.perf_counter() - t0
        outer.cancel_scope.cancel()
    return sum(counts), wall


async def through_kernel(k: BenchKernel, clients: int, tokens: int) -> tuple[int, float]:
    """N agent processes (attached connections) streaming llm.generate on the remote
    model: syscalls, the kernel's run queue, the backend, and back."""
    async with contextlib.AsyncExitStack() as stack:
        init = await stack.enter_async_context(llmagentos.aconnect(run_dir=k.run_dir))
        kids = [await init.proc.attach(f"agent{i}") for i in range(clients)]
        conns = [await stack.enter_async_context(
            llmagentos.aconnect(run_dir=k.run_dir, token=kid["token"])) for kid in kids]
        counts = [0] * clients

        async def one(i: int) -> None:
            res = await conns[i].call(
                "llm.generate", PROMPTS[i % len(PROMPTS)], None,
                {"model": "far", "temperature": 0.0, "max_tokens": tokens}, True, False,
                on_notify=lambda method, args: None)
            counts[i] = res["usage"]["completion_tokens"]

        t0 = time.perf_counter()
        async with trio.open_nursery() as n:
            for i in range(clients):
                n.start_soon(one, i)
        wall = time.perf_counter() - t0
        for kid in kids:
            await init.proc.kill(kid["pid"], "SIGKILL")
    return sum(counts), wall


def run(argv: list[str] | None = None) -> dict:
    """For `make bench` (bench/run_all.py): one round of the defaults."""
    return measure(1, 16, 48)


def measure(rounds: int, clients: int, tokens: int, log=lambda line: None) -> dict:
    rates: dict[str, list[float]] = {"direct": [], "queue": [], "kernel": []}
    with OpenAIServer() as srv, tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "models.toml"
        conf.write_text(f'[models.far]\nkind = "openai"\nbase_url = "{srv.base_url}"\n'
                        f'max_concurrency = {clients}\ntimeout = 600\n')
        with BenchKernel("--config", str(conf), "--model", "far") as k:
            trio.run(direct, srv.base_url, 1, tokens)  # warm-up: the first decodes are slow
            for r in range(rounds):
                for side, fn in (("direct", lambda: direct(srv.base_url, clients, tokens)),
                                 ("queue", lambda: queued(srv.base_url, clients, tokens)),
                                 ("kernel", lambda: through_kernel(k, clients, tokens))):
                    n, wall = trio.run(fn)
                    rates[side].append(n / wall)
                    log(f"round {r + 1} {side:6s}: {n} tokens in {wall:6.2f} s = "
                        f"{n / wall:6.1f} tok/s")
    med = {side: statistics.median(v) for side, v in rates.items()}
    return {"clients": clients, "tokens": tokens, "rounds": rounds, **med,
            "ratio_queue": med["queue"] / med["direct"],
            "ratio_kernel": med["kernel"] / med["direct"]}


def report(r: dict) -> str:
    return (f"== remote model (llama-cpp-python's server), {r['clients']} clients x "
            f"{r['tokens']} tokens, median of {r['rounds']} ==\n"
            f"  direct httpx clients:   {r['direct']:6.1f} tok/s\n"
            f"  bare RemoteQueue:       {r['queue']:6.1f} tok/s  ratio {r['ratio_queue']:.3f}\n"
            f"  agents through kernel:  {r['kernel']:6.1f} tok/s  ratio {r['ratio_kernel']:.3f} "
            f"(goal >= 0.95) {'PASS' if r['ratio_kernel'] >= 0.95 else 'FAIL'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args()
    print(report(measure(args.rounds, args.clients, args.tokens,
                         lambda line: print(line, flush=True))))


if __name__ == "__main__":
    main()
