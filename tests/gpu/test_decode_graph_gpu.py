"""CUDA-graph decode on the GPU: replayed steps equal eager steps token for token (NHA and the StaticCache base).

Run on a CUDA machine: `PYTHONPATH=$PWD:$PWD/kernels python -m pytest tests/gpu/test_decode_graph_gpu.py -q`.
"""

from __future__ import annotations

import copy

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from nha_convert import NHACache, NHASettings, convert, generate_fast  # noqa: E402
from nha_convert.compat import output_cache  # noqa: E402
from nha_convert.decode_graph import GraphedDecodeStep  # noqa: E402
from nha_convert.eval import bench as B  # noqa: E402
from tests.helpers.models import batch, tiny  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("settings", [NHASettings(window=4, slots=8, sinks=2, full_layers=[1]),
                                      NHASettings(window=0, slots=8, full_layers=[0]),
                                      NHASettings(window=4, slots=8, sinks=2, full_heads="0:1,2:0,2:1")],
                         ids=["w4", "w0", "exact-heads"])
def test_graph_generate_equals_eager_and_generate(settings):
    model = convert(tiny(), settings).cuda()
    ids, mask = batch(t=12, pad=(0, 3, 5))
    ids, mask = ids.cuda(), mask.cuda()
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0,
                             eos_token_id=None)
    eager = generate_fast(model, ids, mask, max_new_tokens=24, graph=False)
    graphed = generate_fast(model, ids, mask, max_new_tokens=24, graph=True)
    assert torch.equal(graphed, eager) and torch.equal(graphed, ref)


def _steps(model, cache, tok, start, n, graph):
    step = GraphedDecodeStep(model, cache, torch.full_like(tok, start), graph=graph)
    toks, logits = [], []
    for _ in range(n):
        out = step(tok)
        logits.append(out.float().clone())
        tok = out[:, -1:].argmax(-1)
        toks.append(tok)
    return torch.cat(toks, 1), torch.cat(logits, 1)


def test_graph_replay_equals_eager_decode_bf16_8b_head_shapes():
    """Two layers of the 8B shape (32/8 heads, d=128, m=64) in bf16, one full layer: replay == eager."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**{**B.RANDOM_MODELS["llama-3-8b-random"], "num_hidden_layers": 2})
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    convert(model, NHASettings(window=64, slots=64, full_layers=[0]))
    ids = torch.randint(0, model.config.vocab_size, (1, 300), device="cuda")
    with torch.no_grad():
        cache = NHACache(model.config, capacity=300 + 40)
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    cache.batch_repeat_interleave(4)
    tok = out.logits[:, -1:].argmax(-1).repeat(4, 1)
    t_eager, l_eager = _steps(model, copy.deepcopy(cache), tok, 300, 30, graph=False)
    t_graph, l_graph = _steps(model, cache, tok, 300, 30, graph=True)
    assert torch.equal(t_graph, t_eager)
    assert (l_graph - l_eager).abs().max().item() <= 1e-2 * l_eager.abs().max().item()
    assert [layer.state.seen for layer in cache.layers] == [330, 330]


def test_static_base_graph_equals_dynamic_eager():
    model = tiny().cuda()
    ids = torch.randint(0, 256, (1, 40), device="cuda")
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    tok = out.logits[:, -1:].argmax(-1).repeat(3, 1)
    dyn = output_cache(out)
    static = B.static_cache_from(model, dyn, 3, 40 + 20)
    dyn.batch_repeat_interleave(3)
    t_graph, _ = _steps(model, static, tok, 40, 16, graph=True)
    t_eager, _ = _steps(model, dyn, tok, 40, 16, graph=False)
    assert torch.equal(t_graph, t_eager)
