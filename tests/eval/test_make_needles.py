"""benchmarks/make_needles.py: long recall items in other formats than the project's, for `nha-eval --recall-file`.
Each item lands in its length's column, holds its answer once (in the needle), far beyond a 64-token window, and uses
none of the project's own templates."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from nha_convert.corpora import retrieval as rd
from nha_convert.corpora import synthetic
from nha_convert.corpora.item_files import file_items, read_recall_file
from tests.helpers.scripts import load_benchmark

@pytest.fixture(scope="module")
def mn():
    return load_benchmark("make_needles")


@pytest.fixture(scope="module")
def tok(smollm2_path):
    return AutoTokenizer.from_pretrained(smollm2_path)


@pytest.fixture(scope="module")
def needles_file(mn, smollm2_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("needles") / "needles.jsonl"
    mn.main(["-o", str(out), "--lengths", "1024,2048", "--n", "3", "--tokenizer", str(smollm2_path)])
    return out


def test_items_land_in_their_length_column(needles_file, tok, mn):
    name, questions = read_recall_file(needles_file)
    assert name == "needles" and len(questions) == 2 * 3 * len(mn.FORMATS)
    buckets = file_items(name, questions, tok)
    assert {k: len(v) for k, v in buckets.items()} == {1024: 12, 2048: 12}
    for length, items in buckets.items():
        assert all(length // 2 < len(it.ids) <= length for it in items)


def test_answer_stated_once_far_before_the_question(needles_file, tok, mn):
    rows = [json.loads(x) for x in needles_file.read_text().splitlines()]
    for row in rows:
        needle_t, question_t = mn.FORMATS[row["format"]]
        answer = row["answer"].strip()
        prompt = row["prompt"]
        assert prompt.count(answer) == 1, row["format"]
        needle_end = prompt.index(answer) + len(answer) + 1  # the needle's closing punctuation
        question_start = prompt.rindex("\n\n") + 2
        gap = len(tok(prompt[needle_end:question_start], add_special_tokens=False)["input_ids"])
        assert gap >= 256 and row["distance_tokens"] >= 256
        assert question_t.split("{x}")[0] in prompt[question_start:]


def _trigrams(template: str) -> set[tuple[str, ...]]:
    words = [w.strip(".,:?()'\"").lower() for w in template.split() if "{" not in w]
    return {tuple(words[i: i + 3]) for i in range(len(words) - 2)}


def test_none_of_the_project_templates(mn):
    """No three words in a row of a needle or question come from the training data's or the probes' templates."""
    own = set().union(*map(_trigrams, rd.PASSKEY_FACTS + rd.PASSKEY_QUESTIONS + rd.KV_QUESTIONS + rd.INTROS
                           + tuple(t for triple in rd.FACTS.values() for t in triple)
                           + (synthetic.PASSKEY_INTRO, synthetic.PASSKEY_NEEDLE, synthetic.PASSKEY_QUESTION,
                              synthetic.MQAR_INTRO, synthetic.MQAR_RECALL)))
    ours = set().union(*(_trigrams(t) for pair in mn.FORMATS.values() for t in pair))
    assert not own & ours


def test_deterministic_and_seeded(mn, tok):
    a = mn.make_needles(tok, [1024], 2, seed=1)
    assert a == mn.make_needles(tok, [1024], 2, seed=1)
    assert a != mn.make_needles(tok, [1024], 2, seed=2)


def test_bad_input_is_one_line(mn, tmp_path, smollm2_path):
    with pytest.raises(SystemExit, match="error: unknown format 'haiku'; choose from room, time, owner, word"):
        mn.main(["-o", str(tmp_path / "x.jsonl"), "--formats", "haiku"])
    with pytest.raises(SystemExit, match="leave no room for 256 tokens"):
        mn.main(["-o", str(tmp_path / "x.jsonl"), "--lengths", "256", "--tokenizer", str(smollm2_path)])
    assert not list(tmp_path.iterdir())  # nothing written


def test_per_format_files_each_hold_one_format(mn, smollm2_path, tmp_path):
    mn.main(["-o", str(tmp_path / "n.jsonl"), "--lengths", "1024", "--n", "2", "--formats", "room,owner",
             "--per-format", "--tokenizer", str(smollm2_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n_owner.jsonl", "n_room.jsonl"]
    for fmt in ("room", "owner"):
        name, questions = read_recall_file(tmp_path / f"n_{fmt}.jsonl")
        assert name == f"n_{fmt}" and len(questions) == 2
        assert {json.loads(x)["format"] for x in (tmp_path / f"n_{fmt}.jsonl").read_text().splitlines()} == {fmt}
