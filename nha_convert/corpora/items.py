"""Probe items: a token sequence with answers at known positions, how it is tokenised, answered and graded.

Every item is scored by greedy decoding under teacher forcing (the argmax token at each answer position, given the
true prefix), which one forward pass per item gives, and which equals greedy generation for a single answer.
Predictions are strings, so the same grader scores a model, an oracle that copies the answer from the prompt and a
guesser. Evaluation (eval/recall.py), the stage-end probe of fine-tuning (finetune/probe.py) and the `auto:K`
calibration (layer_selection.py) build on these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..errors import NHAError


@dataclass
class ProbeItem:
    """One probe sequence: token ids, where each answer sits in them, and the texts a reader would see."""

    probe: str
    ids: list[int]
    answer_spans: list[tuple[int, int]]  # [start, end) token positions of each answer
    answers: list[str]  # expected answer strings (compared stripped)
    context: str  # the prompt text before the first question (what an oracle may read)
    queries: list[str] = field(default_factory=list)  # the question text of each answer


class ItemTokenizer:
    """Tokenizer helpers: pieces are tokenized separately and concatenated, so lengths are exact."""

    def __init__(self, tokenizer: Any, filler: str = ""):
        self.tk = tokenizer
        self.filler = self.enc(filler * 8) if filler else []

    def enc(self, text: str) -> list[int]:
        return list(self.tk(text, add_special_tokens=False)["input_ids"])

    def start(self) -> list[int]:
        """The special tokens the tokenizer puts in front of a text by default (BOS for Llama-3, none for SmolLM2)."""
        with_special = list(self.tk("a")["input_ids"])
        plain = self.enc("a")
        return with_special[: len(with_special) - len(plain)] if with_special[-len(plain):] == plain else []

    def fill(self, n: int) -> list[int]:
        """n filler tokens that end on a full stop (the cut, if any, falls at the start of the gap)."""
        if n <= 0:
            return []
        return (self.filler * -(-n // len(self.filler)))[-n:]

    def dec(self, ids: Sequence[int]) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=True)


def context_length(model_or_config: Any) -> int | None:
    """The longest input the model was trained for (max_position_embeddings), or None when it does not say."""
    cfg = getattr(model_or_config, "config", model_or_config)
    value = cfg.get("max_position_embeddings") if isinstance(cfg, dict) else getattr(cfg, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def check_lengths(lengths: Sequence[int], limit: int | None, model: str = "the model") -> None:
    """Probe lengths must be positive and within the model's context length: beyond it the scores measure
    positions the model never saw (nonsense, silently)."""
    bad = [L for L in lengths if L < 1]
    if bad or not lengths:
        raise NHAError(f"--recall-lengths must be positive token counts like 1024,4096; got {list(lengths)}")
    over = [L for L in lengths if limit is not None and L > limit]
    if over:
        raise NHAError(f"recall length(s) {', '.join(map(str, over))} exceed the context length of {model} "
                       f"({limit} tokens); use --recall-lengths up to {limit}")


# ---------------------------------------------------------------- grading

def _norm(s: str) -> str:
    return s.strip().rstrip(".").strip()


Match = Callable[[str, str], bool]  # (gold, prediction) -> right


def exact(want: str, got: str) -> bool:
    """The default grading: equal after stripping blanks and a final full stop."""
    return _norm(want) == _norm(got)


def score(items: Sequence[ProbeItem], predictions: Sequence[Sequence[str]],
          match_of: Callable[[str], Match] | None = None) -> float:
    """Fraction of answers predicted right, over all questions of all items: `match_of(item.probe)` grades each
    answer (the probe registry's normalisation, or containment for a generating probe: eval/probes.py), exact
    otherwise."""
    if len(items) != len(predictions):
        raise ValueError(f"{len(items)} items but {len(predictions)} predictions")
    total = correct = 0
    for item, preds in zip(items, predictions):
        if len(preds) != len(item.answers):
            raise ValueError(f"item has {len(item.answers)} answers but {len(preds)} predictions")
        match = exact if match_of is None else match_of(item.probe)
        for want, got in zip(item.answers, preds):
            total += 1
            correct += bool(match(want, got))
    return correct / max(total, 1)


# ---------------------------------------------------------------- a model's predictions

@torch.no_grad()
def model_predictions(model: Any, tokenizer: Any, items: Sequence[ProbeItem], batch_size: int = 1,
                      on_batch: Callable[[int], None] | None = None,
                      batch_tokens: int | None = None) -> list[list[str]]:
    """Greedy answers under teacher forcing: the argmax token at every answer position, decoded.

    Items of different lengths share a batch padded on the right: a causal model never sees what follows, so the
    padding changes no logit that is read. Only the logits of answer positions are computed (a 32K x 49K-vocab
    logit matrix would not fit). `batch_tokens`, when given, sets the batch to that many tokens (at least one item).
    """
    device = next(model.parameters()).device
    order = sorted(range(len(items)), key=lambda i: len(items[i].ids))  # similar lengths batch together
    out: list[list[str]] = [[] for _ in items]
    b = 0
    while b < len(order):
        size = batch_size if batch_tokens is None else max(1, batch_tokens // len(items[order[b]].ids))
        idx = order[b: b + size]
        b += len(idx)
        batch = [items[i] for i in idx]
        T = max(len(it.ids) for it in batch)
        ids = torch.tensor([it.ids + [it.ids[-1]] * (T - len(it.ids)) for it in batch], device=device)
        # position p - 1 predicts the answer token at p
        positions = sorted({p - 1 for it in batch for s, e in it.answer_spans for p in range(s, e)})
        col = {p: j for j, p in enumerate(positions)}
        pred = _logits_at(model, ids, positions).argmax(-1).tolist()  # (B, len(positions))
        for i, it, row in zip(idx, batch, pred):
            out[i] = [tokenizer.decode([row[col[p - 1]] for p in range(s, e)], skip_special_tokens=True)
                      for s, e in it.answer_spans]
        if on_batch:
            on_batch(len(batch))
    return out


def _logits_at(model: Any, ids: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """Logits at the given (sorted) positions only, (B, len(positions), vocab) in fp32."""
    T = ids.shape[1]
    keep = T - positions[0]
    if keep <= max(256, 2 * len(positions)):  # a short tail of logits: what every model class takes
        cols = [p - (T - keep) for p in positions]
        try:
            return model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits[:, -keep:][:, cols].float()
        except TypeError:  # a model class without logits_to_keep
            pass
    # answers of right-padded items far apart: the hidden states at those positions through the LM head
    hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state[:, positions]
    return model.get_output_embeddings()(hidden).float()


def accuracy(model: Any, tokenizer: Any, items: Sequence[ProbeItem], batch_size: int = 1,
             on_batch: Callable[[int], None] | None = None) -> float:
    """score(items, model_predictions(...)): a model's exact-match accuracy on the items."""
    return score(items, model_predictions(model, tokenizer, items, batch_size, on_batch))
