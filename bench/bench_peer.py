"""`make bench-peer`: the kernel beside llama.cpp's own `llama-server`, in one run.

The peer a user would pick instead of the kernel, on the same model (the
packaged Gemma-3-270M), the same prompts, 48 greedy tokens per request:

(1) 16 concurrent HTTP clients against `llama-server -np 16` (continuous
    batching) ÷ 16 agent processes through the kernel, each calling
    `llm.generate` once, started together (a barrier); aggregate tok/s from
    the first start to the last finish (goal: kernel ÷ peer >= 1.0);
(2) single stream: one client, one agent process, the prompts in turn
    (goal >= 1.0).

A ratio is the median of the rounds' own ratios: each round runs the sides
back to back, so load from outside that drifts over minutes moves both sides
of a round alike.

The kernel runs twice: booted with its defaults, and with `--slots 16
--n-ctx 512` (the peer's KV: 16 sequences of 512 tokens). The sides
alternate, peer / kernel / kernel, for --rounds rounds; each side runs alone
(they share the cores) and is booted fresh per round.

The peer is asked for exactly 48 tokens (`ignore_eos`); the kernel has no
ignore-eos knob, so its side counts the tokens it produced. The prompts are
chosen so greedy decoding runs 48 tokens without reaching end of text; the
token counts are printed beside each figure so a shortfall shows.

Both sides run the same llama.cpp kernels: llama-server with `--no-repack`,
as the kernel's device loads with use_extra_bufts=False (AMX repacking
crashes on some CPUs), and 2 threads each. The peer is built once from the
llama.cpp source vendored in the installed llama-cpp-python's sdist (see
peer_server.py); if it cannot be fetched or built, the bench says why and
exits 0.

    python bench/bench_peer.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import psutil

sys.path.insert(0, str(Path(__file__).parent))

from _kernel import BenchKernel, aggregate, run_agents  # noqa: E402
from peer_server import CMAKE_FLAGS, BuildSkipped, PeerServer, build  # noqa: E402

TOKENS = 48
CLIENTS = 16
PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a steam engine works, step by step.",
    "Describe a busy market in a small coastal town at dawn.",
    "Write a letter from a soldier to his mother during a long winter.",
    "Tell the history of the printing press and why it mattered.",
    "Describe the life cycle of a star from its birth to its death.",
    "Write a short story about a robot who learns to paint.",
    "Explain why the sky is blue to a curious ten-year-old.",
    "Describe a walk through an ancient forest after a summer storm.",
    "Write a diary entry of a sailor crossing the Atlantic in 1850.",
    "Explain how bees make honey and why they need so much of it.",
    "Write a short story about two friends who get lost in a big city.",
    "Describe how bread is made in a traditional village bakery.",
    "Tell the story of the first flight of the Wright brothers.",
    "Write a short story about a cat who wants to become the mayor.",
    "Explain how a river shapes the valley it flows through over time.",
]
SINGLE_PROMPTS = PROMPTS[:4]  # one stream, one after another
PEER = "llama-server -np 16"
PEER_ARGS = ["-np", str(CLIENTS), "-c", str(CLIENTS * 512), "-t", "2", "--no-repack"]
KERNEL_BOOTS = {"kernel (defaults)": (), "kernel --slots 16 --n-ctx 512":
                ("--slots", "16", "--n-ctx", "512")}
GREEDY = {"max_tokens": TOKENS, "temperature": 0, "stop": []}


# -- the peer: HTTP clients, one thread and one kept-alive connection each --------------------

def peer_clients(server: PeerServer, jobs: list[list[str]], tokens: int = TOKENS,
                 on_start: Callable[[], None] | None = None) -> list[dict]:
    """Each job on its own connection, its prompts in turn, all started by a barrier
    (``on_start`` runs as it opens)."""
    conns = [server.connect() for _ in jobs]
    for conn in conns:  # open the connections before the clock starts
        conn.request_json("GET", "/health")
    barrier = threading.Barrier(len(jobs), action=on_start)
    runs: list[dict] = []
    errors: list[BaseException] = []

    def client(conn, prompts: list[str]) -> None:
        try:
            barrier.wait()
            for p in prompts:
                t0 = time.time()
                out = conn.completion(p, tokens)
                runs.append({"start": t0, "end": time.time(), "timings": out["timings"],
                             "usage": {"completion_tokens": out["tokens_predicted"]},
                             "prompt": p, "text": out["content"]})
        except BaseException as e:  # reported below, on the caller's thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=client, args=(conn, job)) for conn, job in
               zip(conns, jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for conn in conns:
        conn.close()
    if errors:
        raise errors[0]
    return runs


class CpuMeter:
    """CPU time a serving process (all its threads) used over a measurement: what it
    got of the cores, and tokens per CPU-second, which other load changes less."""

    def __init__(self, pid: int):
        self.proc = psutil.Process(pid)

    def start(self) -> None:
        self.t0, self.c0 = time.monotonic(), self._cpu()

    def _cpu(self) -> float:
        t = self.proc.cpu_times()
        return t.user + t.system

    def stop(self) -> dict:
        return {"cpu_s": self._cpu() - self.c0, "cpu_wall_s": time.monotonic() - self.t0}


def measure_peer(exe: Path, model: Path) -> dict:
    with PeerServer(exe, model, *PEER_ARGS) as server:
        meter = CpuMeter(server.proc.pid)
        peer_clients(server, [["Hello"]], 4)  # warm up, as the kernel's first request does
        many = peer_clients(server, [[p] for p in PROMPTS[:CLIENTS]], on_start=meter.start)
        many_cpu = meter.stop()
        one = peer_clients(server, [SINGLE_PROMPTS], on_start=meter.start)
        one_cpu = meter.stop()
    return {"multi": summarize(many, many_cpu), "single": summarize(one, one_cpu)}


# -- the kernel: agent processes -------------------------------------------------------------

def measure_kernel(boot: tuple[str, ...]) -> dict:
    with BenchKernel(*boot) as k:
        c = k.client()
        meter = CpuMeter(k.proc.pid)  # the kernel; its agents are clients, as the peer's are
        run_agents(c, [(["Hello"], {**GREEDY, "max_tokens": 4})])  # warm up
        many = run_agents(c, [([p], GREEDY) for p in PROMPTS[:CLIENTS]], on_start=meter.start)
        many_cpu = meter.stop()
        one = run_agents(c, [(SINGLE_PROMPTS, GREEDY)], on_start=meter.start)
        one_cpu = meter.stop()
    many_runs = [{**job[0], "prompt": p} for p, job in zip(PROMPTS, many)]
    return {"multi": summarize(many_runs, many_cpu), "single": summarize(one[0], one_cpu)}


def summarize(runs: list[dict], cpu: dict) -> dict:
    out = aggregate(runs)
    out["short"] = sum(r["usage"]["completion_tokens"] < TOKENS for r in runs)
    out["texts"] = {r["prompt"]: r["text"] for r in runs if "prompt" in r}
    out["cores"] = cpu["cpu_s"] / cpu["cpu_wall_s"]
    out["tok_per_cpu_s"] = out["tokens"] / cpu["cpu_s"]
    if "timings" in runs[0]:  # llama-server's own account, per request
        t = [r["timings"] for r in runs]
        out["peer_gen_tok_s"] = statistics.mean(x["predicted_per_second"] for x in t)
        out["peer_prompt_ms"] = statistics.mean(x["prompt_ms"] for x in t)
    else:  # the kernel's, from usage
        out["queue_wait_ms"] = 1000 * statistics.mean(r["usage"]["queue_wait"] for r in runs)
        out["device_ms"] = 1000 * statistics.mean(r["usage"]["device_time"] for r in runs)
    return out


# -- one run, alternating --------------------------------------------------------------------

def run(rounds: int = 2) -> dict | None:
    from llmagentos.drivers.models import packaged_gemma_path

    try:
        exe = build()
    except BuildSkipped as e:
        print(f"bench-peer skipped: llama-server could not be built: {e}")
        return None
    model = packaged_gemma_path()
    sides = [PEER, *KERNEL_BOOTS]
    results: dict[str, list[dict]] = {s: [] for s in sides}
    load = [os.getloadavg()[0]]  # other work on the cores makes every figure here lower
    for r in range(rounds):
        for side in sides:
            t0 = time.monotonic()
            res = (measure_peer(exe, model) if side == PEER
                   else measure_kernel(KERNEL_BOOTS[side]))
            results[side].append(res)
            load.append(os.getloadavg()[0])
            m, o = res["multi"], res["single"]
            print(f"  round {r + 1} {side:32} {CLIENTS} at once {m['tok_s']:6.1f} tok/s "
                  f"({m['tokens']} tokens, {m['cores']:.2f} cores), single {o['tok_s']:5.1f} "
                  f"tok/s ({o['tokens']} tokens, {o['cores']:.2f} cores)  "
                  f"[{time.monotonic() - t0:.0f}s, load {load[-1]:.1f}]", flush=True)
    return {"rounds": rounds, "results": results, "exe": str(exe), "model": str(model),
            "load": load}


def median_of(runs: list[dict], kind: str, key: str = "tok_s") -> float:
    return statistics.median(r[kind][key] for r in runs)


def table(res: dict[str, list[dict]], key: str, title: str, goal: float | None) -> None:
    peer = res[PEER]
    print(f"  {title}")
    print(f"  {'':32} {CLIENTS} at once{'':26} single stream")
    print(f"  {'':32} {'median':>7} {'runs':14} {'÷ peer':11}   {'median':>7} {'runs':12} "
          f"{'÷ peer':11}".rstrip())
    print(f"  {'':32} (÷ peer: the median of the rounds' own ratios)")
    for side in res:
        cells = []
        for kind, width in (("multi", 14), ("single", 12)):
            v = median_of(res[side], kind, key)
            runs = " ".join(f"{x[kind][key]:.1f}" for x in res[side])
            # each round's own ratio (its runs are a minute apart; load that drifts
            # over the run moves both sides of one), then their median
            ratio = statistics.median(x[kind][key] / p[kind][key]
                                      for x, p in zip(res[side], peer))
            verdict = "" if side == PEER or goal is None else (
                "PASS" if ratio >= goal else "FAIL")
            cells.append(f"{v:7.1f} {runs:{width}} {ratio:4.2f} {verdict:6}")
        print(f"  {side:32} {cells[0]}   {cells[1]}".rstrip())


def report(r: dict | None) -> None:
    if r is None:
        return
    res, rounds = r["results"], r["rounds"]
    peer = res[PEER]
    print(f"== the kernel beside llama-server: same model, {TOKENS} greedy tokens a request, "
          f"{rounds} alternating rounds ==")
    print(f"  llama-server: {' '.join(PEER_ARGS)}; built with {' '.join(CMAKE_FLAGS)}")
    print(f"  {os.cpu_count()} cores; 1-minute load average {min(r['load']):.1f} to "
          f"{max(r['load']):.1f} during the run (this bench's own share is about 2)")
    table(res, "tok_s", "tok/s (goal: kernel ÷ llama-server >= 1.0)", 1.0)
    table(res, "tok_per_cpu_s", "tokens per CPU-second of the serving process (kernel or "
                                "llama-server; less sensitive to other load)", None)
    print("  cores the serving process got (median; 2 threads compute): " + "; ".join(
        f"{side} {median_of(res[side], 'multi', 'cores'):.2f} / "
        f"{median_of(res[side], 'single', 'cores'):.2f}" for side in res))
    print(f"  llama-server's own timings, per request (median): generating "
          f"{median_of(peer, 'multi', 'peer_gen_tok_s'):.1f} tok/s with {CLIENTS} at once, "
          f"{median_of(peer, 'single', 'peer_gen_tok_s'):.1f} tok/s alone; prompt "
          f"{median_of(peer, 'multi', 'peer_prompt_ms'):.0f} / "
          f"{median_of(peer, 'single', 'peer_prompt_ms'):.0f} ms")
    for side in KERNEL_BOOTS:
        x = res[side]
        pairs = [(k["multi"]["texts"].get(pr), t) for k, y in zip(x, peer)
                 for pr, t in y["multi"]["texts"].items()]
        same = sum(a == b for a, b in pairs)
        short = sum(k[kind]["short"] for k in x for kind in ("multi", "single"))
        print(f"  {side}: device time {median_of(x, 'multi', 'device_ms'):.0f} ms and queue "
              f"wait {median_of(x, 'multi', 'queue_wait_ms'):.0f} ms a request with "
              f"{CLIENTS} at once; greedy text the same as llama-server's {same}/{len(pairs)}"
              + (f"; {short} requests ended (end of text) before {TOKENS} tokens" if short
                 else f"; every request {TOKENS} tokens"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds (at least 2)")
    args = ap.parse_args(argv)
    report(run(max(2, args.rounds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
