"""The graph-safe decode path on CPU: in-place state, device positions, fixed-capacity full layers, generate_fast.

CUDA graphs themselves need a GPU (tests/gpu/test_decode_graph_gpu.py replays them); here the same code runs eagerly
and must equal the parallel forward and `model.generate`, and must keep every state tensor at its address (what a
captured graph relies on).
"""

from __future__ import annotations

import pytest
import torch

from nha_convert import NHACache, NHAError, NHASettings, convert, generate_fast
from nha_convert.compat import output_cache
from nha_convert.decode_graph import GraphedDecodeStep
from nha_convert.ops.recurrent import FULL_GROW
from tests.helpers.models import batch, max_diff, tiny

SCHEDULES = [
    NHASettings(window=4, slots=8, sinks=3, full_layers=[1]),
    NHASettings(window=0, slots=8, sinks=2, full_layers=[0]),
    NHASettings(window=5, slots=0, sinks=0),
]


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


@pytest.mark.parametrize("settings", SCHEDULES, ids=lambda s: f"w{s.window}-s{s.sinks}-full{s.full_layers}")
@pytest.mark.parametrize("pad,prefill", [((0, 3, 5), 6), ((0, 3, 5), 15), ((0, 0, 0), 1)])
def test_static_decode_steps_equal_the_parallel_forward(settings, pad, prefill):
    """Prefill into a reserved cache, then decode through the graph path's step (static inputs, no mask: decoded
    tokens are real, the prompt's left padding lives in the state; positions advanced in place): the logits equal
    one parallel forward over the whole left-padded batch."""
    model = convert(tiny(), settings)
    ids, mask = batch(t=24, pad=pad)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False).logits
        cache = NHACache(model.config, capacity=ids.shape[1])
        pos = _positions(mask)
        first = model(ids[:, :prefill], attention_mask=mask[:, :prefill], position_ids=pos[:, :prefill],
                      past_key_values=cache, logits_to_keep=1).logits
        step = GraphedDecodeStep(model, cache, pos[:, prefill - 1:prefill] + 1, graph=False)
        outs = [step(ids[:, t:t + 1]).clone() for t in range(prefill, ids.shape[1])]
    assert max_diff(full[:, prefill - 1:prefill], first, mask[:, prefill - 1:prefill]) <= 1e-4
    assert max_diff(full[:, prefill:], torch.cat(outs, 1), mask[:, prefill:]) <= 1e-4
    for layer in cache.layers:
        assert int(layer.state.pos) == layer.state.seen == ids.shape[1]


def test_decode_steps_keep_every_state_tensor_in_place():
    """What a captured graph relies on: after a reserve, no step reallocates or rebinds any state tensor."""
    model = convert(tiny(), NHASettings(window=3, slots=8, sinks=2, full_layers=[0]))
    ids, mask = batch(t=20)
    with torch.no_grad():
        cache = NHACache(model.config, capacity=20)
        model(ids[:, :6], attention_mask=mask[:, :6], past_key_values=cache)
        states = [layer.state for layer in cache.layers]
        ptrs = [[t.data_ptr() for t in s.tensors()] + [s.pos.data_ptr()] for s in states]
        for t in range(6, 20):
            model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache)
    assert [[t.data_ptr() for t in s.tensors()] + [s.pos.data_ptr()] for s in states] == ptrs
    assert states[0].capacity == 20 and states[1].capacity is None


def test_full_layer_buffer_grows_in_blocks_and_reserve_changes_nothing():
    """Without a reserve a full layer grows by whole blocks; masked spare capacity leaves logits unchanged."""
    model = convert(tiny(), NHASettings(window=4, slots=8, full_layers=[0, 2]))
    ids, mask = batch(t=16)
    outs = {}
    with torch.no_grad():
        for cap in (0, 300):
            cache = NHACache(model.config, capacity=cap)
            model(ids[:, :10], attention_mask=mask[:, :10], past_key_values=cache)
            outs[cap] = torch.cat([model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1],
                                         past_key_values=cache).logits for t in range(10, 16)], 1)
            assert cache.layers[0].state.capacity == (FULL_GROW if cap == 0 else 300)
    assert max_diff(outs[0], outs[300], mask[:, 10:]) <= 1e-5


@pytest.mark.parametrize("settings", SCHEDULES[:2], ids=["w4-full1", "w0-full0"])
def test_generate_fast_equals_generate(settings):
    model = convert(tiny(), settings)
    ids, mask = batch(t=12, pad=(0, 3, 5))
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=9, do_sample=False, pad_token_id=0,
                             eos_token_id=None)
    out = generate_fast(model, ids, mask, max_new_tokens=9)
    assert torch.equal(out, ref)


def test_generate_fast_stops_at_eos_like_generate():
    model = convert(tiny(seed=3), NHASettings(window=4, slots=8, full_layers=[1]))
    ids, mask = batch(t=10, pad=(0, 2, 4))
    with torch.no_grad():
        free = generate_fast(model, ids, mask, max_new_tokens=12)
        eos = int(free[0, 13])  # a token row 0 produces: it ends there, other rows go on (or end too)
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                             eos_token_id=eos)
    out = generate_fast(model, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, ref)


def test_generate_fast_refuses_a_base_model():
    with pytest.raises(NHAError, match="NHA models"):
        generate_fast(tiny(), torch.zeros(1, 3, dtype=torch.long))


def test_generate_sizes_full_layer_buffers_for_the_whole_generation():
    model = convert(tiny(), NHASettings(window=4, slots=8, full_layers=[0]))
    ids, mask = batch(t=12)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True)
    assert output_cache(out).layers[0].state.capacity == 17  # prompt + new tokens: no growth while decoding
