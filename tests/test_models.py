"""Several models in one kernel: each loaded model is a device with its own run
queue; a process picks one per request, or has a default (proc.spawn/attach
``model``, inherited); llm.load/llm.unload under llm.admin within a memory
budget; registry aliases; one ENOENT for an unknown name."""

from __future__ import annotations

import glob
import importlib.util
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import trio
from conftest import boot_kernel

import llmagentos
from llmagentos.drivers.models import ModelRegistry
from llmagentos.drivers.sampling import SamplingParams
from llmagentos.kernel import sysllm
from llmagentos.kernel.modeltable import Loaded
from llmagentos.kernel.proc import PCB
from llmagentos.syscalls.errno import SyscallError

ONE = {"max_tokens": 4, "temperature": 0.0}


def _conf(tmp_path, body: str):
    conf = tmp_path / "kernel.toml"
    conf.write_text(textwrap.dedent(body))
    return conf


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """The packaged Gemma twice, under two names, plus an alias."""
    from llmagentos.drivers.models import packaged_gemma_path

    tmp = tmp_path_factory.mktemp("two")
    conf = _conf(tmp, f"""
        load = ["gemma-b"]
        aliases = {{ "gpt-3" = "gemma3-270m" }}
        [models.gemma-b]
        path = "{packaged_gemma_path()}"
    """)
    k = boot_kernel(tmp, "--config", str(conf), "--slots", "4", "--n-ctx", "512",
                    model="gemma3-270m")
    yield k
    k.stop()


@pytest.fixture
def sim_models(tmp_path):
    """Simulated devices (no weights): run-time loading, unloading, budgets."""
    conf = _conf(tmp_path, """
        [models.sim-b]
        kind = "sim"
        [models.sim-slow]
        kind = "sim"
        decode_ms = 20
        [models.remote]
        kind = "openai"
        base_url = "http://127.0.0.1:9/v1"
        api_key_env = "SECRET_KEY_VAR"
    """)
    k = boot_kernel(tmp_path, "--config", str(conf), "--slots", "4", "--n-ctx", "256",
                    "--model-memory", "1000000", model="sim")
    yield k
    k.stop()


