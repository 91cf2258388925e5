"""Converted models: exact limits, decode == parallel forward, generation, memory, save/load, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import nha_convert
from nha_convert import NHACache, NHAError, NHASettings, convert
from nha_convert.memory import nha_state_bytes
from tests.helpers.models import ARCHS, batch, max_diff, prefill_then_decode, tiny

@pytest.mark.parametrize("arch", list(ARCHS))
def test_window_covering_input_equals_base_model(arch):
    base = tiny(arch)
    ids, mask = batch()
    with torch.no_grad():
        ref = base(ids, attention_mask=mask).logits
        nha = convert(copy.deepcopy(base), NHASettings(window=64, slots=16, sinks=4))
        out = nha(ids, attention_mask=mask).logits
    assert type(nha).__name__ == f"NHA{type(base).__name__}"
    assert max_diff(ref, out, mask) <= 1e-4


def test_real_smollm2_with_window_covering_input_equals_base(smollm2_path):
    from nha_convert.hub import load_base_model

    base, tok = load_base_model(str(smollm2_path), dtype=torch.float32)
    text = "The quick brown fox jumps over the lazy dog. Shall I compare thee to a summer's day? " * 3
    enc = tok([text, "Thou art more lovely and more temperate."], return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = base(**enc).logits
        nha = convert(base, NHASettings(window=2048, slots=64, sinks=4))
        out = nha(**enc).logits
    assert max_diff(ref, out, enc["attention_mask"]) <= 1e-4


SCHEDULES = [
    NHASettings(window=5, slots=8, sinks=0),
    NHASettings(window=4, slots=8, sinks=3, full_layers=[1]),
    NHASettings(window=0, slots=8, sinks=2),
    NHASettings(window=1, slots=0, sinks=4),
]


@pytest.mark.parametrize("settings", SCHEDULES, ids=lambda s: f"w{s.window}-m{s.slots}-s{s.sinks}")
@pytest.mark.parametrize("prefill", [1, 9, 20])
def test_prefill_then_decode_equals_full_forward(settings, prefill):
    model = convert(tiny(), settings)
    ids, mask = batch(t=30)
    full, stepped, _ = prefill_then_decode(model, ids, mask, prefill)
    assert max_diff(full, stepped, mask) <= 1e-4


def test_greedy_generate_matches_step_by_step_argmax():
    model = convert(tiny(), NHASettings(window=4, slots=8, sinks=2))
    ids, mask = batch(t=12, pad=(0, 3, 5))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
        seq, m = ids, mask
        for _ in range(10):  # no cache: every step recomputes the full parallel forward
            nxt = model(seq, attention_mask=m, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    assert torch.equal(out, seq)


def test_sampling_generate_runs_with_left_padding():
    model = convert(tiny(), NHASettings(window=4, slots=8))
    ids, mask = batch(t=12, pad=(0, 3, 5))
    torch.manual_seed(0)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=20, pad_token_id=0)
    assert out.shape == (3, 18) and torch.equal(out[:, :12], ids)


def test_decode_state_is_constant_beyond_window_and_matches_formula():
    model = convert(tiny(), NHASettings(window=6, slots=8, sinks=2))
    ids, _ = batch(t=60, b=2, pad=(0, 0))
    sizes = {}
    with torch.no_grad():
        cache = NHACache(model.config)
        model(ids[:, :10], past_key_values=cache)
        for t in range(10, 60):
            model(ids[:, t:t + 1], past_key_values=cache)
            if t + 1 in (20, 60):
                sizes[t + 1] = cache.nbytes()
    assert sizes[20] == sizes[60]
    assert sizes[60] == 2 * nha_state_bytes(model.config, 60, torch.float32)


def test_full_layers_cache_grows_like_a_kv_cache():
    model = convert(tiny(), NHASettings(window=6, slots=8, full_layers=[0]))
    ids, _ = batch(t=30, b=1, pad=(0,))
    with torch.no_grad():
        cache = NHACache(model.config)
        model(ids, past_key_values=cache)
    assert cache.nbytes() == nha_state_bytes(model.config, 30, torch.float32)
    assert cache.layers[0].nbytes() > cache.layers[1].nbytes()


def test_save_load_round_trip(tmp_path):
    model = convert(tiny("qwen3"), NHASettings(window=4, slots=8, sinks=2, full_every=2, gate_init="constant"))
    nha_convert.save(model, None, tmp_path / "m")
    ids, mask = batch()
    loaded = nha_convert.load(tmp_path / "m")
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        assert torch.equal(ref, loaded(ids, attention_mask=mask).logits)
        assert torch.equal(ref, auto(ids, attention_mask=mask).logits)
    assert loaded.config.nha == model.config.nha
    assert loaded.config.nha["windows"] == [None, 4, None]
    assert loaded.config.nha["gate_init"] == "constant"


def test_load_refuses_a_base_model(tmp_path):
    tiny().save_pretrained(tmp_path / "base")
    with pytest.raises(NHAError, match="not a converted NHA model"):
        nha_convert.load(tmp_path / "base")


def test_save_is_atomic(tmp_path, monkeypatch):
    model = convert(tiny(), NHASettings(window=4, slots=8))

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", crash)
    with pytest.raises(RuntimeError):
        nha_convert.save(model, None, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # no output folder, no leftover partial folder


def test_gate_inits():
    model = tiny()
    k_rows = model.model.layers[0].self_attn.k_proj.weight.detach().clone()  # (2 heads * d_k 16, hidden)
    convert(model, NHASettings(window=4, slots=8))
    g = model.model.layers[0].self_attn.g_proj
    assert g.weight.shape == (2 * 8, 96)
    # head 0, slot 0 = mean of that head's first 16/8 = 2 key rows; head 1 starts at key row 16
    assert torch.allclose(g.weight[0], k_rows[:2].mean(0), atol=1e-6)
    assert torch.allclose(g.weight[8], k_rows[16:18].mean(0), atol=1e-6)

    wide = convert(tiny(), NHASettings(window=4, slots=40))  # m > d_k: rows tile
    assert torch.equal(wide.model.layers[0].self_attn.g_proj.weight[16], k_rows[0])

    const = convert(tiny(), NHASettings(window=4, slots=8, gate_init="constant", gate_decay=0.95))
    g = const.model.layers[0].self_attn.g_proj
    alpha = torch.exp(torch.nn.functional.logsigmoid(g.bias) / 8.0)
    assert g.weight.abs().max() == 0 and torch.allclose(alpha, torch.full_like(alpha, 0.95))

    multi = convert(tiny(), NHASettings(window=4, slots=8, gate_init="multiscale"))
    g = multi.model.layers[0].self_attn.g_proj
    assert torch.allclose(g.weight[0], k_rows[:2].mean(0), atol=1e-6)  # the pooled-k rows, unchanged
    horizons = 1 / (1 - torch.exp(torch.nn.functional.logsigmoid(g.bias.double()) / 8.0))
    expected = torch.logspace(4, 14, 8, base=2, dtype=torch.float64)  # 16 ... 16384, log-uniform
    torch.testing.assert_close(horizons[:8], expected, rtol=1e-3, atol=0)  # fp32 bias: ~1e-4 at 16384
    torch.testing.assert_close(horizons[8:], horizons[:8])  # the same horizons in every KV head


@pytest.mark.parametrize("settings,match", [
    (NHASettings(window=-1), "window must be >= 0"),
    (NHASettings(slots=-2), "slots must be >= 0"),
    (NHASettings(window=0, slots=0), "nothing to attend"),
    (NHASettings(full_layers=[3]), "out of range"),
    (NHASettings(window=4096), "exceeds the model's context length"),
    (NHASettings(gate_init="zeros"), "unknown gate init"),
])
def test_bad_settings_are_one_line_errors(settings, match):
    with pytest.raises(NHAError, match=match) as e:
        convert(tiny(), settings)
    assert "\n" not in str(e.value)


def test_unsupported_architecture_lists_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(NHAError, match="supports llama, mistral, qwen2, qwen3"):
        convert(model, NHASettings())
