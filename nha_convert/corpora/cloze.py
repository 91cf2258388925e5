"""Cloze documents: a real passage read once, then asked about in its own words far below (the rest of one of its
sentences, or a blanked word of it). Natural-text recall: nothing in it is a template the model could learn instead.
"""

from __future__ import annotations

import re

from ..errors import NHAError
from .documents import QA, RetrievalDoc, _Builder, _layout

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
