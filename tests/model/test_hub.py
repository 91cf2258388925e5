"""Base-model resolution and loading: aliases, local folders, bad paths, offline hub ids."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from nha_convert import assets, hub
from nha_convert.errors import NHAError

OFFLINE_MSG = ("cannot download 'nha-test/does-not-exist': offline and not in the local Hugging Face cache; "
               "run once online or pass a local folder")


def _byte_tokenizer() -> PreTrainedTokenizerFast:
    """A real byte-level tokenizer with 257 ids (256 bytes + eos) and no pad token; builds in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)} | {"<|endoftext|>": 256}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=260)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(folder)
    _byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("alias,repo", [
    ("llama-3-8b", "meta-llama/Meta-Llama-3-8B"),
    ("llama-3.1-8b", "meta-llama/Llama-3.1-8B"),
    ("qwen2.5-7b", "Qwen/Qwen2.5-7B"),
    ("qwen3-8b", "Qwen/Qwen3-8B"),
    ("Qwen3-8B-Base", "Qwen/Qwen3-8B-Base"),
    ("mistral-7b", "mistralai/Mistral-7B-v0.3"),
])
def test_aliases(alias, repo):
    assert hub.resolve_source(alias) == repo


def test_default_is_the_embedded_smollm2(monkeypatch, tmp_path):
    monkeypatch.setattr(assets, "smollm2_folder", lambda: tmp_path)
    assert hub.resolve_source(None) == tmp_path
    assert hub.resolve_source("SmolLM2-135M") == tmp_path


def test_hub_ids_pass_through(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no local folder of that name
    assert hub.resolve_source("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert hub.resolve_source("gpt2") == "gpt2"


@pytest.mark.parametrize("name", ["./nope", "/no/such/model", "~/nha-no-such-model", "a/b/c", "nope/"])
def test_missing_path_errors(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NHAError, match="^no such folder: "):
        hub.resolve_source(name)


def test_local_folder_checks(tmp_path, monkeypatch):
    folder = tmp_path / "org" / "model"
    folder.mkdir(parents=True)
    with pytest.raises(NHAError, match="has no config.json: not a Hugging Face model folder"):
        hub.resolve_source(folder)
    (folder / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(NHAError, match=r"model/config.json is not valid JSON \(") as err:
        hub.load_base_model(str(folder))
    assert "\n" not in str(err.value)
    (folder / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert hub.resolve_source("org/model") == folder  # an existing folder wins over a hub id
    (tmp_path / "weights.gguf").write_bytes(b"")
    with pytest.raises(NHAError, match="is a file; pass a Hugging Face model folder"):
        hub.resolve_source("weights.gguf")


def test_load_local_folder(tiny_llama_dir):
    model, tok = hub.load_base_model(str(tiny_llama_dir), dtype=torch.bfloat16)
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
    saved = LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    for (k, a), (_, b) in zip(model.state_dict().items(), saved.state_dict().items()):
        assert torch.equal(a, b.to(torch.bfloat16)), k
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"  # pad was missing, eos filled it in
    assert tok.decode(tok("Hello, NHA!").input_ids) == "Hello, NHA!"
    batch = tok(["a", "abc"], padding=True, return_tensors="pt")
    assert batch.input_ids.shape == (2, 3)
    cfg = hub.load_config(tiny_llama_dir)
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.vocab_size) == ("llama", 2, 260)


def test_local_folder_without_tokenizer(tmp_path):
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=64)).save_pretrained(tmp_path)
    with pytest.raises(NHAError, match="has no tokenizer files"):
        hub.load_base_model(tmp_path)


def test_offline_hub_id_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for call in (hub.load_config, hub.load_base_model):
        with pytest.raises(NHAError) as err:
            call("nha-test/does-not-exist")
        assert str(err.value) == OFFLINE_MSG
        assert err.value.__cause__ is None and err.value.__suppress_context__


def test_offline_hub_id_loads_from_the_hf_cache(tiny_llama_dir, tmp_path, monkeypatch):
    """Offline, a hub id that is in the HF cache loads from there and keeps its hub name."""
    import shutil

    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--nha-test--tiny-llama"
    shutil.copytree(tiny_llama_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    model, tok = hub.load_base_model("nha-test/tiny-llama")
    assert isinstance(model, LlamaForCausalLM) and model.config.vocab_size == 260
    assert model.name_or_path == model.config.name_or_path == tok.name_or_path == "nha-test/tiny-llama"
    assert hub.load_config("nha-test/tiny-llama").num_hidden_layers == 2


def test_hub_error_explains_network_failures():
    """What transformers raises when the hub cannot be reached (no env flag set): an OSError over
    LocalEntryNotFoundError over a connection error."""
    from types import SimpleNamespace

    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    response = SimpleNamespace(headers={}, request=None)

    def chain(inner: BaseException) -> OSError:
        try:
            try:
                raise inner
            except BaseException as e:
                raise OSError("We couldn't connect to 'https://huggingface.co' to load the files") from e
        except OSError as outer:
            return outer

    err = hub.hub_error("nha-test/does-not-exist", chain(LocalEntryNotFoundError("no connection")))
    assert str(err) == OFFLINE_MSG
    gated = hub.hub_error("meta-llama/Meta-Llama-3-8B", chain(GatedRepoError("401", response=response)))
    assert "is gated on the Hugging Face hub" in str(gated)
    missing = hub.hub_error("org/typo", chain(RepositoryNotFoundError("404", response=response)))
    assert str(missing).startswith("no model 'org/typo' on the Hugging Face hub")
    assert hub.hub_error("org/x", OSError("disk full")) is None


def test_default_model_loads_and_knows_paris(smollm2_path):
    model, tok = hub.load_base_model(None)
    assert Path(model.config._name_or_path) == smollm2_path
    assert model.dtype == torch.float32 and model.config.num_hidden_layers == 30
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.input_ids.shape[1]:])
