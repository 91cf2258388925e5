"""Exact heads (`--full-heads`): KV heads at full attention inside NHA layers.

All heads full equals the base model; mixed heads with a window covering the input equal it too; prefill + decode
(left padding, the graph path's static steps, generate_fast) equals the parallel forward; the decode-state formula
equals the real cache; save / load keeps the heads; bad input is one line; auto:K records K heads and their scores.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import nha_convert
from nha_convert import NHACache, NHAError, NHASettings, convert, generate_fast
from nha_convert.cache import HeadGroupsState
from nha_convert.decode_graph import GraphedDecodeStep
from nha_convert.finetune.recipe import parse_recipe
from nha_convert.head_selection import far_copy_mass
from nha_convert.memory import nha_state_bytes
from tests.helpers.cli import one_line_error, run_convert as run
from tests.helpers.models import batch, max_diff, prefill_then_decode, tiny

EVERY_HEAD = "0:0,0:1,1:0,1:1,2:0,2:1"  # tiny(): 3 layers of 2 KV heads (6 query heads: GQA 3)
MIXED = NHASettings(window=4, slots=8, sinks=2, full_heads="0:1,2:0", slot_bias=-1.0)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_every_head_full_equals_the_base_model(arch):
    base = tiny(arch)
    ids, mask = batch()
    with torch.no_grad():
        ref = base(ids, attention_mask=mask).logits
        nha = convert(copy.deepcopy(base), NHASettings(window=3, slots=8, sinks=1, full_heads=EVERY_HEAD))
        out = nha(ids, attention_mask=mask).logits
    assert all(layer.self_attn.full_heads == (0, 1) for layer in nha.model.layers)
    assert max_diff(ref, out, mask) <= 1e-5


def test_mixed_heads_with_a_window_covering_the_input_equal_the_base_model():
    base = tiny()
    ids, mask = batch()
    with torch.no_grad():
        ref = base(ids, attention_mask=mask).logits
        nha = convert(copy.deepcopy(base), NHASettings(window=64, slots=8, sinks=2, full_heads="0:1,2:0"))
        out = nha(ids, attention_mask=mask).logits
    assert max_diff(ref, out, mask) <= 1e-5


def test_mixed_heads_differ_from_all_nha_only_in_their_heads():
    """The split is real: full heads change the output of a short window, and the NHA heads are the NHA layer's."""
    base = tiny()
    ids, mask = batch()
    with torch.no_grad():
        mixed = convert(copy.deepcopy(base), MIXED)(ids, attention_mask=mask).logits
        plain = convert(copy.deepcopy(base), NHASettings(window=4, slots=8, sinks=2, slot_bias=-1.0))(
            ids, attention_mask=mask).logits
    assert max_diff(mixed, plain, mask) > 1e-3


@pytest.mark.parametrize("prefill", [1, 9])
def test_mixed_heads_prefill_then_decode_equals_full_forward(prefill):
    model = convert(tiny(), MIXED)
    ids, mask = batch(t=24)
    full, stepped, cache = prefill_then_decode(model, ids, mask, prefill)
    assert isinstance(cache.layers[0].state, HeadGroupsState) and not isinstance(cache.layers[1].state,
                                                                                   HeadGroupsState)
    assert max_diff(full, stepped, mask) <= 1e-4


def test_mixed_heads_static_decode_steps_stay_in_place_and_equal_the_forward():
    """The graph path's steps (no mask, device positions) on a reserved cache: equal to the parallel forward, and no
    state tensor of either head group is reallocated (what a captured CUDA graph relies on)."""
    model = convert(tiny(), MIXED)
    ids, mask = batch(t=20, pad=(0, 3, 5))
    pos = _positions(mask)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        cache = NHACache(model.config, capacity=20)
        model(ids[:, :6], attention_mask=mask[:, :6], position_ids=pos[:, :6], past_key_values=cache)
        groups = cache.layers[0].state.states
        ptrs = [[t.data_ptr() for t in s.tensors()] + [s.pos.data_ptr()] for s in groups]
        step = GraphedDecodeStep(model, cache, pos[:, 5:6] + 1, graph=False)
        outs = [step(ids[:, t:t + 1]).clone() for t in range(6, 20)]
    assert max_diff(full[:, 6:], torch.cat(outs, 1), mask[:, 6:]) <= 1e-4
    assert [[t.data_ptr() for t in s.tensors()] + [s.pos.data_ptr()] for s in groups] == ptrs
    assert [s.capacity for s in groups] == [20, None] and all(int(s.pos) == s.seen == 20 for s in groups)


def test_mixed_heads_generate_fast_equals_generate():
    model = convert(tiny(), MIXED)
    ids, mask = batch(t=12, pad=(0, 3, 5))
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                             eos_token_id=None)
    assert torch.equal(generate_fast(model, ids, mask, max_new_tokens=8), ref)