@pytest.mark.model
def test_two_devices_serve_two_agents_at_once(two_models):
    with two_models.client() as c:
        rows = {r["name"]: r for r in c.llm.models()}
        assert rows["gemma3-270m"]["loaded"] and rows["gemma-b"]["loaded"]
        assert rows["gemma3-270m"]["default"] and not rows["gemma-b"]["default"]
        assert rows["gemma-b"]["n_ctx"] == 512 and rows["gemma3-270m"]["aliases"] == ["gpt-3"]
        assert not rows["sim"]["loaded"] and "device" not in rows["sim"]
        before = c.sys.stats()["devices"]
        agents = [llmagentos.Agent(model_name=m, client=c)
                  for m in ("gemma3-270m", "gemma-b", "gemma3-270m", "gemma-b")]
        assert [a.model_name for a in agents] == ["gemma3-270m", "gemma-b"] * 2
        out: dict[int, dict] = {}

        def go(i: int, a) -> None:
            out[i] = a.client.llm.generate("The sea is", None, {"max_tokens": 8,
                                                                "temperature": 0.0})

        threads = [threading.Thread(target=go, args=(i, a)) for i, a in enumerate(agents)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert [out[i]["model"] for i in range(4)] == ["gemma3-270m", "gemma-b"] * 2
        after = c.sys.stats()["devices"]
        for name in ("gemma3-270m", "gemma-b"):  # both devices stepped
            assert after[name]["steps"] > before[name]["steps"]
            assert after[name]["tokens_out"] - before[name]["tokens_out"] >= 2 * 8 - 2
        # the same weights and greedy sampling: the same text on either device
        assert out[0]["text"] == out[1]["text"]


@pytest.mark.model
def test_per_request_choice_and_alias(two_models):
    with two_models.client() as c:
        assert c.llm.generate("Hi", None, {**ONE, "model": "gemma-b"})["model"] == "gemma-b"
        assert c.llm.generate("Hi", None, {**ONE, "model": "gpt-3"})["model"] == "gemma3-270m"
        assert c.llm.generate("Hi", None, ONE)["model"] == "gemma3-270m"
        emb = c.llm.embed(["hello"], "gemma-b")
        assert len(emb) == 1 and len(emb[0]) > 100
        # a process's context works with either model (each one's chat template)
        a = llmagentos.Agent(model_name="gemma-b", client=c)
        r = a.client.llm.generate("Say hi.", None, {"max_tokens": 4}, False, True)
        assert r["model"] == "gemma-b" and r["ctx"]["id"]
        r = a.client.llm.generate("Again.", None, {"max_tokens": 4, "model": "gemma3-270m"},
                                  False, True)
        assert r["model"] == "gemma3-270m"
        for bad in (1, "", ["gemma-b"]):
            with pytest.raises(llmagentos.KernelError) as e:
                c.llm.generate("Hi", None, {**ONE, "model": bad})
            assert e.value.name == "EINVAL"


@pytest.mark.model
def test_a_spawned_default_is_inherited_by_a_grandchild(two_models):
    prog = textwrap.dedent("""
        import llmagentos
        c = llmagentos.connect()
        child = llmagentos.Agent(client=c)           # no model: the spawned one's
        grand = llmagentos.Agent(client=child.client)
        r = grand.client.llm.generate("Hi", None, {"max_tokens": 2})
        print(child.model_name, grand.model_name, r["model"])
    """)
    with two_models.client() as c:
        pid = c.proc.spawn([sys.executable, "-c", prog], model="gemma-b")
        assert c.proc.stat(pid)["model"] == "gemma-b"
        st = c.proc.wait(pid, 60)
        assert st["exit_code"] == 0, c.proc.logs(pid)["data"]
        assert c.proc.logs(pid)["data"].decode().split() == ["gemma-b"] * 3
        pid = c.proc.spawn([sys.executable, "-c", "pass"], model="gpt-3")  # an alias
        assert c.proc.stat(pid)["model"] == "gemma3-270m"
        c.proc.wait(pid, 30)


def test_unknown_names_are_enoent_listing_the_known_ones(sim_models):
    with sim_models.client() as c:
        calls = [lambda: c.llm.generate("Hi", None, {"model": "nope"}),
                 lambda: c.proc.spawn([sys.executable, "-c", "pass"], model="nope"),
                 lambda: c.proc.attach(None, None, None, 0, "nope"),
                 lambda: c.llm.embed(["x"], "nope"),
                 lambda: c.llm.load("nope"),
                 lambda: llmagentos.Agent(model_name="nope", client=c)]
        for call in calls:
            with pytest.raises(FileNotFoundError) as e:
                call()
            assert e.value.name == "ENOENT"
            assert "known models: gemma3-270m, remote, sim, sim-b, sim-slow" in e.value.message
            assert "models.toml" in e.value.message
        with pytest.raises(FileNotFoundError, match="known but not loaded"):
            c.llm.generate("Hi", None, {"model": "sim-b"})
        assert c.proc.ps()[-1]["name"] == "init"  # no process was left behind by a refusal


def test_unknown_model_of_a_private_boot_is_the_same_enoent(tmp_path):
    """No kernel running: Agent() checks the name as a kernel would, and leaves no
    temp dirs; an alias from $LLMAGENTOS_CONFIG resolves before the boot."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    conf = _conf(tmp_path, '[models.sim-x]\nkind = "sim"\n')
    prog = textwrap.dedent("""
        import llmagentos
        try:
            llmagentos.Agent(model_name="nope")
        except llmagentos.KernelError as e:
            print(type(e).__name__, e.name, "models.toml" in e.message,
                  "known models: gemma3-270m, sim, sim-x" in e.message)
    """)
    env = {**os.environ, "LLMAGENTOS_RUN_DIR": str(tmp_path / "no-kernel"),
           "LLMAGENTOS_STATE_DIR": str(tmp_path / "state"), "TMPDIR": str(tmp),
           "LLMAGENTOS_CONFIG": str(conf)}
    for k in ("LLMAGENTOS_SOCKET", "LLMAGENTOS_TOKEN"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-c", prog], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [_enoent_class(), "ENOENT", "True", "True"]
    assert glob.glob(str(tmp / "llmagentos-private-*")) == []


def _enoent_class() -> str:
    from llmagentos.errors import ERRORS
    return ERRORS["ENOENT"].__name__


def test_load_and_unload_need_llm_admin(sim_models):
    with sim_models.client() as c:
        child = c.proc.attach("worker")
        with llmagentos.connect(token=child["token"], run_dir=sim_models.run_dir) as cc:
            for call in (lambda: cc.llm.load("sim-b"), lambda: cc.llm.unload("sim-b")):
                with pytest.raises(llmagentos.KernelError) as e:
                    call()
                assert e.value.name == "EACCES" and "llm.admin" in e.value.message
            row = c.llm.load("sim-b")  # init holds every capability
            assert row["loaded"] and row["name"] == "sim-b" and "device" in row
            assert cc.llm.generate("Hi", None, {"max_tokens": 3, "model": "sim-b"})["model"] \
                == "sim-b"
            c.llm.unload("sim-b")
            with pytest.raises(FileNotFoundError, match="known but not loaded"):
                cc.llm.generate("Hi", None, {"max_tokens": 3, "model": "sim-b"})
            with pytest.raises(llmagentos.KernelError) as e:
                c.llm.unload("sim")
            assert e.value.name == "EBUSY"  # the default model stays
            for bad in ("", "a" * 100_000):
                with pytest.raises(llmagentos.KernelError) as e:
                    c.llm.load(bad)
                assert e.value.name in ("EINVAL", "ENOENT")
        # granted by name, llm.admin works for a child too
        admin = c.proc.attach("admin", ["llm", "llm.admin"])
        with llmagentos.connect(token=admin["token"], run_dir=sim_models.run_dir) as ca:
            ca.llm.load("sim-b")
            ca.llm.unload("sim-b")


def test_a_load_past_the_memory_budget_is_enomem(sim_models):
    with sim_models.client() as c:
        with pytest.raises(llmagentos.KernelError) as e:
            c.llm.load("gemma3-270m")
        assert e.value.name == "ENOMEM"
        assert "budget of 1 MB" in e.value.message and "--model-memory" in e.value.message
        assert not next(r for r in c.llm.models() if r["name"] == "gemma3-270m")["loaded"]


def test_unload_while_a_request_runs_fails_it_and_the_other_model_serves(sim_models):
    with sim_models.client() as c:
        c.llm.load("sim-slow")
        got: dict = {}

        def slow() -> None:
            with sim_models.client() as c2:
                try:
                    got["res"] = c2.llm.generate("Hi", None, {"max_tokens": 500,
                                                              "model": "sim-slow"})
                except llmagentos.KernelError as e:
                    got["err"] = e

        t = threading.Thread(target=slow)
        t.start()
        for _ in range(200):  # until it runs on the device
            if c.sys.stats()["devices"]["sim-slow"]["running"]:
                break
            threading.Event().wait(0.02)
        c.llm.unload("sim-slow")
        t.join(30)
        assert "res" not in got
        assert got["err"].name == "ECANCELED" and "sim-slow" in got["err"].message
        assert c.llm.generate("Hi", None, {"max_tokens": 3})["model"] == "sim"
        assert "sim-slow" not in c.sys.stats()["devices"]


def test_a_remote_model_row_and_a_missing_backend(sim_models):
    with sim_models.client() as c:
        row = next(r for r in c.llm.models() if r["name"] == "remote")
        assert row["kind"] == "openai" and row["n_ctx"] is None and not row["loaded"]
        assert "SECRET_KEY_VAR" not in repr(c.llm.models()) and "127.0.0.1" not in repr(row)
        if importlib.util.find_spec("llmagentos.kernel.scheduler.remote") is None:
            with pytest.raises(llmagentos.KernelError) as e:
                c.llm.load("remote")
            assert e.value.name == "EINVAL" and "no backend" in e.value.message


class TextQueue:
    """A queue with the remote API, to check the handler's routing only: it is
    given text, never tokens, and answers with what it was given."""

    def __init__(self) -> None:
        self.calls: list = []

    async def generate(self, owner, prompt, messages, params, *, nice, on_token):
        self.calls.append((owner, prompt, messages, params.max_tokens, nice))
        if on_token is not None:
            on_token("ok")
        return sysllm_result("ok", {"prompt_tokens": 3, "cached_tokens": 0,
                                    "completion_tokens": 1, "device_time": 0.0,
                                    "queue_wait": 0.0})


def sysllm_result(text: str, usage: dict):
    from llmagentos.kernel.scheduler import Result
    return Result(text, [], "stop", usage)


class FakeCall:
    """A call and its connection in one: streamed tokens go to conn.notify_nowait."""

    def __init__(self, pcb) -> None:
        self.caller, self.msgid, self.notes = pcb, 7, []
        self.conn = self

    def notify_nowait(self, method, args) -> None:
        self.notes.append((method, args))


def test_a_remote_kind_gets_text_not_tokens():
    queue = TextQueue()
    entry = Loaded("far", "openai", None, queue)
    pcb = PCB(pid=5, ppid=1, name="a", argv=[], caps=[], token="t", nice=3)
    call = FakeCall(pcb)
    msgs = [{"role": "user", "content": "hello"}]

    async def main():
        r1 = await sysllm.submit(call, entry, "a prompt", None, SamplingParams(max_tokens=2),
                                 True)
        r2 = await sysllm.submit(call, entry, None, msgs, SamplingParams(), False)
        with pytest.raises(SyscallError) as e:
            await sysllm.submit(call, entry, None, [{"role": "x"}], SamplingParams(), False)
        assert e.value.name == "EINVAL"
        return r1, r2

    r1, r2 = trio.run(main)
    assert queue.calls == [(5, "a prompt", None, 2, 3), (5, None, msgs, 256, 3)]
    assert r1["model"] == "far" and r1["text"] == "ok" and call.notes == [("llm.token", [7, "ok"])]
    assert pcb.usage.tokens_in == 6 and pcb.usage.tokens_out == 2


def test_registry_aliases_and_their_errors(tmp_path):
    conf = _conf(tmp_path, 'aliases = { "gpt-3" = "sim" }\n')
    reg = ModelRegistry(conf)
    assert reg.resolve("gpt-3").name == "sim" and "gpt-3" in reg
    for body, needle in [('aliases = { "x" = "nope" }', "must name a model"),
                         ('aliases = { "sim" = "gemma3-270m" }', "already a model name"),
                         ('aliases = "x"', "aliases must be a table"),
                         ('[models.r]\nkind = "openai"\n', "base_url is required"),
                         ('[models.r]\nkind = "openai"\nbase_url = "u"\npath = "p"\n',
                          "do not apply")]:
        with pytest.raises(SyscallError) as e:
            ModelRegistry(_conf(tmp_path, body))
        assert e.value.name == "EINVAL" and needle in e.value.message
