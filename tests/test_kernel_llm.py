"""The compute device through the kernel, on the real model (Gemma-3-270M)."""

import json
import textwrap
import threading
import time

import pytest
from conftest import PY, boot_kernel, reference_llama, wait_for

import llmagentos

PROMPT = "The three primary colors are"
GREEDY = {"temperature": 0, "max_tokens": 24}


@pytest.fixture(scope="module")
def reference_text():
    """llama-cpp-python's own greedy completion, for the same prompt and length."""
    llm = reference_llama()
    out = llm.create_completion(PROMPT, max_tokens=24, temperature=0)["choices"][0]["text"]
    llm.close()
    return out


def test_greedy_equals_llama_cpp_python(llm_kernel, reference_text):
    with llm_kernel.client() as c:
        r = c.llm.generate(PROMPT, None, GREEDY)
    assert r["text"] == reference_text
    assert r["finish_reason"] == "length"
    assert r["usage"]["completion_tokens"] == 24 and r["usage"]["prompt_tokens"] > 3


def test_streamed_equals_non_streamed(llm_kernel, reference_text):
    pieces = []
    with llm_kernel.client() as c:
        r = c.call("llm.generate", PROMPT, None, GREEDY, True,
                   on_notify=lambda m, a: pieces.append((m, a)))
    assert all(m == "llm.token" for m, _ in pieces) and len(pieces) > 5
    assert "".join(a[1] for _, a in pieces) == r["text"] == reference_text


def test_async_stream(llm_kernel, reference_text):
    import trio

    async def main():
        got = []
        async with llmagentos.aconnect(run_dir=llm_kernel.run_dir) as c:
            r = await c.call("llm.generate", PROMPT, None, GREEDY, True,
                             on_notify=lambda m, a: got.append(a[1]))
        return "".join(got), r["text"]

    streamed, text = trio.run(main)
    assert streamed == text == reference_text


def test_json_schema_output_parses(llm_kernel):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"]}
    with llm_kernel.client() as c:
        r = c.llm.generate("A person as JSON:", None,
                           {"json_schema": schema, "max_tokens": 60, "temperature": 0})
    obj = json.loads(r["text"])
    assert isinstance(obj["name"], str) and isinstance(obj["age"], int)


def test_gbnf_grammar_output(llm_kernel):
    with llm_kernel.client() as c:
        r = c.llm.generate("Is the sky blue? Answer:", None,
                           {"grammar": 'root ::= " yes" | " no"', "max_tokens": 5})
    assert r["text"] in (" yes", " no")


def test_chat_messages(llm_kernel):
    with llm_kernel.client() as c:
        r = c.llm.generate(None, [{"role": "user", "content": "Say hello."}],
                           {"max_tokens": 16, "temperature": 0})
    assert r["text"] and r["usage"]["prompt_tokens"] > 5


def test_bad_requests_are_errnos(llm_kernel):
    with llm_kernel.client() as c:
        with pytest.raises(ValueError, match="unknown sampling"):
            c.llm.generate("x", None, {"temprature": 0})
        with pytest.raises(ValueError, match="exactly one"):
            c.llm.generate("x", [{"role": "user", "content": "y"}])
        with pytest.raises(ValueError):
            c.llm.generate(None, [{"role": "wizard", "content": "y"}])
        with pytest.raises(ValueError):
            c.llm.generate("x", None, {"grammar": "root ::= ("})
        with pytest.raises(ValueError):
            c.llm.generate("x", None, {"max_tokens": -1})
        with pytest.raises(ValueError):
            c.llm.detokenize([10**9])
        assert c.llm.generate("Hi", None, {"max_tokens": 2})["usage"]["completion_tokens"] <= 2


