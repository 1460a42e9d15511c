"""One conformance suite for every device the scheduler drives: the
simulated device (drivers/simdevice.py) and the real llama.cpp device
(drivers/device.py is the contract)."""

from __future__ import annotations

import itertools

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmagentos.drivers.device import (
    Attach,
    ComputeDevice,
    Copy,
    Detach,
    EmbedRelease,
    KvCells,
    Prepare,
    Release,
    Restore,
    Save,
    apply,
    run_tick,
)
from llmagentos.drivers.ray_device import op_from_wire, op_to_wire
from llmagentos.drivers.simdevice import SimDevice
from llmagentos.syscalls.errno import SyscallError

PROMPT = [2] + list(range(1000, 1023))  # token ids every vocabulary here has
GREEDY = {"temperature": 0.0, "max_tokens": 4}


@pytest.fixture(params=["sim", "real"])
def dev(request):
    if request.param == "sim":
        d = SimDevice(n_seq_max=4, n_batch=64, n_ctx=1024)
        yield d
        return
    d = request.getfixturevalue("device")  # conftest: the real device, 4 slots
    yield d
    for s in range(d.n_seq_max):
        d.release(s)


class Snap:  # what kernel/kvstore hands the device
    def __init__(self, tokens, data):
        self.tokens, self._data = tokens, data

    def load(self):
        if self._data is None:  # a spill file that cannot be read
            raise OSError("gone")
        return self._data


def _run(dev, slot, prompt, params=GREEDY, limit=40):
    """Prefill and decode one request in `slot`; the sampled tokens."""
    gen = dev.generation(prompt, params)
    apply(dev, Prepare(slot, prompt))
    apply(dev, Attach(slot, gen))
    out = []
    for _ in range(limit):
        res = dev.step([slot])
        out += [e.token for e in res.events if e.slot == slot and e.token is not None]
        if any(e.slot == slot and e.finished for e in res.events) or len(out) >= 4:
            break
    apply(dev, Detach(slot))
    return out


def test_it_is_a_compute_device(dev):
    assert isinstance(dev, ComputeDevice)
    assert dev.n_seq_max >= 3 and dev.n_ctx > len(PROMPT) and dev.n_batch > 0


def test_an_empty_prompt_is_einval(dev):
    with pytest.raises(SyscallError) as e:
        dev.generation([], GREEDY)
    assert e.value.name == "EINVAL"


def test_a_slot_holds_its_prompt_and_what_it_decoded(dev):
    out = _run(dev, 0, PROMPT)
    assert out, "no token sampled"
    held = dev.slot_tokens(0)
    assert held[:len(PROMPT)] == PROMPT and len(held) >= len(PROMPT)


def test_prepare_reuses_the_cached_prefix(dev):
    _run(dev, 0, PROMPT)
    longer = dev.slot_tokens(0) + [1100, 1101]
    reused = apply(dev, Prepare(0, longer))
    assert reused == len(longer) - 2  # only the new suffix is left to prefill
    assert apply(dev, Prepare(1, PROMPT)) == 0  # another slot holds nothing


def test_greedy_output_is_the_same_in_any_slot(dev):
    a = _run(dev, 0, PROMPT)
    apply(dev, Release(0))
    b = _run(dev, 2, PROMPT)
    assert a == b


def test_save_release_restore_round_trip(dev):
    _run(dev, 0, PROMPT)
    tokens, data = apply(dev, Save(0, "k"))
    assert tokens == dev.slot_tokens(0) and len(data) > 0
    apply(dev, Release(0))
    assert dev.slot_tokens(0) == []

    assert apply(dev, Restore(1, Snap(tokens, data))) > 0  # bytes loaded; 0: did not fit
    assert dev.slot_tokens(1) == tokens
    # and it decodes on from there exactly as before
    longer = tokens + [1100]
    assert apply(dev, Prepare(1, longer)) == len(tokens)


def test_copy_prefix_shares_a_prompt(dev):
    _run(dev, 0, PROMPT)
    n = len(PROMPT) - 4
    got = apply(dev, Copy(0, 2, n))
    assert got == n and dev.slot_tokens(2) == PROMPT[:n]
    assert apply(dev, Prepare(2, PROMPT)) == n


def test_the_kv_pool_counts_held_cells_and_a_shared_prefix_once(dev):
    assert dev.kv_size >= dev.n_ctx and dev.kv_used() == 0
    _run(dev, 0, PROMPT)
    n0 = len(dev.slot_tokens(0))
    assert dev.kv_used() == n0 and dev.exclusive_cells()[0] == n0
    apply(dev, Copy(0, 1, 10))  # shares 10 cells: nothing new is held
    assert dev.kv_used() == n0 and dev.exclusive_cells()[:2] == [n0 - 10, 0]
    _run(dev, 1, PROMPT[:10] + [1200, 1201, 1202])
    n1 = len(dev.slot_tokens(1))
    assert dev.kv_used() == n0 + n1 - 10
    apply(dev, Prepare(0, PROMPT[:5] + [1300]))  # cut back to 5 cells: 5 still shared
    assert dev.kv_used() == n1 and dev.exclusive_cells()[:2] == [0, n1 - 5]
    tokens, data = apply(dev, Save(1, "k"))
    apply(dev, Release(0))
    apply(dev, Release(1))
    assert dev.kv_used() == 0 and dev.exclusive_cells()[:2] == [0, 0]
    assert apply(dev, Restore(2, Snap(tokens, data))) > 0
    assert dev.kv_used() == n1 == dev.exclusive_cells()[2]
    assert apply(dev, Restore(2, Snap(tokens[:3], data))) == 0  # not these tokens' state
    assert dev.slot_tokens(2) == []  # a restore that fails leaves nothing held
    assert dev.kv_used() == 0


