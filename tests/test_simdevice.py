"""The simulated device (drivers/simdevice.py): its text, its clock, its registry
kind, and a whole kernel booted on it (`--model sim`, no llama.cpp compute)."""

from __future__ import annotations

import pytest
import trio
from conftest import boot_kernel

from llmagentos.drivers.device import Attach, Prepare, apply
from llmagentos.drivers.models import ModelRegistry, open_device
from llmagentos.drivers.simdevice import SimDevice
from llmagentos.kernel.scheduler import Scheduler
from llmagentos.syscalls.errno import SyscallError


def alone(dev: SimDevice, prompt: str, max_tokens: int) -> str:
    """What one request produces on a device of its own, stepped by hand."""
    gen = dev.generation(dev.tokenize(prompt), {"max_tokens": max_tokens})
    apply(dev, Prepare(0, gen.prompt_tokens))
    apply(dev, Attach(0, gen))
    while not gen.finished:
        dev.step([0])
    return gen.text


def test_text_is_bytes_and_round_trips():
    dev = SimDevice()
    text = "héllo, wörld ✓"
    toks = dev.tokenize(text)
    assert toks[0] == dev.bos and len(toks) == 1 + len(text.encode())
    assert dev.detokenize(toks) == text
    assert dev.tokenize("<bos>a", add_bos=False, special=True) == [dev.bos, ord("a") + 3]
    assert dev.tokenize("<bos>a", add_bos=False) == [c + 3 for c in b"<bos>a"]
    # the size bound the kernel checks before tokenizing holds: one byte per token
    assert len(dev.tokenize(text, add_bos=False)) == dev.text_bytes_for(len(text.encode()))


@pytest.mark.parametrize("bad", [[-1], [4096], [2, 10**9]])
def test_out_of_vocabulary_ids_are_einval(bad):
    dev = SimDevice()
    for call in (lambda: dev.detokenize(bad), lambda: dev.generation(bad, None)):
        with pytest.raises(SyscallError) as e:
            call()
        assert e.value.name == "EINVAL"


def test_a_lone_surrogate_is_einval_not_a_crash():
    with pytest.raises(SyscallError) as e:
        SimDevice().tokenize("a\ud800b")
    assert e.value.name == "EINVAL"


@pytest.mark.parametrize("kw", [{"n_seq_max": 0}, {"n_seq_max": 10**6}, {"n_ctx": 1},
                                {"n_batch": 0}, {"decode_s": -0.001},
                                {"decode_s": float("nan")}, {"decode_s": True},
                                {"n_seq_max": 2.5}])
def test_bad_sizes_and_times_are_einval(kw):
    with pytest.raises(SyscallError) as e:
        SimDevice(**kw)
    assert e.value.name == "EINVAL"


def test_a_grammar_is_enosys_rather_than_ignored():
    dev = SimDevice()
    for params in ({"grammar": 'root ::= "a"'}, {"json_schema": {"type": "object"}}):
        with pytest.raises(SyscallError) as e:
            dev.generation([2, 100], params)
        assert e.value.name == "ENOSYS"


def test_a_step_takes_its_decode_time_whatever_the_batch():
    dev = SimDevice(n_seq_max=8, decode_s=0.02)
    for n in (1, 8):
        for s in range(n):
            gen = dev.generation([2, 50 + s], {"max_tokens": 5})
            apply(dev, Prepare(s, gen.prompt_tokens))
            apply(dev, Attach(s, gen))
        res = dev.step(range(n))
        assert res.n_decode == n and res.seconds >= 0.02  # the real elapsed time
        for s in range(n):
            dev.release(s)
    assert dev.steps == 2 and dev.wait_seconds >= 0.04
    assert dev.step([0]).seconds < 0.02  # nothing to decode: no wait


async def test_output_is_the_same_alone_and_in_a_batch_of_16(nursery):
    prompts = [f"agent {i}: tell me about the sea" for i in range(16)]
    expected = [alone(SimDevice(1), p, 40) for p in prompts]
    assert len(set(expected)) > 1
    dev = SimDevice(16, n_ctx=256)
    sched = Scheduler(dev)
    await nursery.start(sched.run)
    got: dict[int, str] = {}

    async def one(i: int) -> None:
        res = await sched.generate(i + 1, dev.tokenize(prompts[i]), {"max_tokens": 40})
        got[i] = res.text

    async with trio.open_nursery() as n:
        for i in range(16):
            n.start_soon(one, i)
    assert [got[i] for i in range(16)] == expected
    assert sched.stats()["steps"] < 16 * 40  # they ran batched


def test_embeddings_are_deterministic_unit_vectors():
    dev = SimDevice()
    job = dev.embedding(["abc" * 40, "abd", "zzz"])
    while dev.embed_runnable(job):
        assert 0 < dev.embed_step(job) <= dev.EMBED_CHUNK
    a, b, c = job.vectors
    assert all(abs(sum(x * x for x in v) - 1) < 1e-9 for v in (a, b, c))

    def cos(u, v):
        return sum(x * y for x, y in zip(u, v))
    assert cos(a, b) > cos(a, c)  # shares more of its bytes
    with pytest.raises(SyscallError):
        dev.embedding("not a list")


