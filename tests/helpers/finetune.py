"""Tiny models, tokenizer, recipes and run readers shared by the fine-tuning tests (CPU and GPU)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB = 260  # 256 bytes + <eos> + <pad>, rounded up


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (one token per byte, no merges): real text, tiny vocabulary."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"], vocab["<pad>"] = 256, 257
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def tiny_llama(seed: int = 0, layers: int = 2, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512,
                      tie_word_embeddings=tie, bos_token_id=None, eos_token_id=256, pad_token_id=257)
    return LlamaForCausalLM(cfg).eval()


def save_tiny_base(folder: Path, seed: int = 0, tie: bool = False) -> Path:
    tiny_llama(seed, tie=tie).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def documents(n: int = 12, words: int = 120) -> list[str]:
    """Deterministic English-like documents."""
    g = torch.Generator().manual_seed(1)
    vocab = "the of and to in a is that for it as was with be by on not he this are or his from at which".split()
    out = []
    for _ in range(n):
        idx = torch.randint(0, len(vocab), (words,), generator=g).tolist()
        out.append(" ".join(vocab[i] for i in idx) + ".")
    return out


def write_corpus(folder: Path, n: int = 12) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(documents(n)):
        (folder / f"doc{i:02d}.txt").write_text(d)
    return folder


def recipe_text(base: Path, data: Path, out: Path, stages: str, nha: str = "{window: 8, slots: 4}",
                extra: str = "") -> str:
    return textwrap.dedent(f"""\
        model:
          base: {base}
          nha: {nha}
        data:
          sources:
            - kind: text
              path: {data}
          held_out: 0.25
          min_chunk: 8
        output:
          dir: {out}
          checkpoint_every: 2
          keep_checkpoints: 2
          log_every: 1
        seed: 3
        """) + textwrap.dedent(stages) + extra


STAGES = """
stages:
  - kind: distill
    trains: lora
    lora: {r: 4}
    steps: 6
    batch_size: 1
    grad_accum: GA
    seq_len: 48
    lr: 5e-3
    ce_weight: 0.3
    warmup_steps: 1
    eval_rows: 4
  - kind: finetune
    trains: attention
    steps: 4
    batch_size: BS
    seq_len: 32
    lr: 1e-3
    eval_rows: 4
"""


def tiny_run_root(root: Path, stages: str) -> Path:
    """root/base (a tiny Llama with the byte tokenizer), root/data (a corpus) and root/r.yaml, a recipe of `stages`
    training it into root/run."""
    save_tiny_base(root / "base")
    write_corpus(root / "data")
    (root / "r.yaml").write_text(recipe_text(root / "base", root / "data", root / "run", stages))
    return root


def stages_for(processes: int) -> str:
    """The same global batch of 2 rows: distill as 1 process x 2 accumulated micro-batches or 2 processes x 1;
    finetune as 1 process x 2 rows or 2 processes x 1."""
    return STAGES.replace("GA", str(2 // processes)).replace("BS", str(2 // processes))


def losses(run: Path) -> list[tuple[str, int, float]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["stage"], r["step"], r["loss"]) for r in rows if "event" not in r and "loss" in r]