def test_detach_gives_the_generation_back_and_release_empties(dev):
    gen = dev.generation(PROMPT, GREEDY)
    apply(dev, Prepare(3, PROMPT))
    dev.attach(3, gen)
    assert dev.detach(3) is gen
    apply(dev, Release(3))
    assert dev.slot_tokens(3) == []


def test_not_an_operation_is_a_type_error(dev):
    with pytest.raises(TypeError):
        apply(dev, ("save", 0))


def test_a_tick_runs_its_ops_then_steps(dev):
    gen = dev.generation(PROMPT, GREEDY)
    results, step, error = run_tick(dev, [Prepare(0, PROMPT), Attach(0, gen)], [0])
    assert error is None and results == [0, None]
    assert step.fed == {0: len(PROMPT)} and [e.slot for e in step.events] == [0]
    apply(dev, Detach(0))


def test_a_failed_tick_reports_what_ran_before_it(dev):
    gen = dev.generation(PROMPT, GREEDY)
    ops = [Prepare(1, PROMPT), Attach(1, gen), ("release", 1), Release(1)]
    results, step, error = run_tick(dev, ops, [1])
    assert results == [0, None] and isinstance(error, TypeError)
    assert step.events == [] and step.fed == {}  # nothing decoded
    assert dev.detach(1) is gen  # the Release after the failure did not run


def test_every_op_crosses_the_ray_wire_as_plain_data_and_runs_the_same(dev):
    """The Ray device ships a tick's typed ops to its actor as plain data; the actor
    turns them back into typed ops and runs them with apply, as any device does."""
    gen = dev.generation(PROMPT, GREEDY)

    class Mirror:  # the kernel's side of a request that lives in the actor
        id = 7

    gens = {Mirror.id: gen}

    def over_wire(op):
        item = op_to_wire(op)
        msgpack.packb(item)  # nothing but plain data
        back = op_from_wire(item, gens)
        assert type(back) is type(op)
        return apply(dev, back)

    assert over_wire(Prepare(0, PROMPT)) == 0
    over_wire(Attach(0, Mirror()))
    assert any(e.slot == 0 and e.token is not None for e in dev.step([0]).events)
    over_wire(Detach(0))
    tokens, data = over_wire(Save(0, ("req", 1), pinned=True))
    assert tokens == dev.slot_tokens(0) and len(data) > 0
    over_wire(Release(0))
    assert dev.slot_tokens(0) == []
    assert over_wire(Restore(1, Snap(tokens, data))) > 0 and dev.slot_tokens(1) == tokens
    assert over_wire(Copy(1, 2, 5)) == 5 and dev.slot_tokens(2) == tokens[:5]
    # A saved state the kernel cannot read: 0 (prefill instead), the slot untouched,
    # exactly as apply() does with the snapshot itself.
    gone = Snap(tokens, None)
    assert over_wire(Restore(2, gone)) == 0 == apply(dev, Restore(2, gone))
    assert dev.slot_tokens(2) == tokens[:5]
    with pytest.raises(TypeError):
        op_to_wire(EmbedRelease(object()))  # a remote device computes no embeddings
    for bad in (("save",), ("save", 0, 1), ("format", 0), ("attach", 0, 8), ()):
        with pytest.raises((TypeError, KeyError)):
            op_from_wire(bad, gens)


def test_embed_release_gives_a_half_done_text_back(device):
    job = device.embedding(["word " * 200])
    assert device.embed_step(job) > 0 and job.seq is not None  # half done: holds cells
    results, _, error = run_tick(device, [EmbedRelease(job)], [])
    assert error is None and results == [None] and job.seq is None
    while not job.done:  # it starts over, and finishes
        assert device.embed_step(job) > 0
    assert job.vectors and len(job.vectors[0]) > 0


_OPS = st.lists(st.tuples(st.sampled_from(["append", "truncate", "copy", "release"]),
                          st.integers(0, 3), st.integers(0, 3), st.integers(0, 12)),
                max_size=60)


@settings(max_examples=300, deadline=None)
@given(_OPS)
def test_kv_cells_count_what_a_cell_by_cell_model_counts(ops):
    """KvCells against the obvious model: every cell an object, a copy shares them."""
    cells = KvCells(4)
    model: list[list[int]] = [[] for _ in range(4)]
    new = itertools.count()
    for op, a, b, n in ops:
        if op == "append":
            cells.append(a, n)
            model[a] += [next(new) for _ in range(n)]
        elif op == "truncate":
            cells.truncate(a, n)
            del model[a][n:]
        elif op == "copy" and a != b:
            cells.copy(a, b, n)
            model[b] = model[a][:n]
        elif op == "release":
            cells.release(a)
            model[a] = []
        assert cells.used() == len({c for held in model for c in held})
        for slot in range(4):
            others = {c for i, held in enumerate(model) if i != slot for c in held}
            assert cells.exclusive()[slot] == len(set(model[slot]) - others)