def test_decode_state_formula_counts_full_heads_like_a_kv_cache():
    model = convert(tiny(), NHASettings(window=6, slots=8, sinks=2, full_heads="0:0,0:1,1:1"))
    ids, _ = batch(t=30, b=1, pad=(0,))
    with torch.no_grad():
        cache = NHACache(model.config)
        model(ids, past_key_values=cache)
    assert cache.nbytes() == nha_state_bytes(model.config, 30, torch.float32)
    plain = convert(tiny(), NHASettings(window=6, slots=8, sinks=2))
    # the full heads grow with the context like KV cache heads, the NHA heads stay constant
    grow = nha_state_bytes(model.config, 2000) - nha_state_bytes(model.config, 1000)
    assert grow == 1000 * (3 * 2 * 16 * 2 + 2)  # 3 full KV heads, keys + values of d = 16 in bf16, + 2 flag rows
    assert nha_state_bytes(plain.config, 2000) == nha_state_bytes(plain.config, 1000)


def test_save_load_round_trip_keeps_the_heads(tmp_path):
    model = convert(tiny("qwen3"), NHASettings(window=4, slots=8, sinks=2, full_heads=[(1, 0)], full_layers=[0]))
    nha_convert.save(model, None, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["nha"]["full_heads"] == {"1": [0]}
    ids, mask = batch()
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, auto(ids, attention_mask=mask).logits)
    assert [layer.self_attn.full_heads for layer in auto.model.layers] == [(), (0,), ()]
    assert auto.config.nha == model.config.nha


def test_a_config_without_full_heads_loads_unchanged():
    model = convert(tiny(), NHASettings(window=4, slots=8))
    del model.config.nha["full_heads"]
    assert nha_convert.NHASettings.from_config(model.config).full_heads == {}


@pytest.mark.parametrize("value,match", [
    ("3:0", "names layer 3; the model has layers 0..2"),
    ("1:2", "names KV head 2; the model has KV heads 0..1"),
    ("0:0", "is in layer 0, which is already full"),
    ("1", "full_heads takes layer:head pairs like 3:0,5:1"),
    ("a:b", "full_heads takes layer:head pairs like 3:0,5:1"),
    ("auto:0", "auto:K with a whole number K >= 1 of full KV heads"),
    ("auto:x", "auto:K with a whole number K >= 1 of full KV heads"),
    ("auto:5", "auto:5 asks for more full heads than the 4 KV heads of NHA layers; use auto:1 to auto:4"),
])
def test_bad_full_heads_are_one_line_errors(value, match):
    with pytest.raises(NHAError, match=match) as e:
        convert(tiny(), NHASettings(window=4, slots=8, full_layers=[0], full_heads=value))
    assert "\n" not in str(e.value)


def test_listed_heads_with_auto_layers_are_refused():
    with pytest.raises(NHAError, match="cannot be combined with full_layers auto:K"):
        NHASettings(full_layers="auto:1", full_heads="0:1").validate(4, None, 2)


def test_far_copy_mass_is_the_attention_on_far_copies_of_the_predicted_token():
    """Uniform attention (q = 0): at p = 9 with window 4, keys 0..5 lie beyond the window; the predicted token 7
    sits at 1 and 5 (and at 8, inside the window): mass 2 / 10 per query head, 3 query heads per KV head."""
    ids = torch.tensor([1, 7, 2, 3, 4, 7, 5, 6, 7, 8])
    q, k = torch.zeros(6, 10, 4), torch.randn(2, 10, 4)
    mass = far_copy_mass(q, k, ids, torch.ones(10, dtype=torch.bool), torch.tensor([9]), torch.tensor([7]),
                         window=4, num_sinks=0, scale=0.5)
    torch.testing.assert_close(mass, torch.full((2, 1), 3 * 2 / 10))
    sink = far_copy_mass(q, k, ids, torch.ones(10, dtype=torch.bool), torch.tensor([9]), torch.tensor([7]),
                         window=4, num_sinks=2, scale=0.5)  # token 1 is a sink: always visible, never counted
    torch.testing.assert_close(sink, torch.full((2, 1), 3 * 1 / 10))


