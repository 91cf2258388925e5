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


def score(items: Sequence[ProbeItem], predictions: Sequence[Sequence[str]]) -> float:
    """Fraction of answers predicted exactly (after stripping blanks), over all questions of all items."""
    if len(items) != len(predictions):
        raise ValueError(f"{len(items)} items but {len(predictions)} predictions")
    total = correct = 0
    for item, preds in zip(items, predictions):
        if len(preds) != len(item.answers):
            raise ValueError(f"item has {len(item.answers)} answers but {len(preds)} predictions")
        for want, got in zip(item.answers, preds):
            total += 1
            correct += _norm(want) == _norm(got)
    return correct / max(total, 1)


# ---------------------------------------------------------------- a model's predictions

@torch.no_grad()
def model_predictions(model: Any, tokenizer: Any, items: Sequence[ProbeItem], batch_size: int = 1,
                      on_batch: Callable[[int], None] | None = None) -> list[list[str]]:
    """Greedy answers under teacher forcing: the argmax token at every answer position, decoded.

    Items of one length are equally long, so batches need no padding; only the logits of the question tail
    are computed (a 32K x 49K-vocab logit matrix would not fit).
    """
    device = next(model.parameters()).device
    out: list[list[str]] = []
    for b in range(0, len(items), batch_size):
        batch = items[b: b + batch_size]
        lengths = {len(it.ids) for it in batch}
        if len(lengths) != 1:
            raise ValueError("a batch of probe items must share one length")
        (T,) = lengths
        first = min(s for it in batch for s, _ in it.answer_spans)
        keep = T - first + 1  # logits from the position before the first answer token to the end
        ids = torch.tensor([it.ids for it in batch], device=device)
        logits = _tail_logits(model, ids, keep)
        pred = logits.argmax(-1).tolist()  # (B, keep); pred[:, j] predicts token T - keep + j + 1
        for it, row in zip(batch, pred):
            answers = []
            for s, e in it.answer_spans:
                toks = [row[p - 1 - (T - keep)] for p in range(s, e)]
                answers.append(tokenizer.decode(toks, skip_special_tokens=True))
            out.append(answers)
        if on_batch:
            on_batch(len(batch))
    return out


def _tail_logits(model: Any, ids: torch.Tensor, keep: int) -> torch.Tensor:
    try:
        return model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits[:, -keep:].float()
    except TypeError:  # a model class without logits_to_keep: compute the tail from the last hidden states
        hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state[:, -keep:]
        return model.get_output_embeddings()(hidden).float()


def accuracy(model: Any, tokenizer: Any, items: Sequence[ProbeItem], batch_size: int = 1,
             on_batch: Callable[[int], None] | None = None) -> float:
    """score(items, model_predictions(...)): a model's exact-match accuracy on the items."""
    return score(items, model_predictions(model, tokenizer, items, batch_size, on_batch))
