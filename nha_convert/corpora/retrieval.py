"""Retrieval documents: a fact, then real text that carries it far out of the window, then a question on it.

A model with a sliding window can only answer through its slots (or a full layer), so training on these documents
gives the slots a loss that depends on what left the window. The text varies on purpose, so the model learns
retrieval rather than one template:
- `passkey`: a number under varied names ("the access code", "the PIN") and wordings, asked back in another one;
- `kv_list`: 4-16 key -> value pairs as one list (colon, arrow, JSON, table row) or scattered, 1-3 looked up;
- `fact`: 2-4 invented people with a home town, job, pet or number, sometimes restated far apart, 1-2 asked;
- `cloze`: a real passage read once, then asked about in its own words far below: the rest of one of its sentences,
  or a blanked word of it (natural-text recall: nothing in it is a template the model could learn instead).

Filler is real prose: passages of the embedded Shakespeare plays (not The Winter's Tale, evaluation's held-out
text) and BoolQ's Wikipedia passages. Every document is a pure function of (split, seed, index).

Splits: every filler passage, key (name, list key) and answer string belongs to exactly one split, decided by a
hash of its text (`split_of`), so no answer, key or filler passage of the `eval` split ever appears in `train`.
Lengths are in tokens of the given tokenizer (within a few tokens: pieces are counted separately), and every
question is at least `min_distance` tokens after the end of the last statement of its answer.
"""

from __future__ import annotations

import functools
import random
from typing import Any, Sequence

from ..errors import NHAError
from .cloze import _cloze
# The shared document machinery, re-exported: callers know these names from here.
from .documents import (KV_PAIRS, MARGIN, QA, SPLITS, RetrievalDoc, _Builder, _check_split,  # noqa: F401
                        _layout, _pool, filler_passages, filler_text, split_of)
from .items import ItemTokenizer, ProbeItem

FORMATS = ("passkey", "kv_list", "fact", "cloze")
DEFAULT_FORMATS = ("passkey", "kv_list", "fact")  # what a source without `formats` draws
KV_MAX_PAIRS = 16  # at most 16 keys in one list, as MQAR asks (synthetic.py)


def check_kv_pairs(kv_pairs: Sequence[int]) -> tuple[int, int]:
    """(lo, hi) from a recipe's `kv_pairs`, or a one-line error."""
    if len(kv_pairs) != 2 or not 1 <= kv_pairs[0] <= kv_pairs[1] <= KV_MAX_PAIRS:
        raise NHAError(f"kv_pairs must be [lo, hi] with 1 <= lo <= hi <= {KV_MAX_PAIRS}, got {list(kv_pairs)}")
    return int(kv_pairs[0]), int(kv_pairs[1])


INTROS = ("", "", "Read the following text carefully.\n\n", "Below is a long document. Some details in it "
          "matter later.\n\n", "Excerpts:\n\n", "Pay attention to any names and numbers in this text.\n\n")

PASSKEY_NOUNS = ("pass key", "access code", "secret number", "combination of the safe", "verification code",
                 "password of the archive", "PIN", "ticket number", "locker number", "door code")
PASSKEY_FACTS = ("The {noun} is {v}.", "Remember this: the {noun} is {v}.",
                 "Important - the {noun} is {v}. Keep it in mind.", "Write it down: {noun} = {v}.",
                 "(Note: the {noun} is {v}. Do not forget it.)", "Someone whispered that the {noun} was {v}.")
PASSKEY_QUESTIONS = ("What is the {noun}? The {noun} is", "Earlier the text gave the {noun}. It was",
                     "Question: what was the {noun}?\nAnswer:", "Recall the {noun} from above:",
                     "The {noun} mentioned before is")

KV_LINES = ("{k}: {v}", "{k} = {v}", '"{k}": "{v}",', "| {k} | {v} |", "{k} -> {v}")
KV_INTROS = ("Here is a list of records.\n", "Reference table:\n", "Inventory codes:\n", "Lookup list:\n")
KV_QUESTIONS = ("What is the value of {k} in the list above? It is", "Look up {k} in the list:",
                "Question: which value belongs to {k}?\nAnswer:", "From the records, {k} has the value")
KV_WORDS_A = ("amber copper silent hollow crimson velvet distant frozen golden hidden iron lunar northern "
              "pale quiet rapid scarlet silver stormy wild ancient bright broken cobalt dusty emerald")
