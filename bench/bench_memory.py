"""Memory manager throughput: appends/s, window() and search() latency.

A context holds ``archived`` messages (bulk-loaded with import_archive: one
transaction, executemany) drawn from a Zipf-distributed vocabulary, with
planted facts at random positions. Then it measures, on that same context:

- appends/s in steady state: budget 512, so nearly every append pages one
  message out and rewrites the note; each append is its own fsynced commit;
- window() latency (p50, p99);
- search() latency (p50, p99) for questions about the planted facts, which
  mix one rare word with common ones, and the fraction found at rank 1;
- search() p50 for queries made only of words common all over the archive
  (the worst case: bm25 scores most of it), and stats() p50.

    python bench/bench_memory.py [--archived N] [--appends N] [--queries N] [--dir D] [--json]

``run(...)`` returns the numbers as a dict; ``report(numbers)`` prints them
(the interface of bench/run_all.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from llmagentos.kernel.memory import ContextStore


def count_tokens(text: str) -> int:
    """Stand-in tokenizer: whitespace words x 1.3."""
    return math.ceil(len(text.split()) * 1.3)


def _vocabulary(rng: random.Random, n: int = 5000) -> tuple[list[str], list[float]]:
    letters = "abcdefghijklmnoprstuvw"
    words = sorted({"".join(rng.choices(letters, k=rng.randint(3, 9))) for _ in range(n)})
    weights = [1.0 / (rank + 1) for rank in range(len(words))]  # Zipf: a few words everywhere
    return words, weights


def _pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def run(
    archived: int = 100_000,
    appends: int = 2000,
    queries: int = 200,
    directory: str | os.PathLike[str] | None = None,
    seed: int = 7,
) -> dict[str, float]:
    """Build the store under ``directory`` (a temp dir by default), measure, return numbers."""
    rng = random.Random(seed)
    words, weights = _vocabulary(rng)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        path = Path(tmp) / "memory.db"
        with ContextStore(path, count_tokens) as cs:
            ctx = cs.create("bench", budget=512)
            cs.append(ctx, "system", "You are the benchmark agent.", pinned=True)

            n_facts = max(1, min(1000, archived // 100))
            facts = sorted(rng.sample(range(archived), n_facts))
            fact_at = {pos: j for j, pos in enumerate(facts)}
            batch = []
            for i in range(archived):
                text = " ".join(rng.choices(words, weights, k=rng.randint(8, 40)))
                if i in fact_at:
                    text += f" note that locker kx{fact_at[i]:05d} opens with code {i}"
                batch.append(("user" if i % 2 else "assistant", text))
            t0 = time.perf_counter()
            cs.import_archive(ctx, batch)
            load_s = time.perf_counter() - t0
            first_seq = 2  # seq 1 is the system prompt
            del batch

            t0 = time.perf_counter()
            for _ in range(appends):
                cs.append(ctx, "user", " ".join(rng.choices(words, weights, k=rng.randint(8, 40))))
            append_s = time.perf_counter() - t0

            win = []
            for _ in range(200):
                t = time.perf_counter()
                cs.window(ctx)
                win.append(time.perf_counter() - t)

            lat, hits = [], 0
            for _ in range(queries):
                j = rng.randrange(n_facts)
                common = " ".join(words[:2])  # the two most frequent words: long doclists
                q = f"what did we say about {common} and the locker kx{j:05d}?"
                t = time.perf_counter()
                found = cs.search(ctx, q, k=5)
                lat.append(time.perf_counter() - t)
                hits += bool(found) and found[0]["seq"] == first_seq + facts[j]

            # The worst case: only words found all over the archive, so bm25 must
            # score most of it.
            common_lat = []
            for _ in range(max(1, queries // 10)):
                q = " ".join(rng.sample(words[:20], 2))
                t = time.perf_counter()
                cs.search(ctx, q, k=5)
                common_lat.append(time.perf_counter() - t)

            stats_lat = []
            for _ in range(20):
                t = time.perf_counter()
                st = cs.stats(ctx)
                stats_lat.append(time.perf_counter() - t)
            size = sum(f.stat().st_size for f in Path(tmp).iterdir())
    return {
        "archived": st["archived_messages"],
        "live_messages": st["live_messages"],
        "bulk_load_s": round(load_s, 2),
        "bulk_load_msgs_per_s": round(archived / load_s) if load_s else 0,
        "appends_per_s": round(appends / append_s, 1),
        "append_ms_mean": round(1000 * append_s / appends, 3),
        "window_p50_ms": round(1000 * statistics.median(win), 3),
        "window_p99_ms": round(1000 * _pct(win, 0.99), 3),
        "search_p50_ms": round(1000 * statistics.median(lat), 3),
        "search_p99_ms": round(1000 * _pct(lat, 0.99), 3),
        "search_hit_rate": hits / queries,
        "search_common_words_p50_ms": round(1000 * statistics.median(common_lat), 3),
        "stats_p50_ms": round(1000 * statistics.median(stats_lat), 3),
        "db_mb": round(size / 2**20, 1),
    }


def report(r: dict[str, float]) -> None:
    print("== memory manager (ContextStore, SQLite WAL, synchronous=FULL) ==")
    print(
        f"  archive {r['archived']} messages, {r['db_mb']} MB; bulk load "
        f"{r['bulk_load_msgs_per_s']} msgs/s"
    )
    print(
        f"  append   {r['appends_per_s']:8.0f} /s  (each a fsynced commit; budget 512, "
        "paging on nearly every append)"
    )
    print(f"  window   p50 {r['window_p50_ms']:7.3f} ms   p99 {r['window_p99_ms']:7.3f} ms")
    print(
        f"  search   p50 {r['search_p50_ms']:7.3f} ms   p99 {r['search_p99_ms']:7.3f} ms"
        f"   found at rank 1: {r['search_hit_rate']:.0%}"
    )
    print(f"  search, common words only: p50 {r['search_common_words_p50_ms']:.1f} ms")
    print(f"  stats    p50 {r['stats_p50_ms']:7.3f} ms")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archived", type=int, default=100_000)
    p.add_argument("--appends", type=int, default=2000)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--dir", default=None, help="where to put the temporary database")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    a = p.parse_args(argv)
    result = run(a.archived, a.appends, a.queries, a.dir)
    if a.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        report(result)


if __name__ == "__main__":
    main()
