"""Exact heads (--full-heads) on the GPU: compiled kernels (NHA group) and SDPA / the full-layer decode kernel (full
group) against the torch backend, at head dim 128 with m = 64 (CUDA-graph decode with exact heads: a case of
test_decode_graph_gpu.py).

Run on a CUDA machine: `PYTHONPATH=$PWD:$PWD/kernels python -m pytest tests/gpu/test_full_heads_gpu.py -q`.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from nha_convert import NHACache, NHASettings, convert  # noqa: E402
from tests.helpers.env import set_nha_env  # noqa: E402

pytestmark = pytest.mark.gpu
DEV = "cuda"


def rel(a, b, keep):
    a, b = a.double() * keep, b.double() * keep
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("pad", [False, True], ids=["sdpa", "padded"])  # all-real rows send the full group to SDPA
def test_exact_heads_kernels_equal_the_torch_backend(monkeypatch, pad):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=512, num_hidden_layers=3, num_attention_heads=16,
                      num_key_value_heads=4, head_dim=128, vocab_size=256, max_position_embeddings=4096)
    settings = NHASettings(window=64, slots=64, sinks=4, slot_bias=-2.0, full_heads="0:1,1:0,1:3,2:0,2:1,2:2,2:3")
    model = convert(LlamaForCausalLM(cfg).eval(), settings).to(DEV)
    ids = torch.randint(0, 256, (2, 1500), device=DEV)
    mask = torch.ones_like(ids)
    if pad:
        mask[1, :37] = 0
    outs = {}
    for backend in ("torch", "triton"):
        set_nha_env(monkeypatch, "NHA_BACKEND", backend)
        with torch.no_grad():
            full = model(ids, attention_mask=mask).logits
            cache = NHACache(model.config, capacity=1500)
            out = model(ids[:, :1480], attention_mask=mask[:, :1480], past_key_values=cache, use_cache=True)
            steps = [out.logits[:, -1]]
            for i in range(1480, 1500):
                out = model(ids[:, i:i + 1], attention_mask=mask[:, :i + 1], past_key_values=cache, use_cache=True)
                steps.append(out.logits[:, -1])
        outs[backend] = (full, torch.stack(steps, 1))
    keep = mask.bool()[..., None]
    assert rel(outs["triton"][0], outs["torch"][0], keep) <= 1e-3  # SDPA / tf32 products vs the fp32 reference
    assert rel(outs["triton"][1], outs["torch"][1], 1.0) <= 1e-3
    assert rel(outs["triton"][1], outs["triton"][0][:, 1479:], 1.0) <= 1e-3  # decode == the parallel forward