KV_WORDS_B = ("falcon harbor lantern meadow orchard pillar quarry raven saddle thistle tunnel vessel willow "
              "anchor beacon canyon compass ember fjord garnet glacier kettle marble nomad prism")

FIRST = ("Alice Arthur Beatrice Benedict Clara Cedric Dora Edmund Eliza Felix Greta Hugo Irene Jasper Leona "
         "Marcus Nadia Oliver Petra Quentin Rosalind Silas Tamsin Victor Wilma Ansel Bianca Corwin Delphine "
         "Emrys Fiona Gideon Hazel Ivo Juno Kasimir Lorna Magnus Noemi Osric")
LAST = ("Ashworth Blackwood Carrow Dunmore Ellery Fairbanks Greaves Holloway Ingram Jessop Kendrick Lockhart "
        "Marlow Northcott Oakley Pemberton Quill Radcliffe Sterling Thorne Underhill Vance Whitlock Yardley "
        "Ashby Brennan Calloway Dalton Everly Fenwick")
TOWN_A = "Brack Elm Thorn Ash Wil Kings Marl Red Stan Hollow Fen Gold Oak Raven Stone Brook Mill Fox Har Lin"
TOWN_B = "ford worth bury ton stead mere field wick haven ridge dale gate moor well combe"
JOBS = ("baker", "carpenter", "surgeon", "pilot", "librarian", "gardener", "sailor", "locksmith", "potter",
        "violinist", "astronomer", "beekeeper", "cartographer", "blacksmith", "chemist", "tailor", "jeweller",
        "shepherd", "printer", "glassblower", "clockmaker", "engineer", "painter", "weaver", "fisherman",
        "architect", "butcher", "cobbler", "dentist", "electrician", "farrier", "geologist", "harpist", "illustrator",
        "journalist", "knitter", "lawyer", "mason", "nurse", "optician", "plumber", "quilter", "roofer", "saddler",
        "translator", "upholsterer", "vet", "welder", "zookeeper", "brewer", "chandler", "drummer", "florist")
PETS = ("cat", "dog", "parrot", "horse", "tortoise", "goat", "ferret", "owl")
PET_NAMES = ("Biscuit Pepper Juniper Marble Clover Toffee Saffron Bramble Pickle Nutmeg Willow Sable Cobalt "
             "Maple Thimble Ginger Sprout Pebble Mistral Quince Tansy Barley Fennel Hazelnut Rook Acorn Button "
             "Cinder Dumpling Echo Fable Gumdrop Honey Inkwell Jasmine Kipper Lentil Mango Noodle Olive Parsnip "
             "Pudding Radish Sherbet Truffle Waffle Yarrow Zephyr Basil Caramel Domino Fudge Goblin Hickory Jelly "
             "Kiwi Licorice Muffin Nugget Oatmeal Paprika Rumble Sesame Tinker Velvet Whisker Bramblewood Sorrel")
FACTS = {  # attribute: (statement, question, restatement without the answer)
    "town": ("{name} was born in {a}.", "Where was {name} born? {name} was born in",
             "Years later, {name} still spoke of home."),
    "job": ("{name} works as a {a}.", "What is {name}'s job? {name} works as a",
            "{name} was known for hard work."),
    "pet": ("{name} keeps a {pet} called {a}.", "What is the name of {name}'s {pet}? It is called",
            "{name}'s {pet} was often seen by the window."),
    "number": ("{name}'s lucky number is {a}.", "What is {name}'s lucky number? It is",
               "{name} never told anyone why that number mattered."),
}


@functools.lru_cache(maxsize=2)
def _names(split: str) -> tuple[list[str], list[str], list[str], list[str]]:
    """(people, list keys, towns, pet names) of one split."""
    people = [f"{f} {s}" for f in FIRST.split() for s in LAST.split()]
    keys = [f"{a}-{b}" for a in KV_WORDS_A.split() for b in KV_WORDS_B.split()]
    towns = [a + b for a in TOWN_A.split() for b in TOWN_B.split()]
    return _pool(people, split), _pool(keys, split), _pool(towns, split), _pool(PET_NAMES.split(), split)


