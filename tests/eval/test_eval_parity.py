"""nha-eval --parity: chunked prefill, prefill + decode and generate against one full forward, on real text with
left padding; it passes on converted models and fails, naming the path, when a model loses its cache."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import nha_convert
from nha_convert import NHACache
from nha_convert.cli import eval as cli
from nha_convert.compat import CACHE_KWARGS
from nha_convert.eval import parity as P
from nha_convert.eval.perplexity import heldout_path
from nha_convert.layer import NHAAttention


@pytest.fixture(scope="module")
def tok(smollm2_path):
    return AutoTokenizer.from_pretrained(smollm2_path)


def tiny_nha(vocab: int) -> LlamaForCausalLM:
    """Two layers, window 16 (the prompts are 128 tokens: slots in use), layer 1 full attention."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=vocab,
                                         max_position_embeddings=2048)).eval()
    return nha_convert.convert(model, nha_convert.NHASettings(window=16, slots=4, sinks=2, full_layers=[1]))


def _cache_of(kwargs):
    return next(((name, kwargs[name]) for name in CACHE_KWARGS if kwargs.get(name) is not None), (None, None))


def forget_cache(monkeypatch, how: str) -> None:
    """Make every NHA layer lose its context: `fresh` hands it an empty cache of its own at every call (the real one
    stays empty); `wipe` clears its state before every call (the prefill fills it, each later call starts over)."""
    forward = NHAAttention.forward

    def lossy(self, *args, **kwargs):
        name, cache = _cache_of(kwargs)
        if cache is not None and how == "fresh":
            kwargs[name] = NHACache(num_layers=len(cache.layers))
        elif cache is not None:
            cache.layers[self.layer_idx].state = None
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(NHAAttention, "forward", lossy)


def test_prompts_are_left_padded_passages_of_the_held_out_text(tok):
    ids, mask = P.prompts(tok, 160, pad_id=7)
    assert ids.shape == mask.shape == (3, 160)
    assert mask.sum(1).tolist() == [160, 116, 72]
    for row in range(3):  # left padding: zeros, then ones, and pad ids exactly where the mask is 0
        n = int(mask[row].sum())
        assert mask[row, :160 - n].sum() == 0 and mask[row, 160 - n:].all()
        assert (ids[row, :160 - n] == 7).all()
    text = heldout_path().read_text(encoding="utf-8", errors="replace")
    passage = tok.decode(ids[1, 160 - 116:])
    assert passage[5:60] in text  # real text (the ends may cut a word the tokenizer merged differently)


def test_prompt_length_passes_the_window():
    cfg = type("C", (), {"nha": {"window": 512, "windows": [512, None, 512]}})()
    assert P.prompt_length(type("M", (), {"config": cfg})()) == 576
    cfg.nha = {"window": 4096, "windows": [4096]}
    assert P.prompt_length(type("M", (), {"config": cfg})()) == 1088  # capped: a CPU steps these one at a time
    cfg.nha = {"window": 16, "windows": [16, None]}
    assert P.prompt_length(type("M", (), {"config": cfg})()) == P.PROMPT_TOKENS
    cfg.nha = None  # a base model
    assert P.prompt_length(type("M", (), {"config": cfg})()) == P.PROMPT_TOKENS


def test_parity_holds_on_a_converted_tiny_model(tok):
    model = tiny_nha(len(tok))
    ids, mask = P.prompts(tok, P.prompt_length(model), pad_id=tok.pad_token_id or 0)
    rep = P.check_parity(model, ids, mask, pad_id=tok.pad_token_id or 0)
    assert rep.failures() == []
    assert [p.path for p in rep.paths] == list(P.PATHS)
    assert all(p.error is None and p.max_diff <= 1e-4 for p in rep.paths), rep.paths
    assert (rep.tolerance, rep.prefill, rep.chunk_edges, rep.prompt_tokens) == (1e-3, 104, [0, 43, 87, 128],
                                                                                 [128, 92, 57])
    assert rep.cache_bytes > 0
    d = rep.to_dict()
    assert [p["ok"] for p in d["paths"]] == [True, True, True] and json.loads(json.dumps(d)) == d


