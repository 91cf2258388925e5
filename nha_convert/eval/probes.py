"""The recall probes by name, as finetune/objectives.py holds the stage kinds: one `RecallProbe` each.

A probe owns how its items are built, how many a cell holds by default, whether it takes `--recall-lengths` or
reports one cell of its own length, how answers are normalised before they are compared, its chance level (a
guesser's accuracy), and an oracle and a guesser that tests use to prove every answer is in its text and the
chance figure right. A new probe is a builder (e.g. in corpora/) plus one entry here; `run_recall`, the CLI's
`--recall-probes`, results.json and the report take it from this table. Every recall metric is higher-is-better
and reaches the gate as `recall/<probe>/<length>`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..corpora import items as I
from ..corpora import natural as N
from ..corpora import synthetic as S
from ..errors import NHAError


READING_TOKENS = 16  # a reading answer is read from up to 16 generated tokens (its first line)


@dataclass(frozen=True)
class RecallProbe:
    name: str
    build: Callable[..., list[I.ProbeItem]]  # (tokenizer, length, n, seed, **options) -> items
    chance: Callable[[Sequence[I.ProbeItem]], float]  # a guesser's expected accuracy on these items
    oracle: Callable[[I.ProbeItem], list[str]]  # answers read from the context alone (100 %)
    guess: Callable[[I.ProbeItem, random.Random], list[str]]
    normalize: Callable[[str], str]  # applied to gold and prediction before they are compared
    match: Callable[[str, str], bool] | None = None  # (gold, prediction) -> right; None: equal once normalised
    generate: int = 0  # > 0: answers are greedy generations of up to this many tokens, else teacher-forced
    default_n: int = 20  # items per cell when the request does not say
    own_length: bool = False  # one cell at its items' own length (next power of two), not --recall-lengths
    natural: bool = False  # real text (reported in the natural-recall summary)
    about: str = ""


def _synthetic(name: str, about: str) -> RecallProbe:
    return RecallProbe(
        name=name, about=about,
        build=lambda tok, length, n, seed=0, **kw: S.make_items(name, tok, length, n, seed, **kw),
        chance=lambda items, **kw: S.chance(name, **kw),
        oracle=lambda item: S.oracle_predictions([item])[0],
        guess=lambda item, rng: S.guess_predictions([item], seed=rng.randrange(1 << 30))[0],
        normalize=I._norm)


def _natural(name: str, about: str, own_length: bool = False, generate: int = 0) -> RecallProbe:
    return RecallProbe(
        name=name, about=about, build=N.BUILDERS[name], chance=lambda items, **kw: N.chance(items),
        oracle=lambda item: [N.oracle_answer(item)], guess=lambda item, rng: [N.guess_answer(item, rng)],
        normalize=N.normalize, match=N.contains if generate else None, generate=generate, default_n=100,
        own_length=own_length, natural=True)


PROBES: dict[str, RecallProbe] = {p.name: p for p in (
    _synthetic("passkey", "a five-digit key in neutral filler"),
    _synthetic("mqar", "word -> number pairs in filler, four asked back"),
    _natural("reading", "a SciQ passage, then its question (answer a span of it)", own_length=True,
             generate=READING_TOKENS),
    _natural("reading-distractors", "the same among other SciQ passages", generate=READING_TOKENS),
    _natural("code", "a constant assigned in generated Python, asked by an assert far below"),
    _natural("restated", "a fact about one of six people, asked in other words"),
)}
NATURAL = tuple(name for name, p in PROBES.items() if p.natural)


def get(name: str) -> RecallProbe:
    if name not in PROBES:
        raise NHAError(f"unknown recall probe {name!r}; choose from {', '.join(PROBES)}")
    return PROBES[name]


def matcher(probe: str) -> Callable[[str, str], bool]:
    """How a probe's answers are compared, (gold, prediction) -> right; items of --recall-file (not registered) as
    passkey's."""
    spec = PROBES.get(probe)
    if spec is not None and spec.match is not None:
        return spec.match
    norm = spec.normalize if spec is not None else I._norm
    return lambda want, got: norm(want) == norm(got)


def parse(text: str) -> list[str]:
    """--recall-probes: names, 'natural' for the four natural ones, 'all' for every probe."""
    out: list[str] = []
    for word in (w.strip() for w in text.split(",")):
        names = list(PROBES) if word == "all" else list(NATURAL) if word == "natural" else [word] if word else []
        for name in names:
            get(name)
            if name not in out:
                out.append(name)
    return out


def items_for(name: str, tokenizer: Any, length: int | None, n: int, seed: int = 0,
              **options: Any) -> list[I.ProbeItem]:
    probe = get(name)
    return probe.build(tokenizer, length, n, seed, **options)
