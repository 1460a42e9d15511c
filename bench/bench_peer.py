"""`make bench-peer`: the kernel beside llama.cpp's own `llama-server`, in one run.

The peer a user would pick instead of the kernel, on the same model (the
packaged Gemma-3-270M), the same prompts, 48 greedy tokens per request:

(1) 16 concurrent HTTP clients against `llama-server -np 16` (continuous
    batching) ÷ 16 agent processes through the kernel, each calling
    `llm.generate` once, started together (a barrier); aggregate tok/s from
    the first start to the last finish (goal: kernel ÷ peer >= 1.0);
(2) single stream: one client, one agent process, the prompts in turn
    (goal >= 1.0).

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

def peer_clients(server: PeerServer, jobs: list[list[str]], tokens: int = TOKENS) -> list[dict]:
    """Each job on its own connection, its prompts in turn, all started by a barrier."""
    conns = [server.connect() for _ in jobs]
    for conn in conns:  # open the connections before the clock starts
        conn.request_json("GET", "/health")
    barrier = threading.Barrier(len(jobs))
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


def measure_peer(exe: Path, model: Path) -> dict:
    with PeerServer(exe, model, *PEER_ARGS) as server:
        peer_clients(server, [["Hello"]], 4)  # warm up, as the kernel's first request does
        many = peer_clients(server, [[p] for p in PROMPTS[:CLIENTS]])
        one = peer_clients(server, [SINGLE_PROMPTS])
    return {"multi": summarize(many), "single": summarize(one)}


# -- the kernel: agent processes -------------------------------------------------------------

def measure_kernel(boot: tuple[str, ...]) -> dict:
    with BenchKernel(*boot) as k:
        c = k.client()
        run_agents(c, [(["Hello"], {**GREEDY, "max_tokens": 4})])  # warm up
        many = run_agents(c, [([p], GREEDY) for p in PROMPTS[:CLIENTS]])
        one = run_agents(c, [(SINGLE_PROMPTS, GREEDY)])
    many_runs = [{**job[0], "prompt": p} for p, job in zip(PROMPTS, many)]
    return {"multi": summarize(many_runs), "single": summarize(one[0])}


def summarize(runs: list[dict]) -> dict:
    out = aggregate(runs)
    out["short"] = sum(r["usage"]["completion_tokens"] < TOKENS for r in runs)
    out["texts"] = {r["prompt"]: r["text"] for r in runs if "prompt" in r}
    if "timings" in runs[0]:  # llama-server's own account, per request
        t = [r["timings"] for r in runs]
        out["peer_gen_tok_s"] = statistics.mean(x["predicted_per_second"] for x in t)
        out["peer_prompt_ms"] = statistics.mean(x["prompt_ms"] for x in t)
        out["peer_gen_ms"] = statistics.mean(x["predicted_ms"] for x in t)
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
            print(f"  round {r + 1} {side:32} 16 at once {res['multi']['tok_s']:6.1f} tok/s "
                  f"({res['multi']['tokens']} tokens), single {res['single']['tok_s']:5.1f} tok/s "
                  f"({res['single']['tokens']} tokens)  [{time.monotonic() - t0:.0f}s, load "
                  f"{load[-1]:.1f}]", flush=True)
    return {"rounds": rounds, "results": results, "exe": str(exe), "model": str(model),
            "load": load}


def median_of(runs: list[dict], kind: str, key: str = "tok_s") -> float:
    return statistics.median(r[kind][key] for r in runs)


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
    print(f"  {'':32} {CLIENTS} at once: tok/s aggregate{'':11} single stream: tok/s")
    print(f"  {'':32} {'median':>7} {'runs':14} {'÷ peer':11}   {'median':>7} {'runs':12} "
          f"{'÷ peer':11}".rstrip())
    for side in res:
        cells = []
        for kind in ("multi", "single"):
            v = median_of(res[side], kind)
            runs = " ".join(f"{x[kind]['tok_s']:.1f}" for x in res[side])
            ratio = v / median_of(peer, kind)
            verdict = "" if side == PEER else ("PASS" if ratio >= 1.0 else "FAIL")
            cells.append(f"{v:7.1f} {runs:{14 if kind == 'multi' else 12}} {ratio:4.2f} "
                         f"{verdict:6}")
        print(f"  {side:32} {cells[0]}   {cells[1]}".rstrip())
    print("  (goal: kernel ÷ llama-server >= 1.0, both columns)")
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
              f"{CLIENTS} at once; greedy text the same as llama-server's "
              f"{same}/{len(pairs)}"
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