# --------------------------------------------------------------------------------------
# The registry's kind, and a kernel booted on it


def test_sim_is_a_built_in_model_and_a_registry_kind(tmp_path):
    reg = ModelRegistry()
    assert reg.resolve("sim").kind == "sim"
    assert isinstance(open_device("sim", n_seq_max=3, n_ctx=64), SimDevice)
    conf = tmp_path / "models.toml"
    conf.write_text('[models.sim-2ms]\nkind = "sim"\ndecode_ms = 2\nn_ctx = 512\n')
    dev = open_device("sim-2ms", registry=ModelRegistry(conf), n_seq_max=4)
    assert (dev.model_name, dev.decode_s, dev.n_ctx, dev.n_seq_max) == ("sim-2ms", 0.002, 512, 4)
    from llmagentos.drivers.llama import Device
    with pytest.raises(SyscallError) as e:  # llama.cpp is not handed what it cannot load
        Device("sim")
    assert e.value.name == "EINVAL" and "kind 'sim'" in e.value.message


@pytest.mark.parametrize("entry, needle", [
    ('kind = "tpu"\n', "kind must be one of"),
    ('kind = "sim"\npath = "a.gguf"\n', "do not apply"),
    ('kind = "sim"\nn_gpu_layers = 4\n', "do not apply"),
    ('path = "a.gguf"\ndecode_ms = 2\n', "do not apply"),
    ('kind = "sim"\ndecode_ms = -1\n', "decode_ms"),
    ('kind = "sim"\ndecode_ms = "fast"\n', "decode_ms"),
    ('kind = "sim"\ndecode_ms = true\n', "decode_ms"),
    ('kind = 3\n', "kind must be one of"),
])
def test_bad_sim_entries_are_einval(tmp_path, entry, needle):
    conf = tmp_path / "models.toml"
    conf.write_text("[models.x]\n" + entry)
    with pytest.raises(SyscallError) as e:
        ModelRegistry(conf)
    assert e.value.name == "EINVAL" and needle in e.value.message


def test_a_kernel_boots_on_the_simulated_device_and_generates(tmp_path):
    conf = tmp_path / "kernel.toml"
    conf.write_text('[models.sim-1ms]\nkind = "sim"\ndecode_ms = 1\n')
    k = boot_kernel(tmp_path, "--config", str(conf), "--slots", "4", "--n-ctx", "256",
                    model="sim-1ms")
    try:
        with k.client() as c:
            info = c.sys.uname()
            assert (info["model"], info["slots"], info["n_ctx"]) == ("sim-1ms", 4, 256)
            prompt = "Tell me about the sea."
            pieces: list[str] = []
            res = c.call("llm.generate", prompt, None, {"max_tokens": 24}, True, False,
                         on_notify=lambda method, args: pieces.append(args[1]))
            assert res["text"] == alone(SimDevice(1), prompt, 24)
            assert "".join(pieces) == res["text"] and res["finish_reason"] == "length"
            assert res["usage"]["completion_tokens"] == 24 and res["model"] == "sim-1ms"
            dev = c.sys.stats()["device"]
            assert dev["steps"] >= 24 and dev["device_time"] >= 24 * 0.001
            chat = c.llm.generate(None, [{"role": "user", "content": "hi"}],
                                  {"max_tokens": 4})
            assert len(chat["text"]) == 4
            assert c.llm.detokenize(c.llm.tokenize("ünïcode", False)) == "ünïcode"
            loaded = [m for m in c.llm.models() if m["loaded"]]
            assert [(m["name"], m["kind"]) for m in loaded] == [("sim-1ms", "sim")]
            with pytest.raises(Exception) as e:
                c.llm.generate("x", None, {"grammar": 'root ::= "a"'})
            assert getattr(e.value, "name", None) == "ENOSYS"
    finally:
        assert k.stop() == 0


def test_fast_tokens_share_a_notification_and_slow_ones_do_not(tmp_path):
    """A streamed generation wrote one llm.token frame per token: at GPU speed, a
    syscall and a client wake-up per token for every stream. Tokens that come
    faster than sysllm.STREAM_INTERVAL now share one; the text is unchanged."""
    conf = tmp_path / "kernel.toml"
    conf.write_text('[models.fast]\nkind = "sim"\ndecode_ms = 0\n'
                    '[models.slow]\nkind = "sim"\ndecode_ms = 20\n')
    for model, n in (("fast", 400), ("slow", 12)):
        (tmp_path / model).mkdir()
        k = boot_kernel(tmp_path / model, "--config", str(conf), "--slots", "2",
                        "--n-ctx", "512", model=model)
        try:
            with k.client() as c:
                pieces: list[str] = []
                res = c.call("llm.generate", "Tell me about the sea.", None,
                             {"max_tokens": n}, True, False,
                             on_notify=lambda method, args: pieces.append(args[1]))
        finally:
            k.stop()
        assert "".join(pieces) == res["text"] and res["usage"]["completion_tokens"] == n
        if model == "fast":
            assert len(pieces) < n / 2, len(pieces)
        else:
            assert len(pieces) == n
