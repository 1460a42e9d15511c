"""The compute path on a GPU, run as is on a machine whose llama-cpp-python is
built for one (README: "On a GPU"):

    .venv/bin/python bench/bench_gpu.py            # the packaged Gemma-3-270M
    .venv/bin/python bench/bench_gpu.py --gguf M.gguf --tokens 256

One kernel booted with `--gpu-layers all` and otherwise the default options
(no --slots: admission by KV memory), against llama-cpp-python's own `Llama`
with every layer offloaded, on the same GGUF, one after the other (never both
at once):

- single stream: one agent process's `llm.generate` ÷ raw `create_completion`;
- 16 and 64 agent processes at once (started together by a barrier):
  aggregate tok/s ÷ raw single stream.

A small model decodes a token in 1–3 ms on a GPU, so this is where a fixed
cost per tick in the kernel would show (bench/bench_overhead.py measures that
cost alone). Without a GPU backend it says so and measures the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _kernel import BenchKernel, aggregate, run_agents  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def raw_single(gguf: str | None, tokens: int, runs: int) -> float:
    from reference import reference_llama

    from llmagentos.drivers.llama import compute_thread
    llm = reference_llama(1024, n_gpu_layers=-1, path=gguf)
    rates = []
    for _ in range(runs + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        out = compute_thread.call(lambda: llm.create_completion(
            PROMPT, max_tokens=tokens, temperature=0))
        rates.append(out["usage"]["completion_tokens"] / (time.perf_counter() - t0))
        compute_thread.call(llm.reset)
    compute_thread.call(llm.close)
    return statistics.median(rates[1:])


def kernel_runs(gguf: str | None, tokens: int, runs: int) -> dict:
    extra = ["--gpu-layers", "all"] + (["--model", gguf] if gguf else [])
    out = {}
    with BenchKernel(*extra) as k:
        c = k.client()
        greedy = {"max_tokens": tokens, "temperature": 0}
        run_agents(c, [([PROMPT], greedy)])  # warm-up
        singles = [aggregate(run_agents(c, [([PROMPT], greedy)])[0])["tok_s"]
                   for _ in range(runs)]
        out["single"] = statistics.median(singles)
        for n in (16, 64):
            jobs = [([f"{PROMPT} ({i})"], {"max_tokens": tokens, "temperature": 0.8,
                                           "seed": i, "stop": []}) for i in range(n)]
            res = run_agents(c, jobs)
            out[n] = aggregate([r for job in res for r in job])
        out["stats"] = c.sys.stats()["device"]
    return out


def run(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", help="a GGUF file (default: the packaged Gemma-3-270M)")
    ap.add_argument("--tokens", type=int, default=128, help="output tokens per request")
    ap.add_argument("--runs", type=int, default=3, help="single-stream runs (median)")
    a = ap.parse_args(argv if argv is not None else [])
    import llama_cpp
    gpu = bool(llama_cpp.llama_supports_gpu_offload())
    raw = raw_single(a.gguf, a.tokens, a.runs)
    k = kernel_runs(a.gguf, a.tokens, a.runs)
    return {"gpu": gpu, "raw": raw, **k}


def report(r: dict) -> str:
    lines = ["== the compute path on a GPU (bench/bench_gpu.py) =="]
    if not r["gpu"]:
        lines.append("  this llama-cpp-python has no GPU backend: the figures below are the CPU's")
    lines.append(f"  raw create_completion, every layer offloaded: {r['raw']:.1f} tok/s")
    lines.append(f"  kernel, one agent process: {r['single']:.1f} tok/s = "
                 f"{r['single'] / r['raw']:.2f}x raw (goal >= 0.95)")
    for n, goal in ((16, 2.3), (64, None)):
        m = r[n]
        g = f"goal >= {goal}" if goal else f"goal >= the 16 agents' {r[16]['tok_s']:.0f} tok/s"
        lines.append(f"  {n} agent processes: {m['tok_s']:.1f} tok/s aggregate = "
                     f"{m['tok_s'] / r['raw']:.2f}x raw ({g})")
    st = r["stats"]
    lines.append(f"  device: {st.get('n_slots')} sequences, batch {st.get('batch_size', 0):.1f} "
                 f"last 10 s, {st.get('preemptions')} preemptions")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(run(sys.argv[1:])))
