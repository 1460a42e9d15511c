"""The compute device is shared fairly: on the real model, through the kernel.

Embeddings go through the run queue (charged to the token limit, time-shared
with generation, withdrawn with their process, in bounded memory); grammars
are bounded before they compile and their sampling is charged to their own
request; oversized inputs are refused before any tokenizing, and legitimate
large ones are tokenized off the event loop.
"""

import textwrap
import threading
import time

import psutil
import pytest
from conftest import PY, wait_for

import llmagentos

GREEDY = {"temperature": 0, "max_tokens": 24}  # long enough to overlap the other work
STORY = "Once upon a time, in a small village by the sea,"


def _timed_generation(kernel) -> float:
    with kernel.client() as c:
        t0 = time.monotonic()
        r = c.llm.generate(STORY, None, GREEDY)
        took = time.monotonic() - t0
    assert r["usage"]["completion_tokens"] == GREEDY["max_tokens"]
    return took


def _error(fn, *args):
    with pytest.raises(llmagentos.KernelError) as e:
        fn(*args)
    return e.value


def _device(c) -> dict:
    return c.sys.stats()["device"]




# -- sizes before work ------------------------------------------------------------------

def test_a_15_mb_text_is_refused_before_tokenizing(llm_kernel):
    """A 15 MB llm.tokenize took 7.7 s of the event loop before any size check."""
    big = "word " * 3_000_000
    with llm_kernel.client() as c:
        for call in (lambda: c.llm.tokenize(big),
                     lambda: c.llm.generate(big, None, {"max_tokens": 1}),
                     lambda: c.llm.generate(None, [{"role": "user", "content": big}],
                                            {"max_tokens": 1})):
            t0 = time.monotonic()
            err = _error(call)
            assert time.monotonic() - t0 < 3.0  # the frame's transfer, no tokenizing
            assert err.name == "E2BIG" and "bound of" in str(err)
        assert "1048576" in str(_error(c.llm.tokenize, big))
        assert c.llm.tokenize("still fine")  # and nothing is left stuck


def test_a_large_legitimate_tokenize_does_not_hold_the_event_loop(llm_kernel):
    text = "word " * 200_000  # 1 MB: allowed, and about a second of tokenizing
    gaps: list[float] = []
    done = threading.Event()

    def ping() -> None:
        with llm_kernel.client() as other:
            while not done.is_set():
                t0 = time.monotonic()
                other.sys.null()
                gaps.append(time.monotonic() - t0)

    pinger = threading.Thread(target=ping)
    pinger.start()
    try:
        wait_for(lambda: len(gaps) > 5)
        with llm_kernel.client() as c:
            t0 = time.monotonic()
            toks = c.llm.tokenize(text)
            took = time.monotonic() - t0
    finally:
        done.set()
        pinger.join(10)
    assert len(toks) >= 200_000
    # On the loop, one sys.null would have waited out the whole tokenize.
    assert max(gaps) < took / 2, (max(gaps), took)


# -- embeddings ---------------------------------------------------------------------------

def test_embed_is_charged_to_the_token_limit(llm_kernel):
    with llm_kernel.client() as c:
        pid = c.proc.spawn([PY, "-c", textwrap.dedent("""
            import llmagentos
            c = llmagentos.connect()
            c.llm.embed(["word " * 40])
            print(c.proc.stat(None)["usage"]["tokens_in"])
            try:
                c.llm.embed(["word " * 40])
                print("embedded")
            except llmagentos.KernelError as e:
                print(e.name)
        """)], None, None, None, None, {"tokens": 60})
        c.proc.wait(pid, 60)
        used, second = c.proc.logs(pid)["data"].split()
    assert 40 <= int(used) <= 60 and second == b"EDQUOT"


def test_embed_requests_are_bounded(llm_kernel):
    with llm_kernel.client() as c:
        assert _error(c.llm.embed, ["x"] * 257).name == "EINVAL"
        t0 = time.monotonic()
        err = _error(c.llm.embed, ["word " * 1000] * 10)  # ~10,000 tokens
        assert err.name == "E2BIG" and "8192" in str(err)
        assert time.monotonic() - t0 < 5.0