def _number(rng: random.Random, split: str, digits: tuple[int, int]) -> str:
    while True:
        d = rng.randint(*digits)
        v = str(rng.randint(10 ** (d - 1), 10**d - 1))
        if split_of(v) == split:
            return v


def _numbers(rng: random.Random, split: str, digits: tuple[int, int], n: int) -> list[str]:
    """n distinct numbers of the split (one document never gives two keys the same answer)."""
    out: list[str] = []
    while len(out) < n:
        v = _number(rng, split, digits)
        if v not in out:
            out.append(v)
    return out


# --- the three formats -----------------------------------------------------------------------------


def _passkey(b: _Builder, length: int, min_distance: int) -> RetrievalDoc:
    rng = b.rng
    noun = rng.choice(PASSKEY_NOUNS)
    v = _number(rng, b.split, (4, 7))
    fact = rng.choice(PASSKEY_FACTS).format(noun=noun, v=v)
    q = rng.choice(PASSKEY_QUESTIONS).format(noun=noun)
    text, ends, spans = _layout(b, rng.choice(INTROS), [fact], [(q, " " + v)], length, min_distance)
    (qs, a0, a1), = spans
    # The noun is wording shared by both splits, not a key: a passkey document states no key.
    return RetrievalDoc("passkey", text, length, [QA(noun, v, qs, a0, a1, ends[0])], [], [v], b.used)


def _kv_list(b: _Builder, length: int, min_distance: int) -> RetrievalDoc:
    rng = b.rng
    _, key_pool, _, _ = _names(b.split)
    n = rng.randint(*b.kv_pairs)
    keys = rng.sample(key_pool, n)
    values = _numbers(rng, b.split, (3, 6), n)
    line = rng.choice(KV_LINES)
    lines = [line.format(k=k, v=v) for k, v in zip(keys, values)]
    asked = rng.sample(range(n), rng.randint(1, min(3, n)))
    if rng.random() < 0.5:  # one list: every pair ends where the list ends
        facts = [rng.choice(KV_INTROS) + "\n".join(lines) + "\n"]
        last = {i: 0 for i in range(n)}
    else:  # scattered through the text
        facts, last = lines, {i: i for i in range(n)}
    tail = []
    for i in asked:
        q = rng.choice(KV_QUESTIONS).format(k=keys[i])
        tail.append((q, " " + values[i]))
    text, ends, spans = _layout(b, rng.choice(INTROS), facts, tail, length, min_distance)
    qas = [QA(keys[i], values[i], qs, a0, a1, ends[last[i]]) for i, (qs, a0, a1) in zip(asked, spans)]
    return RetrievalDoc("kv_list", text, length, qas, keys, values, b.used)


def _fact(b: _Builder, length: int, min_distance: int) -> RetrievalDoc:
    rng = b.rng
    people_pool, _, towns, pets = _names(b.split)
    people = rng.sample(people_pool, rng.randint(2, 4))
    kind = rng.choice(sorted(FACTS))
    statement, question, restate = FACTS[kind]
    pet = rng.choice(PETS)
    pool = {"town": towns, "job": _pool(JOBS, b.split), "pet": pets}.get(kind)
    answers = rng.sample(pool, len(people)) if pool is not None else _numbers(rng, b.split, (2, 4), len(people))
    facts, last_of = [], {}
    for i, (name, a) in enumerate(zip(people, answers)):
        facts.append(statement.format(name=name, a=a, pet=pet))
        last_of[i] = len(facts) - 1
        if rng.random() < 0.5:  # the name comes back later without the answer: a far-apart restatement
            facts.append(restate.format(name=name, pet=pet))
    asked = rng.sample(range(len(people)), rng.randint(1, min(2, len(people))))
    tail = []
    for i in asked:
        q = question.format(name=people[i], pet=pet)
        tail.append((q, " " + answers[i]))
    text, ends, spans = _layout(b, rng.choice(INTROS), facts, tail, length, min_distance)
    qas = [QA(people[i], answers[i], qs, a0, a1, ends[last_of[i]]) for i, (qs, a0, a1) in zip(asked, spans)]
    return RetrievalDoc("fact", text, length, qas, people, answers, b.used)


BUILDERS = {"passkey": _passkey, "kv_list": _kv_list, "fact": _fact, "cloze": _cloze}


