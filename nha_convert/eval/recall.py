"""Synthetic recall probes (no download): passkey retrieval and multi-query associative recall (MQAR).

Both hide facts in filler text far from where they are asked for. A sliding window alone forgets a fact once it
has scrolled out; this is where NHA's slots (and full layers) must show what they add.

Every probe item is a token sequence of exactly the requested length: its answers are scored by greedy decoding
under teacher forcing (the argmax token at each answer position, given the true prefix), which one forward pass
per item gives, and which equals greedy generation for a single answer. Predictions are strings, so the same
scorer grades a model, an oracle that copies the answer from the prompt (100%) and a guesser (chance level).
The items and their grading live in nha_convert/corpora (synthetic, item_files, items); this module runs them.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Sequence

from ..corpora.item_files import FileQuestion, file_items, read_recall_file  # noqa: F401 - run.py reads files here
from ..corpora.items import (ProbeItem, check_lengths, context_length,  # noqa: F401 - run.py, perplexity.py
                             model_predictions, score)
from ..corpora.synthetic import MQAR_RE, PASSKEY_HIGH, PASSKEY_LOW, PASSKEY_RE, PROBES, make_items
from ..errors import NHAError


def chance(probe: str, n_pairs: int = 16) -> float:
    """Accuracy of a guesser: a random five-digit key, or a random one of the item's values."""
    if probe == "passkey":
        return 1.0 / (PASSKEY_HIGH - PASSKEY_LOW + 1)
    if probe == "mqar":
        return 1.0 / n_pairs
    raise NHAError(f"unknown probe {probe!r}; choose from {', '.join(PROBES)}")


# ---------------------------------------------------------------- reference readers

def oracle_predictions(items: Sequence[ProbeItem]) -> list[list[str]]:
    """Answers copied from the prompt text alone: a perfect reader scores 100%."""
    out = []
    for item in items:
        if item.probe == "passkey":
            m = PASSKEY_RE.search(item.context)
            out.append([m.group(1) if m else ""] * len(item.answers))
        else:
            table = dict(MQAR_RE.findall(item.context))
            out.append([table.get(_query_key(q), "") for q in item.queries])
    return out


def guess_predictions(items: Sequence[ProbeItem], seed: int = 0) -> list[list[str]]:
    """A reader that knows the answer format but not the fact: random key / random value of the item."""
    rng = random.Random(seed)
    out = []
    for item in items:
        if item.probe == "passkey":
            out.append([str(rng.randint(PASSKEY_LOW, PASSKEY_HIGH)) for _ in item.answers])
        else:
            values = [v for _, v in MQAR_RE.findall(item.context)]
            out.append([rng.choice(values) for _ in item.answers])
    return out


def _query_key(query: str) -> str:
    return query.strip().lstrip(".").strip().rsplit(" is", 1)[0].split()[-1]


def run_recall(model: Any, tokenizer: Any, lengths: Sequence[int], probes: Sequence[str] = PROBES,
               n: int = 20, seed: int = 0, batch_size: int = 1, n_pairs: int = 16,
               progress: Callable[[str, int], Callable[[int], None]] | None = None,
               files: Sequence[tuple[str, Sequence[FileQuestion]]] = ()) -> dict[str, Any]:
    """Accuracy by probe and length: {"passkey": {"1024": 1.0, ...}, "mqar": {...}, "chance": {...}}; each recall
    file (read_recall_file) adds {name: {bucket: accuracy}} (bucket: length_bucket of its items).

    progress(description, items) gives the callback advanced once per scored item (a bar per probe and length).
    """
    limit = context_length(model)
    if probes:
        check_lengths(lengths, limit, type(model).__name__)
    res: dict[str, Any] = {p: {} for p in probes}
    res["chance"] = {}
    for probe in probes:
        kw = {"n_pairs": n_pairs} if probe == "mqar" else {}
        res["chance"][probe] = chance(probe, n_pairs)
        for L in lengths:
            items = make_items(probe, tokenizer, L, n, seed, **kw)
            cb = progress(f"{probe} @ {L} tokens", len(items)) if progress else None
            res[probe][str(L)] = score(items, model_predictions(model, tokenizer, items, batch_size, cb))
    for name, questions in files:
        res[name] = {}
        for bucket, items in file_items(name, questions, tokenizer, limit).items():
            cb = progress(f"{name} @ <= {bucket} tokens", len(items)) if progress else None
            res[name][str(bucket)] = score(items, model_predictions(model, tokenizer, items, 1, cb))
    return res
