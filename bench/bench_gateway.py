"""The OpenAI-compatible HTTP gateway against the syscalls it stands for, in one run.

(1) throughput, real model: 16 client processes each streaming one chat
    completion through the gateway ÷ 16 client processes each making the same
    llm.generate syscall (streamed) on the kernel's socket; aggregate tok/s,
    goal >= 0.9. The clients are started first and released together by a
    signal, so process start-up is not timed; the same kernel serves both.
(2) latency, simulated device with no decode time: a 1-token completion
    through the gateway (POST /v1/completions on a kept-alive connection)
    minus the same llm.generate syscall; p50, goal <= 2 ms.
(3) priority: two keys, nice -10 and nice 10, each keeping two streamed
    requests going for some seconds on a three-slot device under the priority
    policy, first over HTTP, then as llm.generate syscalls made with the same
    keys; tokens served to -10 ÷ tokens served to 10 must be the same either
    way (goal: HTTP ratio ÷ syscall ratio in 0.8-1.25).

    python bench/bench_gateway.py [--quick]
"""

from __future__ import annotations

import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))

from _kernel import BenchKernel  # noqa: E402

import llmagentos  # noqa: E402

N_CLIENTS = 16
TOKENS = 64
MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]

# One client: ready, wait for SIGUSR1, one streamed generation, print what it got.
CLIENT = """
import json, signal, sys, time
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
mode, where, secret, params = json.loads(sys.argv[1])
msgs = [{"role": "user", "content": "Tell me about the sea."}]
if mode == "http":  # a thin client, as on the syscall side: the gateway is measured, not
    import httpx      # an SDK's per-chunk parsing (on 2 cores that would starve the device)
    client = httpx.Client(base_url=where + "/v1", timeout=900,
                          headers={"Authorization": "Bearer " + secret})
    client.get("/models").raise_for_status()
else:
    import llmagentos
    client = llmagentos.connect(token=secret, run_dir=where, timeout=900)
    client.sys.null()
print("ready", flush=True)
signal.sigwait({signal.SIGUSR1})
t0 = time.time()
if mode == "http":
    last = None
    with client.stream("POST", "/chat/completions", json={
            "messages": msgs, "stream": True, "stream_options": {"include_usage": True},
            **params}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                last = line
    n = json.loads(last[6:])["usage"]["completion_tokens"]
else:
    r = client.call("llm.generate", None, msgs, params, True, on_notify=lambda m, a: None)
    n = r["usage"]["completion_tokens"]
print(json.dumps({"start": t0, "end": time.time(), "tokens": n}), flush=True)
"""


def _clients(jobs: list[list]) -> dict:
    procs = [subprocess.Popen([sys.executable, "-c", CLIENT, json.dumps(j)],
                              stdout=subprocess.PIPE, text=True) for j in jobs]
    for p in procs:
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError("a client did not get ready")
    for p in procs:
        p.send_signal(signal.SIGUSR1)
    runs = [json.loads(p.communicate(timeout=900)[0].splitlines()[-1]) for p in procs]
    tokens = sum(r["tokens"] for r in runs)
    wall = max(r["end"] for r in runs) - min(r["start"] for r in runs)
    return {"tok_s": tokens / wall, "tokens": tokens, "wall_s": wall}


def bench_throughput(n: int = N_CLIENTS, tokens: int = TOKENS) -> dict:
    with BenchKernel("--slots", str(n), "--n-ctx", "256", "--http", "127.0.0.1:0") as k:
        c = k.client()
        url = (k.run_dir / "http").read_text().strip()
        params = [{"max_tokens": tokens, "temperature": 0.8, "seed": i} for i in range(n)]
        key = c.key.create("bench", None, 0, None, None)["key"]
        http = _clients([["http", url, key, {"model": "gemma3-270m", **p}] for p in params])
        toks = [c.proc.attach(f"agent{i}")["token"] for i in range(n)]
        sysc = _clients([["syscall", str(k.run_dir), t, p] for t, p in zip(toks, params)])
    return {"gateway": http, "syscalls": sysc, "ratio": http["tok_s"] / sysc["tok_s"],
            "clients": n}


