"""LoRA on an NHA model: merging the adapters gives the same logits as the unmerged model; trainable sets."""

from __future__ import annotations

import pytest
import torch

import nha_convert
from nha_convert.errors import NHAError
from nha_convert.finetune.recipe import LoraSpec
from nha_convert.finetune.trainables import merge_lora, select_trainables
from tests.helpers.finetune import tiny_llama


def _nha(**kw):
    return nha_convert.convert(tiny_llama(0), nha_convert.NHASettings(window=4, slots=4, **kw))


def test_lora_merge_gives_the_same_logits():
    model = select_trainables(_nha(), "lora", LoraSpec(r=4, alpha=8.0))
    torch.manual_seed(1)
    with torch.no_grad():  # peft starts B at zero (a no-op adapter): make the adapters matter
        for name, p in model.named_parameters():
            if "lora_B" in name or ".g_proj." in name:
                p.normal_(0, 0.05)
    model.eval()
    ids = torch.randint(0, 256, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, 18:] = 0
    with torch.no_grad():
        unmerged = model(input_ids=ids, attention_mask=mask).logits
        with model.disable_adapter():
            without = model(input_ids=ids, attention_mask=mask).logits
    merged_model = merge_lora(model)
    assert type(merged_model).__name__ == "NHALlamaForCausalLM"
    assert not any("lora" in n for n, _ in merged_model.named_parameters())
    with torch.no_grad():
        merged = merged_model(input_ids=ids, attention_mask=mask).logits
    assert (unmerged - without).abs().max() > 1e-3  # the adapters change the output ...
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)  # ... and merging keeps it


@pytest.mark.parametrize("trains,expect,forbid", [
    ("gates", {".g_proj."}, {"q_proj", "mlp", "embed"}),
    ("attention", {".g_proj.", "q_proj", "o_proj"}, {"mlp", "embed", "norm.weight"}),
    ("all_but_mlp", {".g_proj.", "q_proj", "embed_tokens", "lm_head", "norm"}, {"mlp"}),
    ("lora", {"lora_A", "lora_B", ".g_proj."}, {"base_layer", "mlp"}),
])
def test_trainable_sets(trains, expect, forbid):
    model = select_trainables(_nha(), trains, LoraSpec(r=2))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for part in expect:
        assert any(part in n for n in names), (trains, part)
    for part in forbid:
        assert not any(part in n for n in names), (trains, part)


def test_gates_on_an_unconverted_model_is_an_error():
    with pytest.raises(NHAError, match="selects no parameters"):
        select_trainables(tiny_llama(0), "gates", LoraSpec())
