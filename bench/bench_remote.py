"""The remote run queue's overhead: N concurrent callers through a RemoteQueue
(kernel/scheduler/remote.py, max_concurrency N) against N direct concurrent
httpx clients of the same server, TOKENS greedy tokens each.

The server is llama-cpp-python's own OpenAI-compatible server on the packaged
Gemma-3-270M (bench/openai_server.py). It runs one request at a time, so both
sides queue there: the ratio (queue tok/s ÷ direct tok/s) measures what the
queue, the backend's request building and its SSE parsing cost, not batching.
Both sides stream (as the kernel does for a caller that streams) and the sides
alternate, direct / queue, for --rounds rounds; tokens are the pieces counted.

    python bench/bench_remote.py [--rounds 2] [--clients 16] [--tokens 48]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).parent))

from openai_server import OpenAIServer  # noqa: E402

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args()
    rates: dict[str, list[float]] = {"direct": [], "queue": []}
    with OpenAIServer() as srv:
        trio.run(direct, srv.base_url, 1, args.tokens)  # warm-up: the first decodes are slow
        for r in range(args.rounds):
            for side, fn in (("direct", direct), ("queue", queued)):
                n, wall = trio.run(fn, srv.base_url, args.clients, args.tokens)
                rates[side].append(n / wall)
                print(f"round {r + 1} {side:6s}: {n} tokens in {wall:6.2f} s = "
                      f"{n / wall:6.1f} tok/s", flush=True)
    d, q = statistics.median(rates["direct"]), statistics.median(rates["queue"])
    print(f"median: direct {d:.1f} tok/s, queue {q:.1f} tok/s; ratio queue/direct = "
          f"{q / d:.3f}")


if __name__ == "__main__":
    main()
