"""The project's own recall items (no download): passkey retrieval and multi-query associative recall (MQAR).

Both hide facts in filler text far from where they are asked for. A sliding window alone forgets a fact once it
has scrolled out; this is where NHA's slots (and full layers) must show what they add. Every item is a token
sequence of exactly the requested length (items.ProbeItem).
"""

from __future__ import annotations

import random
import re
from typing import Any, Sequence

from ..errors import NHAError
from .items import ItemTokenizer, ProbeItem

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


def _assemble(probe: str, head: list[list[int]], fills: list[int], facts: list[list[int]],
              tail: list[tuple[list[int], list[int], str, str]], t: ItemTokenizer) -> ProbeItem:
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
    t, rng = ItemTokenizer(tokenizer, FILLER), random.Random(f"passkey-{length}-{seed}")
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
    t, rng = ItemTokenizer(tokenizer, FILLER), random.Random(f"mqar-{length}-{seed}-{n_pairs}")
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
    if probe == "passkey":
        return passkey_items(tokenizer, length, n, seed)
    if probe == "mqar":
        return mqar_items(tokenizer, length, n, seed, **kw)
    raise NHAError(f"unknown probe {probe!r}; choose from {', '.join(PROBES)}")


# ---------------------------------------------------------------- chance, and the reference readers

def chance(probe: str, n_pairs: int = 16) -> float:
    """Accuracy of a guesser: a random five-digit key, or a random one of the item's values."""
    if probe == "passkey":
        return 1.0 / (PASSKEY_HIGH - PASSKEY_LOW + 1)
    if probe == "mqar":
        return 1.0 / n_pairs
    raise NHAError(f"unknown probe {probe!r}; choose from {', '.join(PROBES)}")


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