def test_tokenize_detokenize_embed_models(llm_kernel):
    with llm_kernel.client() as c:
        toks = c.llm.tokenize("hello world")
        assert c.llm.detokenize(toks).strip() == "hello world"
        (v1, v2) = c.llm.embed(["a cat", "a kitten"])
        assert len(v1) == len(v2) > 100
        models = c.llm.models()
        assert models[0]["name"] == "gemma3-270m" and models[0]["loaded"]


def test_llm_needs_capability(llm_kernel):
    with llm_kernel.client() as c:
        pid = c.proc.spawn([PY, "-c", textwrap.dedent("""
            import llmagentos
            try:
                llmagentos.connect().llm.generate("x")
            except PermissionError as e:
                print(e.name)
        """)], None, None, None, ["fs.read"])
        c.proc.wait(pid, 30)
        assert c.proc.logs(pid)["data"] == b"EACCES\n"


def test_several_processes_generate_at_once(llm_kernel):
    prog = textwrap.dedent("""
        import llmagentos, sys
        c = llmagentos.connect()
        r = c.llm.generate("Once upon a time", None,
                           {"max_tokens": 20, "temperature": 0.8, "seed": int(sys.argv[1])})
        print(r["usage"]["completion_tokens"])
    """)
    with llm_kernel.client() as c:
        pids = [c.proc.spawn([PY, "-c", prog, str(i)], f"gen{i}") for i in range(6)]
        seen_batch = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < 60:
            st = c.sys.stats()["device"]
            seen_batch = max(seen_batch, st["running"])
            if all(r["state"] == "ZOMBIE" for r in c.proc.ps() if r["pid"] in pids):
                break
            time.sleep(0.05)
        for p in pids:
            assert c.proc.wait(p, 60)["exit_code"] == 0
            assert c.proc.logs(p)["data"] == b"20\n"
        assert seen_batch >= 2  # they really shared the device


def test_usage_is_accounted_per_process(llm_kernel):
    with llm_kernel.client() as c:
        pid = c.proc.spawn([PY, "-c", textwrap.dedent("""
            import llmagentos
            c = llmagentos.connect()
            a = c.llm.generate("Tell me about the sea.", None, {"max_tokens": 10, "temperature": 0})
            b = c.llm.generate("Tell me about the sea." + a["text"] + " And the sky?", None,
                               {"max_tokens": 10, "temperature": 0})
            print(b["usage"]["cached_tokens"], b["usage"]["prompt_tokens"])
        """)])
        wait_for(lambda: c.proc.stat(pid)["state"] == "ZOMBIE", timeout=60)
        st = c.proc.stat(pid)
        cached, prompt = map(int, c.proc.logs(pid)["data"].split())
        c.proc.wait(pid)
    # the second turn only prefilled the new suffix: the first turn was resident
    assert cached >= 12 and prompt - cached <= 8
    assert st["usage"]["tokens_out"] == 20 and st["usage"]["cached_tokens"] == cached
    assert st["usage"]["device_time"] > 0


def test_shared_system_prompt_is_decoded_once(llm_kernel):
    system = "You are a careful assistant. " * 20
    with llm_kernel.client() as c:
        first = c.llm.generate(system + "Question one?", None, {"max_tokens": 2})
    prog = textwrap.dedent(f"""
        import llmagentos
        r = llmagentos.connect().llm.generate({system!r} + "Question two?", None,
                                              {{"max_tokens": 2}})
        print(r["usage"]["cached_tokens"], r["usage"]["prompt_tokens"])
    """)
    with llm_kernel.client() as c:
        pid = c.proc.spawn([PY, "-c", prog])
        assert c.proc.wait(pid, 60)["exit_code"] == 0
        cached, prompt = map(int, c.proc.logs(pid)["data"].split())
    assert first["usage"]["prompt_tokens"] > 100
    assert cached >= 100 and prompt - cached < 10