class RawHTTP:
    """A kept-alive HTTP/1.1 connection with as little client work as the syscall
    client does (one write, reads until the body is whole), so what is timed is
    the gateway's own cost rather than an HTTP library's."""

    def __init__(self, url: str, key: str) -> None:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.head = f"Host: {host}\r\nAuthorization: Bearer {key}\r\n" \
                    "Content-Type: application/json\r\n"

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        data = json.dumps(body).encode()
        self.sock.sendall(f"POST {path} HTTP/1.1\r\n{self.head}Content-Length: {len(data)}"
                          f"\r\n\r\n".encode() + data)
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += self.sock.recv(65536)
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        length = next(int(v) for k, _, v in (ln.partition(": ") for ln in lines[1:])
                      if k.lower() == "content-length")
        while len(rest) < length:
            rest += self.sock.recv(65536)
        return int(lines[0].split()[1]), json.loads(rest)

    def __enter__(self) -> "RawHTTP":
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def _p50(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def bench_latency(n: int = 300) -> dict:
    with BenchKernel("--model", "sim", "--http", "127.0.0.1:0") as k:
        c = k.client()
        url = (k.run_dir / "http").read_text().strip()
        key = c.key.create("latency", None, 0, None, None)
        agent = llmagentos.connect(token=c.proc.attach("latency-agent")["token"],
                                   run_dir=k.run_dir)
        via_http, via_sys = [], []
        with RawHTTP(url, key["key"]) as h:
            for i in range(n + 20):  # interleaved, the first 20 of each as warm-up
                t0 = time.perf_counter()
                status, _ = h.post("/v1/completions",
                                   {"model": "sim", "prompt": "Hello", "max_tokens": 1})
                t1 = time.perf_counter()
                agent.llm.generate("Hello", None, {"max_tokens": 1})
                t2 = time.perf_counter()
                assert status == 200
                if i >= 20:
                    via_http.append(t1 - t0)
                    via_sys.append(t2 - t1)
        agent.close()
    return {"http_p50_ms": _p50(via_http), "syscall_p50_ms": _p50(via_sys),
            "added_p50_ms": _p50(via_http) - _p50(via_sys), "samples": n}


def bench_priority(seconds: float = 6.0) -> dict:
    """Two keys, nice -10 and nice 10, two streams each on a three-slot device under
    the priority policy, first as HTTP requests, then as llm.generate syscalls made
    with the same keys: the ratio of tokens served must be the scheduler's either way."""
    tmp = Path(tempfile.mkdtemp(prefix="llmos-bench-gw-"))
    (tmp / "sim.toml").write_text('[models.sim-2ms]\nkind = "sim"\ndecode_ms = 2.0\n'
                                  'n_seq_max = 3\n')
    with BenchKernel("--config", str(tmp / "sim.toml"), "--model", "sim-2ms", "--policy",
                     "priority", "--http", "127.0.0.1:0") as k:
        c = k.client()
        url = (k.run_dir / "http").read_text().strip()
        keys = {nice: c.key.create(f"nice{nice}", None, nice, None, None) for nice in (-10, 10)}

        def http_loop(key: str, stop: float) -> None:
            with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=60) as h:
                while time.monotonic() < stop:
                    with h.stream("POST", url + "/v1/chat/completions",
                                  json={"model": "sim-2ms", "messages": MESSAGES,
                                        "max_tokens": 200, "stream": True}) as r:
                        for _ in r.iter_bytes():
                            if time.monotonic() >= stop:
                                break

        def syscall_loop(key: str, stop: float) -> None:
            with llmagentos.connect(token=key, run_dir=k.run_dir, timeout=60) as a:
                while time.monotonic() < stop:
                    a.call("llm.generate", None, MESSAGES, {"max_tokens": 200}, True,
                           on_notify=lambda m, args: None)

        def phase(loop) -> dict:
            before = {r["pid"]: r["tokens_out"] for r in c.proc.ps()}
            stop = time.monotonic() + seconds
            threads = [threading.Thread(target=loop, args=(keys[nice]["key"], stop))
                       for nice in (10, -10) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            rows = {r["pid"]: r["tokens_out"] for r in c.proc.ps()}
            served = {nice: rows[keys[nice]["pid"]] - before[keys[nice]["pid"]]
                      for nice in (-10, 10)}
            return {"tokens": served, "ratio": served[-10] / max(served[10], 1)}

        http, sysc = phase(http_loop), phase(syscall_loop)
    return {"http": http, "syscalls": sysc, "ratio": http["ratio"] / sysc["ratio"]}


def run(quick: bool = False) -> dict:
    return {"latency": bench_latency(100 if quick else 300),
            "priority": bench_priority(3.0 if quick else 6.0),
            "throughput": bench_throughput(8 if quick else N_CLIENTS)}


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(r: dict) -> str:
    t, lat, pr = r["throughput"], r["latency"], r["priority"]
    n = str(t["clients"])
    return "\n".join([
        "== OpenAI-compatible HTTP gateway ==",
        f"  {n} streamed chat completions via HTTP:  {t['gateway']['tok_s']:.1f} tok/s aggregate "
        f"({t['gateway']['tokens']} tokens in {t['gateway']['wall_s']:.1f}s)",
        f"  {n} streamed llm.generate syscalls:      {t['syscalls']['tok_s']:.1f} tok/s aggregate "
        f"({t['syscalls']['tokens']} tokens in {t['syscalls']['wall_s']:.1f}s)",
        f"  gateway ÷ syscalls:                     {t['ratio']:.3f} (goal >= 0.9) "
        f"{verdict(t['ratio'] >= 0.9)}",
        f"  1-token completion p50: HTTP {lat['http_p50_ms']:.2f} ms, syscall "
        f"{lat['syscall_p50_ms']:.2f} ms; added {lat['added_p50_ms']:.2f} ms (goal <= 2 ms) "
        f"{verdict(lat['added_p50_ms'] <= 2.0)}",
        f"  two keys, nice -10 / nice 10 tokens via HTTP:     {pr['http']['tokens'][-10]} / "
        f"{pr['http']['tokens'][10]} = {pr['http']['ratio']:.2f}",
        f"  the same keys, via llm.generate syscalls:        {pr['syscalls']['tokens'][-10]} / "
        f"{pr['syscalls']['tokens'][10]} = {pr['syscalls']['ratio']:.2f}",
        f"  HTTP ratio ÷ syscall ratio:             {pr['ratio']:.2f} (goal 0.8-1.25) "
        f"{verdict(0.8 <= pr['ratio'] <= 1.25)}",
    ])


if __name__ == "__main__":
    res = run(quick="--quick" in sys.argv)
    print(report(res))
