"""Shared context blocks: named texts several agents read and write, each write a
new whole version; compare-and-set writes; rights by capability; attached
blocks shown in generation from context; durable across a kernel crash."""

from __future__ import annotations

import signal
import threading

import pytest
from conftest import boot_kernel

import llmagentos
from llmagentos import ERRORS


@pytest.fixture(scope="module")
def sim_kernel(tmp_path_factory):
    """A kernel with the simulated device: generation without a model."""
    k = boot_kernel(tmp_path_factory.mktemp("blocks"), "--n-ctx", "8192", model="sim")
    yield k
    k.stop()


def as_process(kernel, caps: list[str] | None, name: str | None = None):
    """A connection as a new child of the shell holding ``caps``."""
    with kernel.client() as c:
        child = c.proc.attach(name, caps)
    return llmagentos.connect(token=child["token"], run_dir=kernel.run_dir)


def test_a_reader_never_sees_a_half_written_version(sim_kernel):
    writers, readers, writes_each = 4, 4, 25
    written: dict[int, str] = {0: ""}
    reads: list[list[tuple[int, str]]] = [[] for _ in range(readers)]
    done = threading.Event()
    errors: list[BaseException] = []
    with sim_kernel.client() as c:
        c.ctx.block_open("board", True)

    def write(w: int) -> None:
        try:
            with as_process(sim_kernel, ["ctx", "ctx.block.write:board"]) as p:
                for i in range(writes_each):
                    # big enough that a torn write would show: one letter per writer
                    text = f"{w}:{i}:" + chr(ord("a") + w) * 20_000 + f":{w}:{i}"
                    written[p.ctx.block_write("board", text)["version"]] = text
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    def read(r: int) -> None:
        try:
            with as_process(sim_kernel, ["ctx", "ctx.block.read:board"]) as p:
                while not done.is_set():
                    b = p.ctx.block_read("board")
                    reads[r].append((b["version"], b["text"]))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    rs = [threading.Thread(target=read, args=(r,)) for r in range(readers)]
    ws = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in rs + ws:
        t.start()
    for t in ws:
        t.join(60)
    done.set()
    for t in rs:
        t.join(60)
    assert not errors, errors
    assert sorted(written) == list(range(writers * writes_each + 1))  # one version each
    for seen in reads:
        assert seen
        for version, text in seen:
            assert text == written[version]  # some written version, whole
        versions = [v for v, _ in seen]
        assert versions == sorted(versions)  # and never an older one after a newer one
    assert sum(len(s) for s in reads) > readers  # they read while the writers wrote
    with sim_kernel.client() as c:
        last = c.ctx.block_read("board")
        assert last["version"] == writers * writes_each and last["text"] == written[100]