@pytest.mark.parametrize("how", ["fresh", "wipe"])
def test_parity_fails_naming_each_path_when_the_cache_is_lost(tok, monkeypatch, how):
    model = tiny_nha(len(tok))
    ids, mask = P.prompts(tok, P.prompt_length(model))
    forget_cache(monkeypatch, how)
    rep = P.check_parity(model, ids, mask)
    fails = rep.failures()
    assert [f.split(":")[0] for f in fails] == ["chunked", "decode", "generate"]
    if how == "fresh":  # the cache passed in never fills: an error says so (layer.py or parity), not just a difference
        assert all("NHAError" in f and "cache" in f for f in fails), fails
    else:
        assert all("max logit difference" in f and "> tolerance 0.001" in f for f in fails)
        assert rep.paths[1].first_divergence is not None and rep.paths[1].first_divergence >= rep.prefill
        assert "max logit difference" in fails[2]


def test_a_path_that_raises_fails_by_name_and_the_others_still_run(tok, monkeypatch):
    model = tiny_nha(len(tok))
    ids, mask = P.prompts(tok, P.prompt_length(model))
    def broken(*args, **kwargs):
        raise RuntimeError("boom\nmore")

    monkeypatch.setattr(type(model), "generate", broken)
    rep = P.check_parity(model, ids, mask)
    assert rep.failures() == ["generate: RuntimeError: boom"]


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("parity")
    model = tiny_nha(len(tok))
    nha_convert.save(model, tok, root / "nha")
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=len(tok)))
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    return root


def test_cli_parity_passes_then_fails_with_exit_1_naming_the_paths(tiny_folders, tmp_path, run_cli, monkeypatch):
    code, _, err = run_cli(cli.main, "nha-eval", tiny_folders / "nha", tiny_folders / "base", "--parity",
                           "--out", tmp_path / "ok")
    assert code == 0, err
    res = json.loads((tmp_path / "ok" / "results.json").read_text())
    assert set(res["parity"]) == {"nha", "base"}  # a base model is checked too (transformers' DynamicCache)
    assert all(p["ok"] for rep in res["parity"].values() for p in rep["paths"])
    assert "## Parity" in (tmp_path / "ok" / "report.md").read_text()

    forget_cache(monkeypatch, "wipe")
    code, _, err = run_cli(cli.main, "nha-eval", tiny_folders / "nha", "--parity", "--parity-tolerance", "0.01",
                           "--out", tmp_path / "bad")
    assert code == 1
    for path in P.PATHS:
        assert f"FAIL parity nha {path}: max logit difference" in err and "> tolerance 0.01" in err
    assert "3 parity path(s) past tolerance" in err
    res = json.loads((tmp_path / "bad" / "results.json").read_text())
    assert [p["ok"] for p in res["parity"]["nha"]["paths"]] == [False, False, False]


def test_cli_parity_refuses_a_random_weight_model(run_cli):
    code, _, err = run_cli(cli.main, "nha-eval", "tiny-random", "--parity")
    assert code == 1 and "--parity reads real text" in err and "Traceback" not in err


@pytest.mark.slow
def test_cli_parity_on_converted_smollm2(smollm2_path, tmp_path, run_cli, monkeypatch):
    from nha_convert.hub import load_base_model

    base, tok = load_base_model(str(smollm2_path), dtype=torch.float32)
    nha_convert.save(nha_convert.convert(base, nha_convert.NHASettings(window=64, slots=64, sinks=4)), tok,
                     tmp_path / "nha")
    code, _, err = run_cli(cli.main, "nha-eval", tmp_path / "nha", "--parity", "--out", tmp_path / "ok")
    assert code == 0, err
    rep = json.loads((tmp_path / "ok" / "results.json").read_text())["parity"]["nha"]
    assert rep["tolerance"] == 1e-3 and all(p["ok"] and p["max_diff"] <= 1e-3 for p in rep["paths"]), rep

    forget_cache(monkeypatch, "wipe")
    code, _, err = run_cli(cli.main, "nha-eval", tmp_path / "nha", "--parity", "--out", tmp_path / "bad")
    assert code == 1 and all(f"FAIL parity nha {path}: max logit difference" in err for path in P.PATHS), err
