"""Base models of real shapes with random weights: `llama-3-8b-random`, `qwen2.5-7b-random`, `qwen3-8b-random`.

Every command takes them where it takes a base model (nha-convert, a recipe's `model.base`, nha-eval --bench), so the
8B recipes, conversion and the speed bench run with no download: the released configs (vocabulary included), random
weights created directly on the target device in the target dtype (8B parameters initialise in a few seconds on a
GPU, no fp32 copy), never written anywhere unless the command saves its result. Text goes through the embedded
SmolLM2 tokenizer (49,152 ids): every id is a valid row of these vocabularies (128K-152K), so nothing is remapped.

`NAME-small` is the same architecture cut to 6 layers, 2 KV heads of 16 dims and the real vocabulary: tests build,
convert and train it in seconds on a CPU (6 layers leave room for the recipes' `full_layers: auto:4`).
`tiny-random` (vocabulary 256, no tokenizer) is the speed bench's unit-test shape.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import NHAError

# The released configs. Llama-3-8B's position limit is raised to 128K so that the bench's long-context rows are
# legal (RoPE is unchanged); the Qwen configs already allow their own 128K / 40K.
RANDOM_MODELS: dict[str, dict[str, Any]] = {
    "llama-3-8b-random": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                              rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5,
                              tie_word_embeddings=False),
    "qwen2.5-7b-random": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                              num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                              rope_theta=1000000.0, max_position_embeddings=131072, rms_norm_eps=1e-6,
                              tie_word_embeddings=False, use_sliding_window=False),
    "qwen3-8b-random": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                            num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                            rope_theta=1000000.0, max_position_embeddings=40960, rms_norm_eps=1e-6,
                            tie_word_embeddings=False, attention_bias=False, use_sliding_window=False),
    "tiny-random": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=256, max_position_embeddings=8192),
}
ARCHITECTURES = {"qwen2.5-7b-random": "qwen2", "qwen3-8b-random": "qwen3"}  # model_type; the others are llama
FULL_SHAPES = ("llama-3-8b-random", "qwen2.5-7b-random", "qwen3-8b-random")  # the ones with a tokenizer
SMALL = "-small"
SMALL_KV_HEADS, SMALL_HEAD_DIM, SMALL_LAYERS = 2, 16, 6


def _small(cfg: dict[str, Any]) -> dict[str, Any]:
    """The shape cut down for CPU tests: 6 layers, 2 KV heads of 16 dims with the real query / KV head ratio (so
    GQA stays as in the full model), the real vocabulary and everything else."""
    group = cfg["num_attention_heads"] // cfg["num_key_value_heads"]
    heads = SMALL_KV_HEADS * group
    small = dict(cfg, num_hidden_layers=SMALL_LAYERS, num_attention_heads=heads, num_key_value_heads=SMALL_KV_HEADS,
                 hidden_size=heads * SMALL_HEAD_DIM, intermediate_size=4 * heads * SMALL_HEAD_DIM)
    if "head_dim" in cfg:
        small["head_dim"] = SMALL_HEAD_DIM
    return small


for _name in FULL_SHAPES:
    RANDOM_MODELS[_name + SMALL] = _small(RANDOM_MODELS[_name])
    if _name in ARCHITECTURES:
        ARCHITECTURES[_name + SMALL] = ARCHITECTURES[_name]
TOKENIZED = frozenset(n for n in RANDOM_MODELS if n != "tiny-random")  # those a base-model command accepts


def is_random(name: Any) -> bool:
    return isinstance(name, str) and name.strip().lower() in RANDOM_MODELS


def _check(name: str) -> str:
    key = name.strip().lower()
    if key not in RANDOM_MODELS:
        raise NHAError(f"unknown random model {name!r}; choose one of {', '.join(RANDOM_MODELS)}")
    return key


def random_config(name: str) -> Any:
    """The model's config (no weights): the released shape, architecture and position limit."""
    from transformers import AutoConfig

    key = _check(name)
    cfg = AutoConfig.for_model(ARCHITECTURES.get(key, "llama"), **RANDOM_MODELS[key])
    cfg._name_or_path = key
    return cfg


def random_model(name: str, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                 seed: int = 0) -> Any:
    """The model with random weights (the architecture's own init), created directly on `device` in `dtype`."""
    from transformers import AutoModelForCausalLM

    cfg = random_config(name)
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are born in bf16 on the GPU: no fp32 copy of 8B weights
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def random_base(name: str, dtype: torch.dtype | str = "auto", device: str | torch.device = "cpu",
                seed: int = 0) -> tuple[Any, Any]:
    """(model, tokenizer) as hub.load_base_model gives them: the embedded SmolLM2 tokenizer, whose bos / eos / pad
    ids the config takes. dtype "auto" is bf16, the released checkpoints' dtype."""
    from transformers import AutoTokenizer

    from . import assets

    key = _check(name)
    if key not in TOKENIZED:
        raise NHAError(f"{name} has a {RANDOM_MODELS[key]['vocab_size']}-token vocabulary and no tokenizer: it is a "
                       f"--bench shape only; use one of {', '.join(sorted(TOKENIZED))}")
    tokenizer = AutoTokenizer.from_pretrained(assets.smollm2_tokenizer_folder())
    if len(tokenizer) > RANDOM_MODELS[key]["vocab_size"]:  # not so for any shape here; a guard for new ones
        raise NHAError(f"{name}: the tokenizer has {len(tokenizer)} ids, more than the vocabulary")
    model = random_model(key, torch.bfloat16 if dtype == "auto" else dtype, device, seed)
    for field in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, field)
        setattr(model.config, field, value)
        setattr(model.generation_config, field, value)
    return model, tokenizer
