"""Answers a model writes in its own words: short greedy generations after a probe item's question."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..corpora.items import ProbeItem


@torch.no_grad()
def generated_predictions(model: Any, tokenizer: Any, items: Sequence[ProbeItem], max_new_tokens: int,
                          on_batch: Callable[[int], None] | None = None,
                          batch_tokens: int | None = None) -> list[list[str]]:
    """Short greedy generations (model.generate, left-padded batches) after each item's one question, cut at the
    first line break: for answers a model may phrase in its own words (eval/probes.py: reading)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    order = sorted(range(len(items)), key=lambda i: items[i].answer_spans[0][0])
    out: list[list[str]] = [[] for _ in items]
    b = 0
    while b < len(order):
        first = items[order[b]].answer_spans[0][0]
        size = 1 if batch_tokens is None else max(1, batch_tokens // (first + max_new_tokens))
        idx = order[b: b + size]
        b += len(idx)
        prompts = [items[i].ids[: items[i].answer_spans[0][0]] for i in idx]
        T = max(map(len, prompts))
        ids = torch.tensor([[pad] * (T - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], device=device)
        new = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad)[:, T:]
        for i, row in zip(idx, new.tolist()):
            out[i] = [tokenizer.decode(row, skip_special_tokens=True).strip().split("\n")[0]]
        if on_batch:
            on_batch(len(idx))
    return out
