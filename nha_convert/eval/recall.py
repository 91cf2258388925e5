"""Synthetic recall probes (no download): passkey retrieval and multi-query associative recall (MQAR).

Both hide facts in filler text far from where they are asked for. A sliding window alone forgets a fact once it
has scrolled out; this is where NHA's slots (and full layers) must show what they add.

Every probe item is a token sequence of exactly the requested length: its answers are scored by greedy decoding
under teacher forcing (the argmax token at each answer position, given the true prefix), which one forward pass
per item gives, and which equals greedy generation for a single answer. Predictions are strings, so the same
scorer grades a model, an oracle that copies the answer from the prompt (100%) and a guesser (chance level).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import NHAError

PROBES = ("passkey", "mqar")

# Neutral filler, the usual choice for passkey tests: it carries no facts and no digits.
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
                 "Find it and memorize it. I will quiz you about it later.\n")
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"
PASSKEY_RE = re.compile(r"The pass key is (\d+)\.")
PASSKEY_LOW, PASSKEY_HIGH = 10000, 99999  # five-digit keys: a guesser's chance is 1 / 90000

MQAR_INTRO = "Remember which number belongs to each word.\n"
MQAR_PAIR = " {key} is {value}."
MQAR_RECALL = "\nNow recall the numbers.\n"
MQAR_QUERY = " {key} is"
MQAR_RE = re.compile(r"([A-Za-z]+) is (\d+)\.")
MQAR_VALUES = (100, 999)  # three-digit values, all distinct within an item
# Plain, common words (one or two tokens in most vocabularies) as keys.
MQAR_KEYS = (
    "apple banana cherry grape lemon mango orange peach pear plum river mountain forest desert island ocean "
    "valley meadow canyon glacier table chair window door floor garden kitchen bottle candle mirror pencil "
    "basket ladder hammer rocket camera guitar violin piano trumpet drum tiger lion zebra horse rabbit eagle "
    "falcon dolphin whale shark spider turtle parrot wolf bear fox owl castle bridge tower temple market "
    "harbor station museum library school doctor farmer sailor painter singer writer baker pilot teacher "
    "soldier winter summer autumn spring morning evening thunder rain snow storm cloud silver copper iron "
    "marble crystal velvet cotton leather paper"
).split()


@dataclass
class ProbeItem:
    """One probe sequence: token ids, where each answer sits in them, and the texts a reader would see."""

    probe: str
    ids: list[int]
    answer_spans: list[tuple[int, int]]  # [start, end) token positions of each answer
    answers: list[str]  # expected answer strings (compared stripped)
    context: str  # the prompt text before the first question (what an oracle may read)
    queries: list[str] = field(default_factory=list)  # the question text of each answer


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


def chance(probe: str, n_pairs: int = 16) -> float:
    """Accuracy of a guesser: a random five-digit key, or a random one of the item's values."""
    if probe == "passkey":
        return 1.0 / (PASSKEY_HIGH - PASSKEY_LOW + 1)
    if probe == "mqar":
        return 1.0 / n_pairs
    raise NHAError(f"unknown probe {probe!r}; choose from {', '.join(PROBES)}")


# ---------------------------------------------------------------- building items

class _Tok:
    """Tokenizer helpers: pieces are tokenized separately and concatenated, so lengths are exact."""

    def __init__(self, tokenizer: Any):
        self.tk = tokenizer
        self.filler = self.enc(FILLER * 8)

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


def _assemble(probe: str, head: list[list[int]], fills: list[int], facts: list[list[int]],
              tail: list[tuple[list[int], list[int], str, str]], t: _Tok) -> ProbeItem:
    """head + (fill_0 fact_0 fill_1 fact_1 ...) + fill_last + queries with answers."""
    ids: list[int] = [x for part in head for x in part]
    for i, fact in enumerate(facts):
        ids += t.fill(fills[i]) + fact
    ids += t.fill(fills[len(facts)])
    context = t.dec(ids)
    spans, answers, queries = [], [], []
    for q_ids, a_ids, q_text, answer in tail:
        ids += q_ids
        spans.append((len(ids), len(ids) + len(a_ids)))
        ids += a_ids
        answers.append(answer)
        queries.append(q_text)
    return ProbeItem(probe, ids, spans, answers, context, queries)