def test_token_quota_is_edquot(llm_kernel):
    with llm_kernel.client() as c:
        pid = c.proc.spawn([PY, "-c", textwrap.dedent("""
            import llmagentos
            c = llmagentos.connect()
            r = c.llm.generate("Count: one two three", None, {"max_tokens": 50})
            print(r["usage"]["completion_tokens"] + r["usage"]["prompt_tokens"])
            try:
                c.llm.generate("more", None, {"max_tokens": 5})
            except llmagentos.KernelError as e:
                print(e.name)
        """)], None, None, None, None, {"tokens": 30})
        c.proc.wait(pid, 60)
        used, err = c.proc.logs(pid)["data"].split()
    assert int(used) <= 30 and err == b"EDQUOT"


def _long_generation_process(c, n=120, name="long"):
    prog = textwrap.dedent(f"""
        import llmagentos, sys
        c = llmagentos.connect()
        def show(m, a):
            sys.stdout.write(a[1]); sys.stdout.flush()
        r = c.call("llm.generate", "A long story about a dragon:", None,
                   {{"max_tokens": {n}, "temperature": 0}}, True, on_notify=show)
        print("\\nDONE", r["usage"]["completion_tokens"], flush=True)
    """)
    return c.proc.spawn([PY, "-c", prog], name)


def test_stop_and_cont_mid_generation(llm_kernel):
    with llm_kernel.client() as c:
        # The reference is the same program left alone: on the CPU a token can follow
        # the batch its prompt was decoded in (drivers/llama/device.py), and where the
        # two best are a near tie, a prompt another process decoded may round it the
        # other way ("a very big, beautiful" or "a very big, very powerful").
        ref = _long_generation_process(c, 60, "reference")
        assert c.proc.wait(ref, 60)["exit_code"] == 0
        solo = c.proc.logs(ref)["data"].decode().rsplit("\nDONE ", 1)[0]
        pid = _long_generation_process(c, 60)
        wait_for(lambda: len(c.proc.logs(pid)["data"]) > 20, timeout=30)
        c.proc.kill(pid, "SIGSTOP")
        parked = c.proc.stat(pid)["usage"]
        time.sleep(0.3)
        out1 = c.proc.logs(pid)["data"]
        st = c.sys.stats()["device"]
        assert st["running"] == 0  # parked: no slot of it is decoding
        time.sleep(1.0)
        assert c.proc.logs(pid)["data"] == out1  # nothing generated while stopped
        c.proc.kill(pid, "SIGCONT")
        assert c.proc.wait(pid, 60)["exit_code"] == 0
        out = c.proc.logs(pid)["data"].decode()
    assert parked is not None
    text, done = out.rsplit("\nDONE ", 1)
    assert text == solo and done.strip() == "60"  # nothing lost, nothing changed


def test_kill_frees_the_slot(llm_kernel):
    with llm_kernel.client() as c:
        pid = _long_generation_process(c, 400)
        wait_for(lambda: len(c.proc.logs(pid)["data"]) > 10, timeout=30)
        assert any(s["owner"] == pid for s in c.sys.stats()["device"]["slots"])
        c.proc.kill(pid, "SIGKILL")
        c.proc.wait(pid, 10)
        wait_for(lambda: all(s["owner"] != pid for s in c.sys.stats()["device"]["slots"]))
        st = c.sys.stats()["device"]
        assert st["running"] == 0 and st["queue_length"] == 0
        assert c.llm.generate("Hi", None, {"max_tokens": 3})["usage"]["completion_tokens"] == 3


def test_vanished_client_cancels_its_request(llm_kernel):
    with llm_kernel.client() as c:
        other = llmagentos.connect(run_dir=llm_kernel.run_dir)
        t = threading.Thread(target=lambda: _swallow(other.llm.generate, "Tell a story", None,
                                                     {"max_tokens": 400}))
        t.start()
        wait_for(lambda: c.sys.stats()["device"]["running"] == 1, timeout=30)
        other._sock.shutdown(2)  # the client vanishes mid-call
        t.join(10)
        wait_for(lambda: c.sys.stats()["device"]["running"] == 0, timeout=10)


