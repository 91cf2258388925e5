"""Speed and memory bench on tiny CPU models: rows, decode state by context, speedup table (no timing asserts)."""

from __future__ import annotations

import torch

import nha_convert
from nha_convert.compat import CACHE_KWARG, output_cache
from nha_convert.eval import bench as B


def test_state_per_sequence_constant_for_nha_and_linear_for_base():
    model = B.random_model("tiny-random", torch.float32, "cpu")
    assert model.dtype == torch.float32 and model.config.num_hidden_layers == 2
    base = B.bench_model(model, "base", [32, 128], [1, 3], decode_steps=2, prefill_repeats=1)
    nha_convert.convert(model, nha_convert.NHASettings(window=16, slots=8))  # every layer NHA
    nha = B.bench_model(model, "nha", [32, 128], [1, 3], decode_steps=2, prefill_repeats=1)
    for rows in (base, nha):
        assert [(r.context, r.batch) for r in rows] == [(32, 1), (32, 3), (128, 1), (128, 3)]
        assert all(r.decode_tok_s and r.decode_tok_s > 0 and r.prefill_s and r.prefill_s > 0 for r in rows)
        assert all(r.peak_mem_gib is None for r in rows)  # no device counter on a CPU
    st = {(r.model, r.context): r.state_mib_per_seq for r in base + nha}
    # A dense KV cache: 2 layers x 2 KV heads x 16 dims x (k, v) x 4 bytes per token.
    assert st[("base", 32)] * 1024**2 == 32 * 2 * 2 * 16 * 2 * 4
    assert st[("base", 128)] == 4 * st[("base", 32)]
    assert st[("nha", 32)] == st[("nha", 128)] > 0
    sp = B.speedups([r.to_dict() for r in base + nha])
    assert {(s["context"], s["batch"]) for s in sp} == {(32, 1), (32, 3), (128, 1), (128, 3)}
    assert all(s["decode_x"] > 0 and s["prefill_x"] > 0 for s in sp)


def test_cache_expansion_matches_a_real_batch():
    """Decode from one prefilled sequence repeated B times equals decoding B identical sequences."""
    model = B.random_model("tiny-random", torch.float32, "cpu", seed=1)
    nha_convert.convert(model, nha_convert.NHASettings(window=8, slots=4, full_layers=[0]))
    ids = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        one = output_cache(model(input_ids=ids, use_cache=True))
        one.batch_repeat_interleave(3)
        nxt = torch.tensor([[5], [6], [7]])
        a = model(input_ids=nxt, past_key_values=one, use_cache=True).logits
        three = output_cache(model(input_ids=ids.repeat(3, 1), use_cache=True))
        b = model(input_ids=nxt, past_key_values=three, use_cache=True).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert B.cache_nbytes(one) == B.cache_nbytes(three)


def test_max_batch_is_one_without_a_gpu():
    assert B.max_batch(1 << 20, torch.device("cpu")) == 1


def test_random_llama3_8b_shape_is_the_released_config():
    cfg = B.RANDOM_MODELS["llama-3-8b-random"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["intermediate_size"], cfg["vocab_size"]) == (4096, 32, 32, 8, 14336, 128256)


def test_static_base_cache_decodes_like_the_dynamic_one():
    """The graphed base runs on a StaticCache filled from the one-sequence prefill: same next-step logits."""
    model = B.random_model("tiny-random", torch.float32, "cpu", seed=2)
    ids = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        dyn = output_cache(model(input_ids=ids, use_cache=True))
        static = B.static_cache_from(model, dyn, 3, 30)
        nxt = torch.tensor([[5], [6], [7]])
        pos = torch.full((3, 1), 20)
        a = model(input_ids=nxt, position_ids=pos, **{CACHE_KWARG: static}, use_cache=True).logits
        dyn.batch_repeat_interleave(3)
        b = model(input_ids=nxt, **{CACHE_KWARG: dyn}, use_cache=True).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_graph_mode_rows_and_ratios_against_the_fastest_base():
    model = B.random_model("tiny-random", torch.float32, "cpu")
    rows = B.bench_model(model, "base-static-graph", [32], [2], decode_steps=2, decode="graph", prefill=False)
    assert rows[0].decode_tok_s > 0 and rows[0].prefill_s is None and rows[0].note == ""  # no graph on a CPU
    nha_convert.convert(model, nha_convert.NHASettings(window=8, slots=4, full_layers=[0]))
    rows += B.bench_model(model, "nha", [32], [2], decode_steps=2, decode="graph", prefill_repeats=1)
    assert rows[1].decode_tok_s > 0
    fake = [dict(model="base", context=8, batch=2, decode_tok_s=10.0, prefill_s=2.0, note=""),
            dict(model="base-nocudnn", context=8, batch=2, decode_tok_s=20.0, prefill_s=3.0, note=""),
            dict(model="nha", context=8, batch=2, decode_tok_s=50.0, prefill_s=1.0, note="graph"),
            dict(model="base-static-graph", context=8, batch=5, decode_tok_s=40.0, note="graph max batch"),
            dict(model="nha", context=8, batch=40, decode_tok_s=400.0, note="graph max batch")]
    sp = {s["batch"]: s for s in B.speedups(fake)}
    assert sp[2]["decode_x"] == 2.5 and sp[2]["base_run"] == "base-nocudnn" and sp[2]["prefill_x"] == 2.0
    assert sp["max (40 vs 5)"]["decode_x"] == 10.0 and sp["max (40 vs 5)"]["base_run"] == "base-static-graph"