def _split(total: int, parts: int, rng: random.Random, weights: Sequence[float] | None = None) -> list[int]:
    w = list(weights) if weights is not None else [rng.random() + 0.05 for _ in range(parts)]
    s = sum(w)
    out = [int(total * x / s) for x in w]
    out[-1] += total - sum(out)
    return out


def passkey_items(tokenizer: Any, length: int, n: int, seed: int = 0) -> list[ProbeItem]:
    """n passkey items of exactly `length` tokens; the needle's depth is spread evenly over [5%, 95%]."""
    t, rng = _Tok(tokenizer), random.Random(f"passkey-{length}-{seed}")
    items = []
    for i in range(n):
        key = rng.randint(PASSKEY_LOW, PASSKEY_HIGH)
        head = [t.start(), t.enc(PASSKEY_INTRO)]
        needle = t.enc(PASSKEY_NEEDLE.format(key=key))
        q_ids, a_ids = t.enc(PASSKEY_QUESTION), t.enc(f" {key}")
        fixed = sum(map(len, head)) + len(needle) + len(q_ids) + len(a_ids)
        free = length - fixed
        if free < 0:
            raise NHAError(f"passkey length {length} is too short; use at least {fixed} tokens")
        depth = 0.05 + 0.9 * (i / max(n - 1, 1))
        before = int(free * depth)
        items.append(_assemble("passkey", head, [before, free - before], [needle],
                               [(q_ids, a_ids, PASSKEY_QUESTION, str(key))], t))
    return items


def mqar_items(tokenizer: Any, length: int, n: int, seed: int = 0, n_pairs: int = 16,
               n_queries: int = 4) -> list[ProbeItem]:
    """n MQAR items: `n_pairs` word -> number facts spread through filler, then `n_queries` of them asked back."""
    if not 1 <= n_queries <= n_pairs <= len(MQAR_KEYS):
        raise NHAError(f"MQAR needs 1 <= queries <= pairs <= {len(MQAR_KEYS)}, got {n_queries} and {n_pairs}")
    t, rng = _Tok(tokenizer), random.Random(f"mqar-{length}-{seed}-{n_pairs}")
    items = []
    for _ in range(n):
        keys = rng.sample(MQAR_KEYS, n_pairs)
        values = rng.sample(range(MQAR_VALUES[0], MQAR_VALUES[1] + 1), n_pairs)
        facts = [t.enc(MQAR_PAIR.format(key=k, value=v)) for k, v in zip(keys, values)]
        head = [t.start(), t.enc(MQAR_INTRO)]
        asked = rng.sample(range(n_pairs), n_queries)
        tail = []
        for j, q in enumerate(asked):
            q_text = (MQAR_RECALL if j == 0 else ".") + MQAR_QUERY.format(key=keys[q])
            tail.append((t.enc(q_text), t.enc(f" {values[q]}"), q_text, str(values[q])))
        fixed = sum(map(len, head)) + sum(map(len, facts)) + sum(len(a) + len(b) for a, b, _, _ in tail)
        free = length - fixed
        if free < 0:
            raise NHAError(f"MQAR length {length} is too short for {n_pairs} pairs; use at least {fixed} tokens")
        # Facts spread over the whole document; the last gap (before the questions) is kept short on purpose:
        # the first facts are then as far from their question as the length allows.
        fills = _split(free, n_pairs + 1, rng, weights=[1.0] * n_pairs + [0.05])
        items.append(_assemble("mqar", head, fills, facts, tail, t))
    return items


def make_items(probe: str, tokenizer: Any, length: int, n: int, seed: int = 0, **kw: Any) -> list[ProbeItem]:
    """Passkey or MQAR items; every probe by name (the natural ones too): eval/probes.items_for."""
    if probe == "passkey":
        return passkey_items(tokenizer, length, n, seed)
    if probe == "mqar":
        return mqar_items(tokenizer, length, n, seed, **kw)
    raise NHAError(f"unknown probe {probe!r}; choose from {', '.join(PROBES)}")


