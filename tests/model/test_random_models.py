"""The random-weight 8B shapes as base models (random_models.py): the released configs, the reduced `-small` forms
tests use, the SmolLM2 tokenizer, conversion exactness, and every command accepting them."""

from __future__ import annotations

import pytest
import torch

import nha_convert
from nha_convert import hub
from nha_convert import random_models as R
from nha_convert.errors import NHAError
from tests.helpers.models import max_diff

SMALL = [n + R.SMALL for n in R.FULL_SHAPES]


def head_dim(c) -> int:
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads  # Qwen2 has no head_dim field


@pytest.mark.parametrize("name,shape", [
    ("llama-3-8b-random", ("LlamaConfig", 32, 4096, 32, 8, 128, 14336, 128256, 5e5, False)),
    ("qwen2.5-7b-random", ("Qwen2Config", 28, 3584, 28, 4, 128, 18944, 152064, 1e6, False)),
    ("qwen3-8b-random", ("Qwen3Config", 36, 4096, 32, 8, 128, 12288, 151936, 1e6, False)),
])
def test_full_shapes_are_the_released_configs(name, shape):
    c = hub.load_config(name)  # no weights built
    assert (type(c).__name__, c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            head_dim(c), c.intermediate_size, c.vocab_size, c.rope_parameters["rope_theta"],
            c.tie_word_embeddings) == shape


@pytest.mark.parametrize("name", SMALL)
def test_small_forms_keep_architecture_gqa_and_vocabulary(name):
    full, small = hub.load_config(name[: -len(R.SMALL)]), hub.load_config(name)
    assert type(small) is type(full) and small.vocab_size == full.vocab_size
    assert small.num_hidden_layers == 6 and small.num_key_value_heads == 2 and head_dim(small) == 16
    assert (small.num_attention_heads // small.num_key_value_heads
            == full.num_attention_heads // full.num_key_value_heads)


@pytest.mark.parametrize("name", SMALL)
def test_small_base_loads_with_the_smollm2_tokenizer_and_converts_exactly(name):
    model, tok = hub.load_base_model(name, dtype=torch.float32)
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    assert len(tok) == 49152 <= model.config.vocab_size
    assert (model.config.eos_token_id, model.config.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    enc = tok(["The capital of France is Paris, and the capital of Italy is Rome.", "Hello"],
              return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = model(**enc).logits
        nha = nha_convert.convert(model, nha_convert.NHASettings(window=64, slots=8, sinks=2))
        out = nha(**enc).logits
    assert nha.config.model_type == "nha_" + R.ARCHITECTURES.get(name, "llama")
    assert max_diff(ref, out, enc["attention_mask"]) <= 1e-5


def test_same_seed_same_weights_and_auto_dtype_is_bf16():
    a, _ = hub.load_base_model("llama-3-8b-random-small", dtype="auto")
    b = R.random_model("llama-3-8b-random-small", torch.bfloat16, "cpu", seed=0)
    assert next(a.parameters()).dtype == torch.bfloat16
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_names_resolve_without_building_and_tiny_random_is_bench_only():
    assert hub.resolve_source("Qwen3-8B-Random") == "qwen3-8b-random"
    hub.check_source("llama-3-8b-random")
    with pytest.raises(NHAError, match="tiny-random has a 256-token vocabulary and no tokenizer: .*--bench"):
        hub.load_base_model("tiny-random")
    with pytest.raises(NHAError, match="unknown random model 'nope-random'"):
        R.random_config("nope-random")


def test_nha_convert_cli_converts_a_small_shape(run_cli, tmp_path):
    from nha_convert.cli import convert as cli

    code, _, err = run_cli(cli.main, "nha-convert", "qwen3-8b-random-small", "-o", str(tmp_path / "out"),
                           "--window", "16", "--slots", "4", "--full-layers", "0", "--dtype", "float32")
    assert code == 0, err
    loaded = nha_convert.load(tmp_path / "out")
    assert loaded.config.model_type == "nha_qwen3" and loaded.config.vocab_size == 151936
    assert loaded.config.nha["windows"][:2] == [None, 16]