def test_compare_and_set_loses_no_update(sim_kernel):
    with sim_kernel.client() as c:
        c.ctx.block_open("counter", True)
        c.ctx.block_write("counter", "0", 0)
        with pytest.raises(ERRORS["EAGAIN"], match="version 1, not 0"):
            c.ctx.block_write("counter", "stale", 0)
        assert c.ctx.block_read("counter")["text"] == "0"  # the stale write changed nothing

    conflicts = []

    def increment(n: int) -> None:
        with as_process(sim_kernel, ["ctx", "ctx.block.write:counter"]) as p:
            for _ in range(n):
                while True:
                    b = p.ctx.block_read("counter")
                    try:
                        p.ctx.block_write("counter", str(int(b["text"]) + 1), b["version"])
                        break
                    except ERRORS["EAGAIN"]:
                        conflicts.append(1)

    ts = [threading.Thread(target=increment, args=(15,)) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    with sim_kernel.client() as c:
        b = c.ctx.block_read("counter")
    assert b["text"] == "60" and b["version"] == 61  # each success one version, no more


def test_rights_come_from_capabilities(sim_kernel):
    with sim_kernel.client() as c:
        c.ctx.block_open("team-plan", True)
        c.ctx.block_write("team-plan", "ship friday")
        c.ctx.block_open("secret", True)
    with as_process(sim_kernel, ["ctx"]) as none:
        for call in (lambda: none.ctx.block_read("team-plan"),
                     lambda: none.ctx.block_open("team-plan", False),
                     lambda: none.ctx.block_open("new-one", True),
                     lambda: none.ctx.block_write("team-plan", "x"),
                     lambda: none.ctx.block_attach("team-plan"),
                     lambda: none.ctx.block_delete("team-plan")):
            with pytest.raises(ERRORS["EACCES"], match="ctx.block"):
                call()
        assert none.ctx.block_list() == []
    with as_process(sim_kernel, ["ctx", "ctx.block.read:team-plan"]) as reader:
        assert reader.ctx.block_read("team-plan")["text"] == "ship friday"
        assert reader.ctx.block_open("team-plan", True)["version"] == 1  # opens, no create
        with pytest.raises(ERRORS["EACCES"], match="ctx.block.write:team-plan"):
            reader.ctx.block_write("team-plan", "ship monday")
        with pytest.raises(ERRORS["EACCES"]):
            reader.ctx.block_delete("team-plan")
        with pytest.raises(ERRORS["EACCES"]):
            reader.ctx.block_read("secret")
        assert [b["name"] for b in reader.ctx.block_list()] == ["team-plan"]
    with as_process(sim_kernel, ["ctx", "ctx.block.read:team-*"]) as reader:
        with pytest.raises(ERRORS["EACCES"], match="ctx.block.write:team-new"):
            reader.ctx.block_open("team-new", True)  # reading is not creating
        with pytest.raises(ERRORS["ENOENT"]):
            reader.ctx.block_read("team-new")
    with as_process(sim_kernel, ["ctx", "proc.spawn", "ctx.block.write:team-*"]) as lead:
        lead.ctx.block_write("team-plan", "ship monday")  # a glob covers the name
        lead.ctx.block_open("team-notes", True)
        with pytest.raises(ERRORS["EACCES"]):
            lead.ctx.block_read("secret")
        # block rights are shared by name: a child gets none unless its spawner names them
        kid = lead.proc.attach(None, None)
        with llmagentos.connect(token=kid["token"], run_dir=sim_kernel.run_dir) as k:
            assert not any(cap.startswith("ctx.block") for cap in k.proc.stat()["caps"])
            with pytest.raises(ERRORS["EACCES"]):
                k.ctx.block_read("team-plan")
        with pytest.raises(ERRORS["EACCES"]):  # nor more than its spawner holds
            lead.proc.attach(None, ["ctx.block.read:secret"])
        kid = lead.proc.attach(None, ["ctx", "ctx.block.read:team-plan"])
        with llmagentos.connect(token=kid["token"], run_dir=sim_kernel.run_dir) as k:
            assert k.ctx.block_read("team-plan")["text"] == "ship monday"


def test_bad_input_gets_errnos(sim_kernel):
    with sim_kernel.client() as c:
        for name in ("", "a b", "x:y", "*", "team-*", "-lead", "x" * 129, "a\nb"):
            with pytest.raises(ERRORS["EINVAL"], match="block name"):
                c.ctx.block_open(name, True)
        with pytest.raises(ERRORS["ENOENT"]):
            c.ctx.block_open("nowhere", False)
        with pytest.raises(ERRORS["ENOENT"]):
            c.ctx.block_read("nowhere")
        with pytest.raises(ERRORS["ENOENT"]):
            c.ctx.block_write("nowhere", "x")
        c.ctx.block_open("big", True)
        with pytest.raises(ERRORS["E2BIG"]):
            c.ctx.block_write("big", "x" * (64 * 1024 + 1))
        c.ctx.block_write("big", "é" * (32 * 1024))  # 64 KiB of UTF-8 exactly
        with pytest.raises(ERRORS["EINVAL"]):
            c.ctx.block_write("big", "x", -1)
        with pytest.raises(ERRORS["ENOENT"], match="not attached"):
            c.ctx.block_detach("big")
        for i in range(16):
            c.ctx.block_open(f"many{i}", True)
            c.ctx.block_attach(f"many{i}")
        c.ctx.block_attach("many0")  # again: no change
        c.ctx.block_open("many16", True)
        with pytest.raises(ERRORS["EMFILE"]):
            c.ctx.block_attach("many16")
        for i in range(16):
            c.ctx.block_detach(f"many{i}")
        c.ctx.block_delete("big")
        with pytest.raises(ERRORS["ENOENT"]):
            c.ctx.block_read("big")


def test_generation_from_context_shows_the_attached_blocks(sim_kernel):
    fact = "The launch code is 7391. " * 40
    with sim_kernel.client() as c:
        c.ctx.block_open("facts", True)
        c.ctx.block_write("facts", fact)
    params = {"max_tokens": 4, "temperature": 0}
    with as_process(sim_kernel, ["llm", "ctx", "ctx.block.read:facts"], name="reader") as p:
        p.ctx.append("system", "You are terse.", True)
        before = p.llm.generate("Hi?", None, params, False, True)["usage"]["prompt_tokens"]
        p.ctx.block_attach("facts")
        win = p.ctx.window()
        assert [m["kind"] for m in win[:2]] == ["message", "block"]  # after the system text
        assert win[1]["content"].endswith(fact) and win[1]["version"] == 1
        after = p.llm.generate("Hi?", None, params, False, True)["usage"]["prompt_tokens"]
        # the simulated device's tokens are bytes: the whole block went into the prompt
        assert after - before >= len(fact)
        assert [b["attached"] for b in p.ctx.block_list()] == [True]
        with sim_kernel.client() as c:
            c.ctx.block_write("facts", "The launch code changed.")
        assert p.ctx.window()[1]["content"].endswith("The launch code changed.")
    # The agent's context (and what is attached to it) outlives the process; a later
    # process of it without the right to read the block is told, not silently served.
    with as_process(sim_kernel, ["llm", "ctx"], name="reader") as p:
        with pytest.raises(ERRORS["EACCES"], match="ctx.block.read:facts"):
            p.llm.generate("Hi?", None, params, False, True)
        p.ctx.block_detach("facts")
        assert p.llm.generate("Hi?", None, params, False, True)["text"]


def test_blocks_survive_a_kernel_crash(tmp_path):
    k = boot_kernel(tmp_path)
    with k.client() as c:
        c.ctx.block_open("durable", True)
        c.ctx.block_write("durable", "v1")
        c.ctx.block_write("durable", "v2")
    k.proc.send_signal(signal.SIGKILL)  # acknowledged writes are committed
    k.proc.wait()
    k = boot_kernel(tmp_path)
    try:
        with k.client() as c:
            b = c.ctx.block_read("durable")
            assert (b["version"], b["text"]) == (2, "v2")
    finally:
        k.stop()


def test_a_write_right_covers_reading_and_none_is_inherited_by_default():
    from llmagentos.syscalls.caps import covers, default_child
    assert covers(["ctx.block.write:team-*"], "ctx.block.read:team-plan")
    assert covers(["ctx.block.write:team-*"], "ctx.block.read:team-*")
    assert not covers(["ctx.block.read:team-*"], "ctx.block.write:team-plan")
    assert not covers(["ctx.block.write:a"], "ctx.block.read:b")
    assert default_child(["ctx", "ctx.block.read:x", "ctx.block.write:y"]) == ["ctx"]
    assert not any(c.startswith("ctx.block") for c in default_child(["*"]))
