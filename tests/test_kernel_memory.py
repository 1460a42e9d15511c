"""The memory manager through the kernel: durable contexts, budgets, paging,
recall, generation from context, long-term memory; on the real model."""

import json
import signal
import textwrap
import time

import pytest
from conftest import PY, boot_kernel, wait_for

import llmagentos


def run_script(c, body, *, name=None, caps=None, limits=None, timeout=120):
    pid = c.proc.spawn([PY, "-c", textwrap.dedent(body)], name, None, None, caps, limits)
    st = c.proc.wait(pid, timeout)
    out = c.proc.logs(pid)["data"].decode()
    assert st["exit_code"] == 0, out
    return out


def test_2000_turns_in_512_tokens_and_recall(llm_kernel):
    body = """
        import json, llmagentos
        c = llmagentos.connect()
        over, paged = 0, 0
        for turn in range(1, 2001):
            if turn == 5:
                text = "Remember this: the vault code is 7391."
            else:
                text = f"Turn {turn}: we talked about the weather and the number {turn * 7}."
            r = c.ctx.append("user" if turn % 2 else "assistant", text)
            paged += r["paged"]
            if turn % 10 == 0 or turn < 50:
                w = c.ctx.window()
                over += sum(m["tokens"] for m in w) > 512
        st = c.ctx.stats()
        hits = c.ctx.search("vault code")
        top = hits[0]
        c.ctx.append("system", "Recalled from memory: " + top["content"])
        r = c.llm.generate("What is the vault code?", None,
                           {"max_tokens": 32, "temperature": 0}, False, True)
        print(json.dumps({"over": over, "paged": paged, "stats": st, "top": top,
                          "answer": r["text"], "budget": st["budget"]}))
    """
    with llm_kernel.client() as c:
        out = json.loads(run_script(c, body, limits={"ctx_tokens": 512}))
    assert out["budget"] == 512 and out["over"] == 0
    assert out["stats"]["live_tokens"] <= 512 and out["stats"]["archived_messages"] > 1900
    assert out["top"]["seq"] == 5 and out["top"]["archived"]
    assert "7391" in out["answer"]


def test_generation_from_context_prefills_only_the_new_turn(llm_kernel):
    body = """
        import json, llmagentos
        c = llmagentos.connect()
        c.ctx.append("system", "You are a terse assistant.", True)
        a = c.llm.generate("Name a fruit.", None, {"max_tokens": 8, "temperature": 0}, False, True)
        b = c.llm.generate("Name a color.", None, {"max_tokens": 8, "temperature": 0}, False, True)
        w = c.ctx.window()
        print(json.dumps({"a": a["usage"], "b": b["usage"], "roles": [m["role"] for m in w]}))
    """
    with llm_kernel.client() as c:
        out = json.loads(run_script(c, body))
    assert out["roles"] == ["system", "user", "assistant", "user", "assistant"]
    b = out["b"]
    assert b["cached_tokens"] >= out["a"]["prompt_tokens"] - 1
    assert b["prompt_tokens"] - b["cached_tokens"] <= 16  # only the new turn


def test_compact_summarizes_through_the_device(llm_kernel):
    body = """
        import json, llmagentos
        c = llmagentos.connect()
        for i in range(12):
            c.ctx.append("user", f"Fact {i}: Alice has {i} apples and likes the color green.")
        before = c.proc.stat()["usage"]["tokens_out"]
        r = c.ctx.compact("summarize", 8)
        after = c.proc.stat()["usage"]["tokens_out"]
        w = c.ctx.window()
        print(json.dumps({"r": r, "spent": after - before, "kinds": [m["kind"] for m in w]}))
    """
    with llm_kernel.client() as c:
        out = json.loads(run_script(c, body))
    assert out["r"]["covered"] == 8 and out["spent"] > 0  # accounted to the process
    assert out["kinds"][0] == "summary" and out["kinds"].count("message") == 4


def test_errnos(llm_kernel):
    body = """
        import llmagentos
        c = llmagentos.connect()
        def err(fn, *a):
            try:
                fn(*a)
                return "ok"
            except llmagentos.KernelError as e:
                return e.name
        print(err(c.ctx.stats, 424242))                  # unknown context
        print(err(c.ctx.append, "user", "word " * 2000))  # one message over the budget
        print(err(c.ctx.append, "wizard", "hi"))          # bad role
        print(err(c.ctx.stats, 1))                        # init's context: foreign
        print(err(c.mem.get, "nope"))
        print(err(c.mem.put, "k", "v", None, "agent:someone-else"))
        print(err(c.mem.put, "k", "v", None, "shared:team"))
        print(err(c.ctx.compact, "shred"))
    """
    with llm_kernel.client() as c:
        c.ctx.append("user", "init's own message")  # context 1 belongs to init
        out = run_script(c, body, limits={"ctx_tokens": 256}, caps=["ctx", "mem", "llm"])
    assert out.split() == ["ENOENT", "EDQUOT", "EINVAL", "EACCES", "ENOENT", "EACCES",
                           "EACCES", "EINVAL"]


