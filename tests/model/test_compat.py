"""The transformers version range: the cache reaches every NHA layer under either name, a lost cache fails loudly,
and the model classes pickle (DataLoader workers, torch.save, deepcopy through pickle)."""

from __future__ import annotations

import pickle

import pytest
import torch

from nha_convert import NHACache, NHAError, NHASettings, convert
from nha_convert.compat import CACHE_KWARG, CACHE_KWARGS, output_cache
from nha_convert.modeling import ARCHITECTURES
from tests.helpers.models import ARCHS, batch, tiny


def _nha(arch="llama"):
    return convert(tiny(arch), NHASettings(window=4, slots=4, sinks=1))


@pytest.mark.parametrize("name", CACHE_KWARGS)
def test_cache_under_either_name_gives_the_same_decode(name):
    model = _nha()
    ids, mask = batch(t=12, b=2, pad=(0, 3))
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits[:, -1]
        cache = NHACache(model.config)
        model(ids[:, :-1], attention_mask=mask[:, :-1], **{name: cache})
        step = model(ids[:, -1:], attention_mask=mask, **{name: cache}).logits[:, -1]
    assert cache.nbytes() > 0
    assert torch.allclose(full, step, atol=1e-5)


def test_model_output_carries_the_nha_cache():
    model = _nha()
    with torch.no_grad():
        out = model(batch(t=10, b=1, pad=(0,))[0], use_cache=True)
    assert isinstance(output_cache(out), NHACache) and output_cache(out).nbytes() > 0


def test_a_cache_under_an_unknown_name_raises():
    """A future transformers that renames the cache again must not make the layers decode without context."""
    model = _nha()
    ids, _ = batch(t=8, b=1, pad=(0,))
    decoder = model.model.layers[0]
    original = decoder.self_attn.forward

    def renamed(*args, **kwargs):  # what a decoder layer of a newer transformers would do
        kwargs["kv_store"] = kwargs.pop(CACHE_KWARG)
        return original(*args, **kwargs)

    decoder.self_attn.forward = renamed
    with torch.no_grad(), pytest.raises(NHAError, match="kv_store"):
        model(ids, use_cache=True)


def test_a_dropped_cache_raises():
    """A decoder layer that drops the cache entirely (the 5.24 bug) is caught after the forward."""
    model = _nha()
    ids, _ = batch(t=8, b=1, pad=(0,))
    decoder = model.model.layers[1]
    original = decoder.self_attn.forward

    def dropping(*args, **kwargs):
        kwargs.pop(CACHE_KWARG, None)
        kwargs.pop("use_cache", None)
        return original(*args, **kwargs)

    decoder.self_attn.forward = dropping
    with torch.no_grad(), pytest.raises(NHAError, match="without its cache"):
        model(ids, use_cache=True)


def test_use_cache_without_a_cache_raises_in_the_layer():
    model = _nha()
    hidden = torch.zeros(1, 3, model.config.hidden_size)
    pos = model.model.rotary_emb(hidden, torch.arange(3)[None])
    with pytest.raises(NHAError, match="use_cache=True but no cache"):
        model.model.layers[0].self_attn(hidden, pos, None, use_cache=True)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_configs_and_models_pickle(arch):
    model = _nha(arch)
    assert type(model) is ARCHITECTURES[arch].model_class
    config = pickle.loads(pickle.dumps(model.config))
    assert config.to_dict() == model.config.to_dict()
    clone = pickle.loads(pickle.dumps(model))
    ids, _ = batch(t=10, b=1, pad=(0,))
    with torch.no_grad():
        assert torch.equal(clone(ids).logits, model(ids).logits)
    blank = pickle.loads(pickle.dumps(ARCHITECTURES[arch].config_class()))
    assert blank.model_type == f"nha_{arch}"
