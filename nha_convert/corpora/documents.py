"""Documents of real text with facts at drawn depths: the splits every passage, key and answer belongs to, the
filler passages of each split, and the token-exact layout (facts, filler, questions) that retrieval documents
(retrieval.py) and cloze documents (cloze.py) share.
"""

from __future__ import annotations

import functools
import hashlib
import random
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..errors import NHAError
from .sources import boolq_documents, shakespeare_documents

SPLITS = ("train", "eval")
EVAL_SHARE = 5  # one item in 5 (by hash) belongs to the eval split
MARGIN = 8  # tokens of slack kept beyond min_distance: the whole text may tokenize a little differently
KV_PAIRS = (4, 16)  # pairs in a kv_list document (retrieval.py), drawn in [lo, hi]; fewer make an easier curriculum


@dataclass
class QA:
    """One question: character offsets in the document text, and the key / answer it asks for."""

    key: str
    answer: str
    question_start: int
    answer_start: int
    answer_end: int
    fact_end: int  # end of the last statement of this answer before the question


@dataclass
class RetrievalDoc:
    format: str
    text: str
    target_tokens: int
    qas: list[QA]
    keys: list[str]  # every key the document states (asked or not)
    answers: list[str]  # every answer-like value the document states
    passages: list[str] = field(repr=False, default_factory=list)  # the filler passages used (hash ids)


# --- splits and pools ------------------------------------------------------------------------------


def split_of(text: str) -> str:
    """The split an item (passage, key or answer) belongs to: a stable hash of its text."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")
    return "eval" if h % EVAL_SHARE == 0 else "train"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise NHAError(f"unknown retrieval split {split!r}; choose one of {', '.join(SPLITS)}")


def _pool(items: Sequence[str], split: str) -> list[str]:
    out = [x for x in items if split_of(x) == split]
    if not out:
        raise NHAError(f"no {split} items in a retrieval pool; this is a bug in corpora/retrieval.py")
    return out


@functools.lru_cache(maxsize=2)
def filler_passages(split: str) -> tuple[str, ...]:
    """Real-text passages of one split: Shakespeare paragraphs (merged to ~600+ characters) and BoolQ passages."""
    _check_split(split)
    passages: list[str] = []
    for play in shakespeare_documents():
        buf: list[str] = []
        for para in play.split("\n\n"):
            para = para.strip()
            if para:
                buf.append(para)
            if sum(map(len, buf)) >= 600:
                passages.append("\n\n".join(buf))
                buf = []
    passages += [p.strip() for p in boolq_documents() if p.strip()]
    return tuple(_pool(passages, split))


# --- token-exact filler ----------------------------------------------------------------------------


# Token ids of each split's filler passages per tokenizer, as the filler joins them ("\n\n" in front). Tokenising
# them again for every use was three quarters of the generation time (docs/performance.md, session 9). Keyed by the
# tokenizer's id, with the tokenizer kept in the entry so that the id cannot be reused; a few tokenizers at most.
_POOL_IDS: dict[tuple[int, str], tuple[Any, dict[str, list[int]]]] = {}


def _pool_ids(tokenizer: Any, split: str) -> dict[str, list[int]]:
    key = (id(tokenizer), split)
    if key not in _POOL_IDS:
        if len(_POOL_IDS) >= 4:
            _POOL_IDS.pop(next(iter(_POOL_IDS)))
        pool = filler_passages(split)
        enc = tokenizer(["\n\n" + p for p in pool], add_special_tokens=False)["input_ids"]  # one batch: all cores
        _POOL_IDS[key] = (tokenizer, dict(zip(pool, enc)))
    return _POOL_IDS[key][1]


class _Builder:
    """One document's tokenizer, random stream and filler."""

    def __init__(self, tokenizer: Any, split: str, rng: random.Random, kv_pairs: tuple[int, int] = KV_PAIRS):
        self.tk, self.rng, self.split, self.kv_pairs = tokenizer, rng, split, kv_pairs
        self.pool = filler_passages(split)
        self.used: list[str] = []
        self.pool_ids = _pool_ids(tokenizer, split)

    def count(self, text: str) -> int:
        return len(self.tk(text, add_special_tokens=False)["input_ids"])

    def filler(self, n: int) -> str:
        """About n tokens of real text: whole passages, the last one cut at a token (a word when possible)."""
        parts: list[str] = []
        while n > 0:
            p = self.rng.choice(self.pool)
            self.used.append(p)
            ids = self.pool_ids[p]
            if len(ids) <= n:
                parts.append("\n\n" + p)
                n -= len(ids)
            else:
                parts.append(self.tk.decode(ids[:n]))
                n = 0
        return "".join(parts)


def _layout(b: _Builder, head: str, facts: list[str], tail: list[tuple[str, str]], length: int,
            min_distance: int) -> tuple[str, list[int], list[tuple[int, int, int]]]:
    """head, the facts in order at drawn depths in filler, more filler, then the questions with their answers.

    Every fact lies more than min_distance tokens before the first question. Returns the text, the end offset of
    each fact, and (question start, answer start, answer end) per question.
    """
    fact_sep = ["\n\n" if "\n" in f else " " for f in facts]  # a list stands in its own paragraph
    q_sep = ["\n\n"] + ["\n"] * (len(tail) - 1)
    fixed = b.count(head) + sum(b.count(s + f) for s, f in zip(fact_sep, facts)) + \
        sum(b.count(s + q + a) for s, (q, a) in zip(q_sep, tail))
    free = length - fixed
    gap = min_distance + MARGIN  # filler tokens after the last asked fact
    if free < gap + len(facts):
        raise NHAError(f"retrieval documents of {length} tokens leave no room for {min_distance} tokens between "
                       "fact and question; raise min_tokens or lower min_distance")
    # Fact depths: drawn over [0, free - gap] so that the question always lies more than min_distance after.
    spots = sorted(b.rng.randint(0, free - gap) for _ in facts)
    sizes = [spots[0]] + [spots[i] - spots[i - 1] for i in range(1, len(spots))] + [free - spots[-1]]
    text, fact_ends = head, []
    for size, sep, fact in zip(sizes, fact_sep, facts):
        text += b.filler(size) + sep + fact
        fact_ends.append(len(text))
    questions = "".join(sep + q + a for sep, (q, a) in zip(q_sep, tail))
    last = b.filler(sizes[-1])
    # Pieces tokenized apart can merge when joined: redraw the last filler once, sized by the whole text's count.
    off = length - b.count(text + last + questions)
    if off:
        last = b.filler(max(sizes[-1] + off, gap - MARGIN // 2))
    text += last
    spans = []
    for sep, (q, a) in zip(q_sep, tail):
        q_start = len(text) + len(sep)
        text += sep + q
        spans.append((q_start, len(text), len(text) + len(a)))
        text += a
    return text, fact_ends, spans


def filler_text(tokenizer: Any, split: str, rng: random.Random, n_tokens: int) -> str:
    """About n_tokens of real text from one split's filler passages (for needles in other formats than these)."""
    _check_split(split)
    return _Builder(tokenizer, split, rng).filler(n_tokens)
