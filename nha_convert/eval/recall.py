"""Running the recall probes of eval/probes.py (passkey, MQAR, natural recall) and recall files on a model.

All hide facts in filler text far from where they are asked for. A sliding window alone forgets a fact once it
has scrolled out; this is where NHA's slots (and full layers) must show what they add.

Every probe item is a token sequence of exactly the requested length: its answers are scored by greedy decoding
under teacher forcing (the argmax token at each answer position, given the true prefix), which one forward pass
per item gives, and which equals greedy generation for a single answer. Predictions are strings, so the same
scorer grades a model, an oracle that copies the answer from the prompt (100%) and a guesser (chance level).
The items and their grading live in nha_convert/corpora (synthetic, natural, item_files, items); this module
runs them.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

# Re-exported: run.py reads recall files here, perplexity.py checks lengths, probes.py builds and grades through here.
from ..corpora.item_files import FileQuestion, file_items, length_bucket, read_recall_file  # noqa: F401
from ..corpora.items import ProbeItem, check_lengths, context_length, model_predictions  # noqa: F401
from ..corpora.items import score as graded_by
from ..corpora.synthetic import (PROBES, chance, guess_predictions, make_items, mqar_items,  # noqa: F401
                                 oracle_predictions, passkey_items)
from . import probes as P


def score(items: Sequence[ProbeItem], predictions: Sequence[Sequence[str]]) -> float:
    """Fraction of answers right, each graded as its probe grades (eval/probes.py: normalised equality, or the
    gold answer contained in a generated one)."""
    return graded_by(items, predictions, P.matcher)


def _vocab_id(tokenizer: Any) -> int:
    return hash((type(tokenizer).__name__, frozenset(tokenizer.get_vocab().items())))


def run_recall(model: Any, tokenizer: Any, lengths: Sequence[int], probes: Sequence[str] = PROBES,
               n: int | None = 20, seed: int = 0, batch_size: int = 1, n_pairs: int = 16,
               progress: Callable[[str, int], Callable[[int], None]] | None = None,
               files: Sequence[tuple[str, Sequence[FileQuestion]]] = (),
               batch_tokens: int | None = None, cache: dict[Any, list[ProbeItem]] | None = None) -> dict[str, Any]:
    """Accuracy by probe and length: {"passkey": {"1024": 1.0, ...}, "mqar": {...}, "chance": {...}}; each recall
    file (read_recall_file) adds {name: {bucket: accuracy}} (bucket: length_bucket of its items). A probe of its own
    length (eval/probes.py: reading) reports one cell at the next power of two of its longest item.

    n: items per cell (None: each probe's default). progress(description, items) gives the callback advanced once
    per scored item (a bar per probe and length). batch_tokens: tokens per forward (model_predictions). `cache`, a
    dict the caller keeps, holds the items between calls: models with the same vocabulary reuse them.
    """
    limit = context_length(model)
    if probes:
        check_lengths(lengths, limit, type(model).__name__)
    res: dict[str, Any] = {p: {} for p in probes}
    res["chance"] = {}
    for name in probes:
        probe = P.get(name)
        kw = {"n_pairs": n_pairs} if name == "mqar" else {}
        count = probe.default_n if n is None else n
        cells: list[tuple[str, list[ProbeItem]]] = []
        for L in ([None] if probe.own_length else lengths):
            key = (name, L, count, seed, n_pairs, _vocab_id(tokenizer))
            items = cache[key] if cache is not None and key in cache else P.items_for(name, tokenizer, L, count,
                                                                                      seed, **kw)
            if cache is not None:
                cache[key] = items
            cells.append((str(L if L is not None else length_bucket(max(len(it.ids) for it in items))), items))
        res["chance"][name] = sum(probe.chance(items, **kw) for _, items in cells) / len(cells)
        for cell, items in cells:
            if limit is not None and max(len(it.ids) for it in items) > limit:
                continue  # reading alone at a model's short context: nothing to measure
            cb = progress(f"{name} @ {cell} tokens", len(items)) if progress else None
            if probe.generate:
                from .answers import generated_predictions

                preds = generated_predictions(model, tokenizer, items, probe.generate, cb, batch_tokens)
            else:
                preds = model_predictions(model, tokenizer, items, batch_size, cb, batch_tokens=batch_tokens)
            res[name][cell] = score(items, preds)
    for name, questions in files:
        res[name] = {}
        for bucket, items in file_items(name, questions, tokenizer, limit).items():
            cb = progress(f"{name} @ <= {bucket} tokens", len(items)) if progress else None
            res[name][str(bucket)] = score(items, model_predictions(model, tokenizer, items, 1, cb,
                                                                    batch_tokens=batch_tokens))
    return res