def test_embedding_time_shares_the_device_and_dies_with_its_process(llm_kernel):
    """A long embed used to run beside the device loop in one decode of up to 2,048
    tokens with full-vocabulary logits for each (+4.1 GiB RSS), while others'
    generation fell from 64 to 0.5 tok/s."""
    with llm_kernel.client() as c:
        kernel = psutil.Process(c.sys.uname()["pid"])
        _timed_generation(llm_kernel)  # warm: the prompt is resident from here on
        solo = _timed_generation(llm_kernel)
        rss0 = kernel.memory_info().rss
        pid = c.proc.spawn([PY, "-c", textwrap.dedent("""
            import llmagentos
            texts = [f"Document {i}: " + "the tide comes in and goes out " * 140
                     for i in range(8)]
            llmagentos.connect().llm.embed(texts)
            print("DONE")
        """)], "embedder")

        wait_for(lambda: _device(c)["embed_chunks"] > 2, timeout=60)
        shared = _timed_generation(llm_kernel)
        assert _device(c)["embed_queue"] == 1  # it was embedding all along
        c.proc.kill(pid, "SIGSTOP")  # parked: no chunk of it runs
        solo = (solo + _timed_generation(llm_kernel)) / 2  # (the machine's load drifts)
        assert shared < 5 * solo, (shared, solo)

        chunks = _device(c)["embed_chunks"]
        time.sleep(1.0)
        assert _device(c)["embed_chunks"] <= chunks + 1  # (one may have been in flight)
        c.proc.kill(pid, "SIGCONT")
        wait_for(lambda: _device(c)["embed_chunks"] > chunks + 1, timeout=30)

        c.proc.kill(pid, "SIGKILL")
        c.proc.wait(pid, 10)
        wait_for(lambda: _device(c)["embed_queue"] == 0, timeout=10)
        assert c.proc.logs(pid)["data"] == b""  # it never finished
        assert kernel.memory_info().rss - rss0 < 1 << 30
        # Everything it held is free: embeddings and generation still work.
        a, b = c.llm.embed(["a cat", "a kitten"])
        assert 0.5 < sum(x * y for x, y in zip(a, b)) < 1.0
        assert c.llm.generate("Hi", None, {"max_tokens": 3})["usage"]["completion_tokens"] == 3


# -- grammars -----------------------------------------------------------------------------

def test_oversized_grammars_are_refused_before_compiling(llm_kernel):
    huge = "root ::= " + " | ".join(f'"item{i} is here"' for i in range(20_000))
    branchy = ("root ::= x1\n"
               + "x1 ::= " + " | ".join(f'x2 "{i}"' for i in range(40)) + "\n"
               + "x2 ::= " + " | ".join(f'x3 "{i}"' for i in range(40)) + "\n"
               + "x3 ::= " + " | ".join(f'"w{i}"' for i in range(40)) + "\n")
    with llm_kernel.client() as c:
        for grammar, bound in ((huge, "GRAMMAR_MAX_BYTES"), (branchy, "GRAMMAR_MAX_FANOUT")):
            t0 = time.monotonic()
            err = _error(c.llm.generate, "Pick:", None, {"grammar": grammar, "max_tokens": 4})
            assert err.name == "E2BIG" and bound in str(err)
            assert time.monotonic() - t0 < 3.0  # branchy alone took 21 s to compile
        schema = {"enum": [f"value number {i}" for i in range(5000)]}
        err = _error(c.llm.generate, "Pick:", None, {"json_schema": schema, "max_tokens": 4})
        assert err.name == "E2BIG"


def test_grammars_that_took_the_kernel_down_are_refused(llm_kernel):
    """30,000 nested parentheses overflowed llama.cpp's recursive parser (SIGSEGV);
    "a"{5,3} had it write out four billion copies (killed for memory)."""
    deep = "root ::= " + "(" * 30_000 + '"a"' + ")" * 30_000
    with llm_kernel.client() as c:
        err = _error(c.llm.generate, "x", None, {"grammar": deep, "max_tokens": 1})
        assert err.name == "E2BIG" and "GRAMMAR_MAX_DEPTH" in str(err)
        err = _error(c.llm.generate, "x", None, {"grammar": 'root ::= "a"{5,3}'})
        assert err.name == "EINVAL" and "{5,3}" in str(err)
        assert c.sys.null() is None


def test_a_costly_grammar_does_not_starve_another_generation(llm_kernel):
    """Hot sampling with a large top_k under a grammar of 300 words makes many of its
    tokens a pass of the grammar over the whole vocabulary (~0.25 s a token on average
    here, ten decodes' worth): that time used to hold up every other sequence too."""
    words = " | ".join(f'"q{i:03d}"' for i in range(300))
    params = {"grammar": f'root ::= (word " ")+\nword ::= {words}\n',
              "temperature": 1.0, "top_k": 1000, "seed": 1, "max_tokens": 400}
    with llm_kernel.client() as c:
        _timed_generation(llm_kernel)
        solo = _timed_generation(llm_kernel)
        pid = c.proc.spawn([PY, "-c", textwrap.dedent(f"""
            import llmagentos, sys
            def show(m, a):
                sys.stdout.write(a[1]); sys.stdout.flush()
            llmagentos.connect().call("llm.generate", "Runes:", None, {params!r}, True,
                                      on_notify=show)
        """)], "runes")
        wait_for(lambda: len(c.proc.logs(pid)["data"]) > 4, timeout=60)  # it is sampling
        shared = _timed_generation(llm_kernel)
        assert c.proc.stat(pid)["state"] != "ZOMBIE"  # it was generating all along
        c.proc.kill(pid, "SIGKILL")
        c.proc.wait(pid, 10)
        wait_for(lambda: _device(c)["running"] == 0, timeout=30)
        solo = (solo + _timed_generation(llm_kernel)) / 2  # (the machine's load drifts)
    assert shared < 3 * solo, (shared, solo)