def _swallow(fn, *a):
    try:
        fn(*a)
    except Exception:
        pass


def test_preempted_sequences_continue_exactly(tmp_path):
    """One slot, two greedy processes: the device must switch contexts by
    saving and restoring KV state, and each output equals its solo run."""
    k = boot_kernel(tmp_path, "--slots", "1", "--n-ctx", "512", "--policy", "rr",
                    "--quantum", "8", model="gemma3-270m")
    try:
        prompts = ["The history of Rome begins", "In the deep ocean, scientists found"]
        with k.client() as c:
            solo = [c.llm.generate(p, None, {"max_tokens": 40, "temperature": 0})["text"]
                    for p in prompts]
        results = [None, None]

        def run(i):
            with k.client() as cc:
                results[i] = cc.llm.generate(prompts[i], None,
                                             {"max_tokens": 40, "temperature": 0})["text"]

        ts = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(120)
        with k.client() as c:
            st = c.sys.stats()["device"]
        assert results == solo
        assert st["preemptions"] >= 2 and st["restores"] >= 1
    finally:
        k.stop()


def test_fifo_order_on_the_real_device(tmp_path):
    k = boot_kernel(tmp_path, "--slots", "1", "--n-ctx", "256", "--policy", "fifo",
                    model="gemma3-270m")
    try:
        done = []
        lock = threading.Lock()

        def run(i):
            with k.client() as cc:
                cc.llm.generate(f"Item {i}:", None, {"max_tokens": 12, "temperature": 0})
                with lock:
                    done.append(i)

        ts = []
        for i in range(3):
            t = threading.Thread(target=run, args=(i,))
            t.start()
            ts.append(t)
            time.sleep(0.15)  # arrival order 0, 1, 2
        for t in ts:
            t.join(60)
        assert done == [0, 1, 2]
    finally:
        k.stop()


def test_unknown_model_fails_boot_with_names(tmp_path):
    with pytest.raises(RuntimeError, match="known models: gemma3-270m"):
        boot_kernel(tmp_path, model="no-such-model")