def retrieval_documents(tokenizer: Any, n: int, *, split: str = "train", seed: int = 0, min_tokens: int = 1024,
                        max_tokens: int = 8192, min_distance: int = 512, formats: Sequence[str] = DEFAULT_FORMATS,
                        kv_pairs: Sequence[int] = KV_PAIRS) -> list[RetrievalDoc]:
    """n documents, lengths drawn uniformly in [min_tokens, max_tokens], formats in turn; deterministic.
    `kv_pairs` (lo, hi): how many key-value pairs a kv_list document holds, drawn in [lo, hi]."""
    _check_split(split)
    lo, hi = check_kv_pairs(kv_pairs)
    bad = [f for f in formats if f not in BUILDERS]
    if bad or not formats:
        raise NHAError(f"unknown retrieval format {bad[0] if bad else '(none)'}; choose from {', '.join(FORMATS)}")
    if not 0 < min_tokens <= max_tokens:
        raise NHAError(f"retrieval lengths need 0 < min_tokens <= max_tokens, got {min_tokens} and {max_tokens}")
    docs = []
    for i in range(n):
        rng = random.Random(f"retrieval-{split}-{seed}-{i}")
        length = rng.randint(min_tokens, max_tokens)
        builder = _Builder(tokenizer, split, rng, (lo, hi))
        docs.append(BUILDERS[formats[i % len(formats)]](builder, length, min_distance))
    return docs


class AnswerText(str):
    """A document's text with its answers' character spans and the loss weight they get (finetune/data.py turns them into
    per-token weights)."""

    answer_spans: tuple[tuple[int, int], ...]
    answer_weight: float

    def __new__(cls, text: str, spans: Sequence[tuple[int, int]], weight: float) -> "AnswerText":
        out = super().__new__(cls, text)
        out.answer_spans, out.answer_weight = tuple(spans), float(weight)
        return out


def source_documents(src: Any, tokenizer: Any, seed: int) -> list[str]:
    """The texts of a recipe's `kind: retrieval` data source (always the train split); with an `answer_weight`
    other than 1, as AnswerText carrying where the answers are."""
    if tokenizer is None:
        raise NHAError("retrieval data needs the model's tokenizer to measure lengths")
    # Two tokens of room for the BOS / EOS tokens that tokenization adds, so a document fits a max_tokens row.
    docs = retrieval_documents(tokenizer, src.samples, split="train", seed=seed, min_tokens=src.min_tokens - 2,
                               max_tokens=src.max_tokens - 2, min_distance=src.min_distance,
                               formats=src.formats or DEFAULT_FORMATS, kv_pairs=src.kv_pairs or KV_PAIRS)
    weight = getattr(src, "answer_weight", 1.0)
    if weight == 1.0:
        return [d.text for d in docs]
    return [AnswerText(d.text, [(qa.answer_start, qa.answer_end) for qa in d.qas], weight) for d in docs]


def token_spans(doc: RetrievalDoc, tokenizer: Any) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of the document (no special tokens) and the [start, end) token span of each answer.

    Spans come from the tokenizer's character offsets, so they are those of the text as it is tokenized whole.
    """
    enc = tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    spans = []
    for qa in doc.qas:
        start = next(i for i, (s, e) in enumerate(offsets) if e > qa.answer_start)
        end = next((i for i, (s, e) in enumerate(offsets) if s >= qa.answer_end), len(ids))
        spans.append((start, end))
    return ids, spans


def formats_for(length: int) -> tuple[str, ...]:
    """The formats that fit documents of `length` tokens (a key-value list alone can take 150 tokens)."""
    return DEFAULT_FORMATS if length >= 512 else tuple(f for f in DEFAULT_FORMATS if f != "kv_list")


def probe_items(docs: Sequence[RetrievalDoc], tokenizer: Any) -> list[ProbeItem]:
    """The documents as probe items (items.py grades them), with the tokenizer's start tokens (BOS where it puts
    one) in front."""
    start = ItemTokenizer(tokenizer).start()
    items = []
    for d in docs:
        ids, spans = token_spans(d, tokenizer)
        items.append(ProbeItem(f"retrieval-{d.format}", start + ids, [(a + len(start), b + len(start)) for a, b in spans],
                               [qa.answer for qa in d.qas], d.text[: d.qas[0].question_start], [q.key for q in d.qas]))
    return items
