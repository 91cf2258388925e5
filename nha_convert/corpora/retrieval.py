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
import hashlib
import random
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..errors import NHAError
from .items import ItemTokenizer, ProbeItem
from .sources import boolq_documents, shakespeare_documents

SPLITS = ("train", "eval")
FORMATS = ("passkey", "kv_list", "fact", "cloze")
DEFAULT_FORMATS = ("passkey", "kv_list", "fact")  # what a source without `formats` draws
EVAL_SHARE = 5  # one item in 5 (by hash) belongs to the eval split
MARGIN = 8  # tokens of slack kept beyond min_distance: the whole text may tokenize a little differently
KV_PAIRS = (4, 16)  # pairs in a kv_list document, drawn in [lo, hi]; fewer make an easier curriculum
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


CLOZE_INTROS = ("", "Read this passage.\n\n", "Passage:\n", "From an article:\n\n")
CLOZE_CONTINUE = ("Earlier the text said: \"{prefix}", "Quote from the passage above: \"{prefix}",
                  "Recall the sentence that began \"{prefix}\". It went on:", "The passage read: \"{prefix}")
CLOZE_BLANK = ("Fill in the blank from the passage above: \"{blanked}\"\nAnswer:",
               "Which word is missing from this sentence of the text? \"{blanked}\" It is",
               "Complete from memory: \"{blanked}\"\nThe missing word:")
_SENTENCE = re.compile(r"[^.!?\n]{40,300}[.!?]")
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]{3,}|\d[\d,.]*\d|\d")


def _cloze(b: _Builder, length: int, min_distance: int) -> RetrievalDoc:
    """A real passage (trimmed to ~3-6 sentences), then after filler one question on one of its sentences."""
    rng = b.rng
    for _ in range(50):  # a passage with a usable sentence (long enough, with a word to blank); nearly always the first
        passage = rng.choice(b.pool)
        sentences = [m.group(0).strip() for m in _SENTENCE.finditer(passage)]
        sentences = [s for s in sentences if len(s.split()) >= 8]
        if sentences:
            break
    else:  # pragma: no cover - the pools hold thousands of passages
        raise NHAError("no passage with a sentence of 8+ words for a cloze document; this is a bug in retrieval_data.py")
    i = rng.randrange(len(sentences))
    lo = max(0, i - rng.randint(0, 3))
    shown = " ".join(sentences[lo: lo + rng.randint(3, 6)])
    if sentences[i] not in shown:
        shown = " ".join(sentences[lo: i + 1])
    words = sentences[i].split()
    if rng.random() < 0.5:  # the rest of the sentence from its first words: 3-6 words back
        k = rng.randint(3, min(6, len(words) - 3))
        q = rng.choice(CLOZE_CONTINUE).format(prefix=" ".join(words[:k]))
        answer = " ".join(words[k: k + rng.randint(2, 4)])
    else:  # one content word blanked (a name, a number or the longest word)
        cands = [j for j, w in enumerate(words) if _WORD.fullmatch(w.strip(",;:()\"'.!?")) and j > 0]
        if not cands:
            cands = [max(range(1, len(words)), key=lambda j: len(words[j]))]
        j = max(cands, key=lambda j: (words[j][0].isupper() or words[j][0].isdigit(), len(words[j]), rng.random()))
        word = words[j].strip(",;:()\"'.!?")
        blanked = " ".join(words[:j] + [words[j].replace(word, "____")] + words[j + 1:])
        q, answer = rng.choice(CLOZE_BLANK).format(blanked=blanked), word
    text, ends, spans = _layout(b, rng.choice(CLOZE_INTROS), [shown], [(q, " " + answer)], length, min_distance)
    (qs, a0, a1), = spans
    b.used.append(passage)
    return RetrievalDoc("cloze", text, length, [QA(sentences[i][:40], answer, qs, a0, a1, ends[0])], [], [answer], b.used)


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
