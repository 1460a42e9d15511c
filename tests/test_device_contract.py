"""One conformance suite for every device the scheduler drives: the
simulated device (drivers/simdevice.py) and the real llama.cpp device
(drivers/device.py is the contract)."""

from __future__ import annotations

import pytest

from llmagentos.drivers.device import (
    Attach,
    ComputeDevice,
    Copy,
    Detach,
    Prepare,
    Release,
    Save,
    apply,
)
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

    class Snap:  # what kernel/kvstore hands the device
        def __init__(self, tokens, data):
            self.tokens, self._data = tokens, data

        def load(self):
            return self._data
    from llmagentos.drivers.device import Restore
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