# ---------------------------------------------------------------- scoring

# ---------------------------------------------------------------- items of your own (--recall-file)

@dataclass
class FileQuestion:
    """One line of a recall file: a prompt that ends where the answer starts, and the answer."""

    prompt: str
    answer: str
    line: int


def read_recall_file(path: str | Path) -> tuple[str, list[FileQuestion]]:
    """(probe name, questions) of a JSON-lines file of {"prompt": ..., "answer": ...}, checked without a model.

    The probe is named after the file (`needles.jsonl` -> needles); every line must hold a non-empty prompt and
    answer. Any other key is ignored, so richer files (a "depth", a "source") can carry their own notes.
    """
    path = Path(path)
    name = path.stem
    from .probes import PROBES as REGISTERED

    if name in (*REGISTERED, "chance"):
        raise NHAError(f"--recall-file {path}: the name {name!r} is a built-in probe's; rename the file")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise NHAError(f"--recall-file {path}: cannot read it ({e.strerror or e}); give a JSON-lines file of "
                       '{"prompt": ..., "answer": ...}') from None
    questions = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise NHAError(f"{path}:{n}: not JSON ({e.msg}); each line must be one object like "
                           '{"prompt": "... The code is", "answer": " 4417"}') from None
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) and row[k].strip()
                                                for k in ("prompt", "answer")):
            raise NHAError(f'{path}:{n}: needs "prompt" and "answer", both non-empty strings')
        questions.append(FileQuestion(row["prompt"], row["answer"], n))
    if not questions:
        raise NHAError(f"--recall-file {path} holds no questions; give one JSON object per line")
    return name, questions


def length_bucket(n_tokens: int) -> int:
    """The column an item of n tokens reports in: the next power of two (items of 600 and 1000 tokens: 1024)."""
    return 1 << max(0, n_tokens - 1).bit_length()


def file_items(name: str, questions: Sequence[FileQuestion], tokenizer: Any,
               limit: int | None = None) -> dict[int, list[ProbeItem]]:
    """The questions as probe items, by length bucket: the tokenizer's start tokens, the prompt, then the answer,
    tokenized apart (an answer that follows a word should start with a space, as the built-in probes' do).
    An item longer than `limit` (the model's context length) is an error naming its line."""
    t = _Tok(tokenizer)
    start = t.start()
    out: dict[int, list[ProbeItem]] = {}
    for q in questions:
        head, a_ids = start + t.enc(q.prompt), t.enc(q.answer)
        ids = head + a_ids
        if limit is not None and len(ids) > limit:
            raise NHAError(f"{name}, line {q.line}: {len(ids)} tokens, more than the context length of the model "
                           f"({limit}); shorten it or leave it out")
        item = ProbeItem(name, ids, [(len(head), len(ids))], [q.answer], q.prompt, [])
        out.setdefault(length_bucket(len(ids)), []).append(item)
    return dict(sorted(out.items()))


def _norm(s: str) -> str:
    return s.strip().rstrip(".").strip()


def score(items: Sequence[ProbeItem], predictions: Sequence[Sequence[str]]) -> float:
    """Fraction of answers predicted right (exactly after the probe's normalisation, or for a generating probe
    contained in the generation: eval/probes.py), over all questions of all items."""
    from .probes import matcher

    if len(items) != len(predictions):
        raise ValueError(f"{len(items)} items but {len(predictions)} predictions")
    total = correct = 0
    for item, preds in zip(items, predictions):
        if len(preds) != len(item.answers):
            raise ValueError(f"item has {len(item.answers)} answers but {len(preds)} predictions")
        match = matcher(item.probe)
        for want, got in zip(item.answers, preds):
            total += 1
            correct += match(want, got)
    return correct / max(total, 1)


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
    from . import probes as P

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