def test_auto_k_through_the_cli_records_k_heads_and_scores(tiny_folder, tmp_path, run_cli):
    out = tmp_path / "nha"
    code, text = run(run_cli, str(tiny_folder), "-o", str(out), "--window", "16", "--slots", "8", "--sinks", "2",
                     "--full-layers", "0", "--full-heads", "auto:3", "--calibration-len", "192",
                     "--calibration-seqs", "2")
    assert code == 0, text
    nha = json.loads((out / "config.json").read_text())["nha"]
    pairs = [(int(i), h) for i, hs in nha["full_heads"].items() for h in hs]
    assert len(pairs) == 3 and nha["full_heads_auto"] == 3 and all(i != 0 for i, _ in pairs)
    scores = nha["full_head_scores"]
    assert sorted(scores) == ["1", "2", "3"] and all(len(v) == 2 for v in scores.values())
    ranked = sorted(((int(i), h) for i, v in scores.items() for h in range(2)), key=lambda p: -scores[str(p[0])][p[1]])
    assert {scores[str(i)][h] for i, h in pairs} == {scores[str(i)][h] for i, h in ranked[:3]}  # the 3 best
    sel = nha["full_head_selection"]
    assert sel["retrieval_positions"] > 0 and sel["seq_len"] == 192
    for i, v in scores.items():  # the score is the mean of its two recorded parts
        for h in range(2):
            assert v[h] == pytest.approx((sel["retrieval_mass"][i][h] + sel["text_mass"][i][h]) / 2, abs=2e-6)
    assert "full heads auto:3" in text and "best scores" in text
    model = nha_convert.load(out)
    assert sorted((i, h) for i, layer in enumerate(model.model.layers) for h in layer.self_attn.full_heads) == \
        sorted(pairs)


@pytest.mark.parametrize("value,message", [
    ("auto:0", "auto:K with a whole number K >= 1"),
    ("auto:9", "auto:9 asks for more full heads than the 8 KV heads of NHA layers; use auto:1 to auto:8"),
    ("0:9", "names KV head 9"),
])
def test_bad_full_heads_on_the_cli_are_one_line(tiny_folder, tmp_path, run_cli, value, message):
    out = tmp_path / "nha"
    code, text = run(run_cli, str(tiny_folder), "-o", str(out), "--full-heads", value)
    one_line_error(code, text.strip(), message)
    assert not out.exists()


def test_recipe_accepts_full_heads_and_rejects_bad_k():
    text = "model:\n  nha: {window: 64, slots: 64, full_heads: %s}\nstages:\n  - {kind: finetune, steps: 1}\n"
    assert parse_recipe(text % "auto:2", "r.yaml", budget=None).nha_settings().auto_full_heads() == 2
    assert parse_recipe(text % "'3:0,5:1'", "r.yaml", budget=None).nha_settings().full_head_pairs() == [(3, 0), (5, 1)]
    assert parse_recipe(text % "[[3, 0]]", "r.yaml", budget=None).nha_settings().full_head_pairs() == [(3, 0)]
    with pytest.raises(NHAError) as e:
        parse_recipe(text % "auto:0", "r.yaml", budget=None)
    assert str(e.value).startswith("r.yaml:2: model.nha:") and "\n" not in str(e.value)


def test_a_layer_of_only_exact_heads_has_no_slot_bias_and_round_trips(tmp_path):
    from nha_convert.head_selection import apply_full_heads

    built = convert(tiny(), NHASettings(window=4, slots=8, slot_bias=-2.0, full_heads="1:0,1:1"))
    chosen = convert(tiny(), NHASettings(window=4, slots=8, slot_bias=-2.0))
    apply_full_heads(chosen, [(1, 0), (1, 1)])  # what auto:K does after conversion
    for model in (built, chosen):
        assert [layer.self_attn.slot_bias is None for layer in model.model.layers] == [False, True, False]
    nha_convert.save(chosen, None, tmp_path / "m")
    ids, mask = batch()
    loaded = nha_convert.load(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(chosen(ids, attention_mask=mask).logits, loaded(ids, attention_mask=mask).logits)


def test_training_gradients_reach_only_the_nha_heads_gates():
    """Backward through the split: the gate rows and slot biases of exact heads get exactly zero gradient (nothing
    reads them), those of the NHA heads do not."""
    model = convert(tiny(), MIXED).train()
    ids, mask = batch(t=20)
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    attn = model.model.layers[0].self_attn  # KV head 1 exact: gate rows 8..15, query heads 3..5
    g, b = attn.g_proj.weight.grad, attn.slot_bias.grad
    assert g[8:].abs().max() == 0 and g[:8].abs().max() > 0
    assert b[3:].abs().max() == 0 and b[:3].abs().max() > 0


def test_packed_rows_with_exact_heads_equal_the_rows_alone():
    model = convert(tiny(), MIXED)
    ids, _ = batch(t=30, b=1, pad=(0,))
    pos = torch.cat([torch.arange(12), torch.arange(18)])[None]
    with torch.no_grad():
        packed = model(ids, position_ids=pos, use_cache=False).logits
        alone = torch.cat([model(ids[:, :12], use_cache=False).logits, model(ids[:, 12:], use_cache=False).logits], 1)
    assert (packed - alone).abs().max() <= 1e-4


def test_training_freezes_the_gates_of_a_layer_of_only_exact_heads():
    from nha_convert.finetune.attention_hooks import freeze_unused_gates

    model = convert(tiny(), NHASettings(window=4, slots=8, full_heads="0:1,1:0,1:1"))
    freeze_unused_gates(model)
    assert [layer.self_attn.g_proj.weight.requires_grad for layer in model.model.layers] == [True, False, True]