def test_shared_memory_needs_capability_and_private_is_private(llm_kernel):
    writer = """
        import llmagentos
        c = llmagentos.connect()
        c.mem.put("plan", {"step": 1}, ["todo"], "shared:team")
        c.mem.put("secret", "mine")
        print("ok")
    """
    reader = """
        import llmagentos
        c = llmagentos.connect()
        print(c.mem.get("plan", "shared:team")["value"]["step"])
        try:
            c.mem.get("secret")
        except FileNotFoundError:
            print("private")
        print(len(c.mem.search("plan", 5, ["todo"], "shared:team")))
    """
    with llm_kernel.client() as c:
        run_script(c, writer, caps=["mem", "mem.shared"])
        assert run_script(c, reader, caps=["mem", "mem.shared"]).split() == ["1", "private", "1"]


CHILD = """
import llmagentos, time
c = llmagentos.connect()
time.sleep(0.5)
print([m["content"] for m in c.ctx.window()])
c.ctx.append("user", "child only")
"""


def test_child_forks_parents_context(llm_kernel):
    body = f"""
        import llmagentos
        c = llmagentos.connect()
        c.ctx.append("user", "The parent's plan is to bake bread.")
        kid = c.proc.spawn([{PY!r}, "-c", {CHILD!r}])
        c.ctx.fork(kid)
        c.proc.wait(kid, 30)
        print(c.proc.logs(kid)["data"].decode().strip())
        print(len(c.ctx.read()))
    """
    with llm_kernel.client() as c:
        out = run_script(c, body).splitlines()
    assert out[0] == "[\"The parent's plan is to bake bread.\"]"
    assert out[1] == "1"  # the child's append went to its copy only


def test_named_context_survives_kernel_crash(tmp_path):
    k = boot_kernel(tmp_path)
    writer = textwrap.dedent("""
        import llmagentos, sys
        c = llmagentos.connect()
        i = 0
        while True:
            r = c.ctx.append("user", f"message {i} from {sys.argv[1]}")
            print(r["seq"], flush=True)   # acknowledged
            i += 1
    """)
    with k.client() as c:
        pids = {f"w{i}": c.proc.spawn([PY, "-c", writer, f"w{i}"], f"w{i}") for i in range(3)}
        wait_for(lambda: all(len(c.proc.logs(p)["data"].split()) > 50 for p in pids.values()),
                 timeout=60)
    k.proc.send_signal(signal.SIGKILL)  # crash mid-append
    k.proc.wait()
    time.sleep(0.5)
    acked = {name: [int(x) for x in (k.state_dir / "logs" / f"{pid}.log").read_text().split()
                    if x.isdigit()]
             for name, pid in pids.items()}
    k2 = boot_kernel(tmp_path)
    try:
        with k2.client() as c:
            for name, seqs in acked.items():
                cid = c.ctx.open(name, False)
                stored = {m["seq"] for m in c.ctx.read(0, None, True, cid)}
                assert set(seqs) <= stored, f"{name} lost acknowledged appends"
            # a process reopening its named context continues it
            cont = textwrap.dedent("""
                import llmagentos
                c = llmagentos.connect()
                r = c.ctx.append("user", "I am back")
                print(r["seq"], c.ctx.stats()["name"])
            """)
            pid = c.proc.spawn([PY, "-c", cont], "w0")
            c.proc.wait(pid, 30)
            seq, name = c.proc.logs(pid)["data"].split()
            assert name == b"w0" and int(seq) > max(acked["w0"])
    finally:
        k2.stop()


def test_anonymous_contexts_go_with_their_process(shared_kernel):
    with shared_kernel.client() as c:
        pid = c.proc.spawn([PY, "-c", "import llmagentos; c = llmagentos.connect(); "
                                      "c.ctx.append('user', 'x'); print(c.proc.stat()['ctx_id'])"])
        c.proc.wait(pid, 30)
        cid = int(c.proc.logs(pid)["data"])
        with pytest.raises(FileNotFoundError):
            c.ctx.stats(cid)
        assert llmagentos  # the module is used above


def test_integers_past_64_bits_are_einval_not_eio(shared_kernel):
    """MessagePack carries ints up to 2**64 - 1; a context id, seq or read
    bound past what SQLite holds is the caller's EINVAL, not the kernel's EIO."""
    with shared_kernel.client() as c:
        c.ctx.append("user", "hello")
        for call in (lambda: c.ctx.read(2**63), lambda: c.ctx.read(0, 2**63),
                     lambda: c.ctx.pin(2**63), lambda: c.ctx.stats(2**64 - 1)):
            with pytest.raises(llmagentos.KernelError) as e:
                call()
            assert e.value.name == "EINVAL", e.value
        assert c.ctx.read(2**63 - 1) == []


def test_archive_is_embedded_when_configured(tmp_path):
    k = boot_kernel(tmp_path, "--embed-memory", "--slots", "2", "--n-ctx", "512",
                    model="gemma3-270m")
    try:
        with k.client() as c:
            cid = c.ctx.open("embedder")
            c.ctx.append("user", "My car is a red convertible.")
            for i in range(40):
                c.ctx.append("user", f"Filler message number {i} about nothing in particular.")
            c.proc.stat()  # the window is small: most of this is archived by now
            st = wait_for(lambda: (s := c.ctx.stats(cid))["embedded_messages"]
                          >= s["archived_messages"] > 0 and s, timeout=60)
            assert st["archived_messages"] > 0
            hits = c.ctx.search("automobile vehicle", 3, cid)  # no word in common
            assert hits  # the vector side answers where full text has nothing
            assert c.ctx.search("convertible", 1, cid)[0]["seq"] == 1
    finally:
        k.stop()
