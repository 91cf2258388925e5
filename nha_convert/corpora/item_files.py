"""Recall items of your own (`nha-eval --recall-file`): a JSON-lines file of {"prompt": ..., "answer": ...}, one item
per line, scored per length bucket like the built-in probes (benchmarks/make_needles.py writes such files).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import NHAError
from .items import ItemTokenizer, ProbeItem
from .natural import NATURAL
from .synthetic import PROBES


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
    if name in (*PROBES, *NATURAL, "chance"):
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
    t = ItemTokenizer(tokenizer)
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
