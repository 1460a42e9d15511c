"""The compute device through the kernel, against raw llama-cpp-python, in one run.

(1) single-stream tok/s through `llm.generate` ÷ raw `Llama.create_completion`
    tok/s, same prompt and length (goal >= 0.95);
(2) aggregate tok/s of 16 concurrent agent processes (real OS processes
    making syscalls, 16 slots) ÷ raw single-stream tok/s (goal >= 2.0);
(3) the default boot (no --slots: sequences bounded by the KV pool, not a slot
    count): 16 agent processes ÷ raw single stream (goal >= 2.3), and 64 agent
    processes at least as much aggregate as 16 (goal: ratio 64/16 >= 1.0);
(4) (1) again with a second, idle model loaded beside it (the same GGUF
    under another name, its own device and run queue): the single-stream
    figure should not change (ratio to (1) about 1.0).

The agent processes are spawned first and start their requests together, so
starting 64 Python programs on the same cores is not counted.

Raw first, then the kernel, never both at once: they share two cores. With
``--rounds N`` everything runs N times in turn, each ratio is taken within its
round, and the report gives the medians.

    python bench/bench_kernel_llm.py [--rounds 3]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _kernel import BenchKernel, aggregate, run_agents  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
TOKENS = 128
RUNS = 3


def raw_single() -> float:
    from reference import reference_llama

    from llmagentos.drivers.llama import compute_thread
    llm = reference_llama(1024)
    rates = []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        out = compute_thread.call(
            lambda: llm.create_completion(PROMPT, max_tokens=TOKENS, temperature=0))
        rates.append(out["usage"]["completion_tokens"] / (time.perf_counter() - t0))
        compute_thread.call(llm.reset)  # no prompt cache between runs: the same work each time
    compute_thread.call(llm.close)
    return statistics.median(rates)


def kernel_single(*extra: str) -> float:
    with BenchKernel("--slots", "1", "--n-ctx", "1024", *extra) as k:
        c = k.client()
        rates = []
        for i in range(RUNS):
            # a fresh process each run, so nothing of the prompt is resident
            pid = c.proc.spawn([sys.executable, "-c", textwrap.dedent(f"""
                import time, llmagentos
                c = llmagentos.connect()
                t0 = time.perf_counter()
                r = c.llm.generate({PROMPT!r}, None, {{"max_tokens": {TOKENS},
                                                      "temperature": 0}})
                print(r["usage"]["completion_tokens"] / (time.perf_counter() - t0))
            """)])
            c.proc.wait(pid, 300)
            rates.append(float(c.proc.logs(pid)["data"]))
        return statistics.median(rates)


def kernel_single_beside_a_second_model() -> float:
    from llmagentos.drivers.models import packaged_gemma_path

    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "kernel.toml"
        conf.write_text(f'load = ["gemma-b"]\n[models.gemma-b]\npath = "{packaged_gemma_path()}"\n')
        return kernel_single("--config", str(conf))


def kernel_processes(n: int = 16, tokens: int = 64, boot: tuple[str, ...] | None = None
                     ) -> dict:
    """``n`` agent processes generating at once; ``boot``: the kernel's flags
    (default: ``--slots n --n-ctx 256``; ``()`` is the default boot)."""
    flags = ("--slots", str(n), "--n-ctx", "256") if boot is None else boot
    with BenchKernel(*flags) as k:
        c = k.client()
        jobs = [(["Tell me about the sea."], {"max_tokens": tokens, "temperature": 0.8,
                                             "seed": i, "stop": []}) for i in range(n)]
        runs = [r for job in run_agents(c, jobs, timeout=900) for r in job]
        dev = c.sys.stats()["device"]
        return {**aggregate(runs), "batch": dev["batch_size"], "preemptions": dev["preemptions"],
                "n_slots": dev["n_slots"], "kv_pool": dev.get("kv_pool")}


def run_round() -> dict:
    raw = raw_single()
    single = kernel_single()
    beside = kernel_single_beside_a_second_model()
    multi = kernel_processes(16)
    default16 = kernel_processes(16, boot=())
    default64 = kernel_processes(64, boot=())
    return {"raw": raw, "kernel_single": single, "multi": multi,
            "ratio_single": single / raw, "ratio_multi": multi["tok_s"] / raw,
            "default16": default16, "default64": default64,
            "ratio_default16": default16["tok_s"] / raw,
            "ratio_64_16": default64["tok_s"] / default16["tok_s"],
            "kernel_single_two_models": beside, "ratio_two_models": beside / single}


def run(rounds: int = 1) -> dict:
    """``rounds`` rounds of every measurement in turn; each ratio is taken within a
    round (a few minutes apart, not the whole run), and the report gives their
    median: the speed of a shared machine drifts by ±15% between runs."""
    return {"rounds": [run_round() for _ in range(rounds)]}


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


RATIOS = {"ratio_single": 0.95, "ratio_multi": 2.0, "ratio_default16": 2.3, "ratio_64_16": 1.0}


def report(r: dict) -> None:
    rounds = r["rounds"]

    def med(key: str, sub: str | None = None) -> float:
        return statistics.median(x[key][sub] if sub else x[key] for x in rounds)

    def ratio(key: str) -> str:
        each = "" if len(rounds) == 1 else \
            f" [rounds {' '.join(f'{x[key]:.2f}' for x in rounds)}]"
        goal = RATIOS.get(key)
        return f"{med(key):.2f}{each}" + ("" if goal is None else
                                           f" (goal >= {goal}) {verdict(med(key) >= goal)}")

    n = len(rounds)
    print(f"== compute device through the kernel ({n} round{'s' * (n > 1)}; medians) ==")
    print(f"  raw llama-cpp-python create_completion: {med('raw'):.1f} tok/s (median of {RUNS} "
          "a round)")
    print(f"  kernel llm.generate, one process:       {med('kernel_single'):.1f} tok/s  "
          f"ratio {ratio('ratio_single')}")
    print(f"  the same, a second model loaded:        {med('kernel_single_two_models'):.1f} "
          f"tok/s  ratio to one model {ratio('ratio_two_models')} (goal about 1.0)")
    print(f"  16 agent processes at once (--slots 16): {med('multi', 'tok_s'):.1f} tok/s "
          f"aggregate  ratio to raw {ratio('ratio_multi')}")
    for k in (16, 64):
        d = [x[f"default{k}"] for x in rounds]
        pool = d[-1]["kv_pool"] or {}
        print(f"  default boot, {k} agent processes:     {med(f'default{k}', 'tok_s'):.1f} tok/s "
              f"aggregate ({d[-1]['tokens']} tokens, batch "
              f"{statistics.median(x['batch'] for x in d):.1f}, {d[-1]['n_slots']} slots, "
              f"KV pool {pool.get('cells')} cells, {sum(x['preemptions'] for x in d)} "
              "preemptions)")
    print(f"  default boot, 16 ÷ raw single stream:   {ratio('ratio_default16')}")
    print(f"  default boot, 64 ÷ 16 aggregate:        {ratio('ratio_64_16')}")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=1, help="rounds of every measurement")
    report(run(ap.parse_args().rounds))