def test_corrupt_model_file_fails_boot(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(RuntimeError, match="boot failed"):
        boot_kernel(tmp_path, model=str(bad))


@pytest.mark.parametrize("policy", ["priority", "fair", "rr"])
def test_policies_on_the_real_device(tmp_path, policy):
    """One slot, two processes started together. priority: the nice -10 one
    finishes first although it started second; fair and rr: both advance
    (the first to start does not run to completion before the other starts)."""
    k = boot_kernel(tmp_path, "--slots", "1", "--n-ctx", "256", "--policy", policy,
                    "--quantum", "4", model="gemma3-270m")
    prog = textwrap.dedent("""
        import llmagentos, time
        c = llmagentos.connect()
        c.llm.generate("Count slowly:", None, {"max_tokens": 40, "temperature": 0})
        print(time.time())
    """)
    try:
        with k.client() as c:
            low = c.proc.spawn([PY, "-c", prog], "low", None, None, None, None, 10)
            time.sleep(0.3)
            high = c.proc.spawn([PY, "-c", prog], "high", None, None, None, None, -10) \
                if policy == "priority" else c.proc.spawn([PY, "-c", prog], "second")
            for p in (low, high):
                assert c.proc.wait(p, 120)["exit_code"] == 0
            t_low, t_high = (float(c.proc.logs(p)["data"]) for p in (low, high))
            st = c.sys.stats()["device"]
        if policy == "priority":
            assert t_high < t_low
        else:
            assert st["preemptions"] >= 1  # they took turns on the one slot
    finally:
        k.stop()


# -- every sampling parameter, through llm.generate ----------------------------------------

DAYS = "The list of the days of the week: Monday, Tuesday,"


def _gen(c, prompt=DAYS, **params):
    return c.llm.generate(prompt, None, {"max_tokens": 48, **params})


def _repeats(text: str) -> int:
    words = text.split()
    return len(words) - len(set(words))


@pytest.fixture(scope="module")
def days(llm_kernel):
    """Greedy and seeded hot continuations of DAYS, without any other parameter."""
    with llm_kernel.client() as c:
        return {"greedy": _gen(c, temperature=0),
                "hot": {s: _gen(c, temperature=1.5, seed=s)["text"] for s in (1, 2)}}


def test_temperature_and_seed(llm_kernel, days):
    greedy, hot = days["greedy"]["text"], days["hot"]
    assert _repeats(greedy) >= 8  # the greedy continuation loops over the week
    with llm_kernel.client() as c:
        assert _gen(c, temperature=0, seed=7)["text"] == greedy  # no randomness at 0
        assert _gen(c, temperature=1.5, seed=1)["text"] == hot[1]  # a seed reproduces
    assert hot[1] != hot[2] and greedy not in hot.values()


@pytest.mark.parametrize("cut", [{"top_k": 1}, {"top_p": 0.0}, {"min_p": 1.0}],
                         ids=["top_k", "top_p", "min_p"])
def test_truncation_to_the_top_token_is_greedy(llm_kernel, days, cut):
    """top_k=1, top_p=0 and min_p=1 each keep only the most likely token: hot sampling
    then equals greedy decoding, which the same seed without the cut does not."""
    with llm_kernel.client() as c:
        text = _gen(c, temperature=1.5, seed=1, **cut)["text"]
    assert text == days["greedy"]["text"] != days["hot"][1]


@pytest.mark.parametrize("penalty", [{"repeat_penalty": 1.5}, {"frequency_penalty": 3.0},
                                     {"presence_penalty": 3.0}],
                         ids=["repeat_penalty", "frequency_penalty", "presence_penalty"])
def test_penalties_work_and_reduce_repetition(llm_kernel, days, penalty):
    """These used to fail with EIO (a TypeError: the sampler call lacked n_vocab)."""
    with llm_kernel.client() as c:
        penalized = _gen(c, temperature=0, **penalty)
    assert penalized["usage"]["completion_tokens"] > 10
    assert _repeats(penalized["text"]) < _repeats(days["greedy"]["text"]) / 2


def test_repeat_last_n_is_the_penalty_window(llm_kernel, days):
    plain = days["greedy"]["text"]
    with llm_kernel.client() as c:
        off = _gen(c, temperature=0, repeat_penalty=1.5, repeat_last_n=0)["text"]
        wide = _gen(c, temperature=0, repeat_penalty=1.5, repeat_last_n=64)["text"]
    assert off == plain  # an empty window penalizes nothing
    assert _repeats(wide) < _repeats(plain) / 2


def test_stop_truncates_and_max_tokens_bounds(llm_kernel, days):
    full = days["greedy"]["text"]
    assert "\n" in full
    with llm_kernel.client() as c:
        cut = _gen(c, temperature=0, stop=["\n"])
        short = _gen(c, temperature=0, max_tokens=5)
    assert cut["finish_reason"] == "stop" and "\n" not in cut["text"]
    assert full.startswith(cut["text"]) and len(cut["text"]) < len(full)
    assert short["finish_reason"] == "length" and short["usage"]["completion_tokens"] == 5
    assert full.startswith(short["text"])


def test_grammar_and_json_schema_constrain_sampled_output(llm_kernel):
    with llm_kernel.client() as c:
        r = _gen(c, "Pick a day:", temperature=1.0, seed=3,
                 grammar='root ::= " " ("Monday" | "Friday") "."')
        assert r["text"] in (" Monday.", " Friday.")
        schema = {"type": "object", "properties": {"day": {"enum": ["Mon", "Tue"]}},
                  "required": ["day"]}
        r = _gen(c, "A day as JSON:", temperature=1.0, seed=3, json_schema=schema)
    assert json.loads(r["text"])["day"] in ("Mon", "Tue")
