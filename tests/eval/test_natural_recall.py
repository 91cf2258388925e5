"""Natural-recall probes (corpora/natural.py, eval/probes.py): every answer is in its text and beyond the window,
no passage comes from the training data, chance is what a guesser scores; --ablate slots is the slots=0 model."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
from transformers import AutoTokenizer

import nha_convert
from tests.helpers.models import tiny
from nha_convert import NHASettings
from nha_convert.corpora import natural as N
from nha_convert.errors import NHAError
from nha_convert.eval import probes as P
from nha_convert.eval import recall as R
from nha_convert.eval.ablation import has_slots, slots_masked
from nha_convert.eval.answers import generated_predictions

WINDOW = 64


@pytest.fixture(scope="module")
def tok(smollm2_path):
    return AutoTokenizer.from_pretrained(smollm2_path)


@pytest.fixture(scope="module")
def cells(tok):
    """Each natural probe at the lengths it is built for, 100 items a cell (what the GPU run uses)."""
    return {(p, L): P.items_for(p, tok, L, 100, seed=5) for p in P.NATURAL
            for L in ([None] if P.get(p).own_length else [512, 1024])}


def test_answers_are_in_their_text_and_beyond_the_window(tok, cells):
    for (probe, length), items in cells.items():
        assert len(items) == 100
        for it in items:
            (s, e), answer = it.answer_spans[0], it.answers[0]
            assert e == len(it.ids) and (length is None or len(it.ids) <= length)
            assert N.normalize(tok.decode(it.ids[s:e])) == N.normalize(answer)
            assert N.oracle_answer(it) == answer  # a reader of the context finds it, given the question
            assert it.distance > WINDOW
            # The answer's text is nowhere in the last WINDOW tokens before it, but is in the text before those
            # (and not in the first tokens, which sinks would keep visible).
            seen = tok.decode(it.ids[s - WINDOW: s]).lower()
            assert not N._word_re(answer).search(seen), (probe, answer, seen)
            assert N._word_re(answer).search(tok.decode(it.ids[8: s - WINDOW]))
            assert not N._word_re(answer).search(tok.decode(it.ids[:8]))
        assert P.items_for(probe, tok, length, 3, seed=5)[0].ids == items[0].ids  # a pure function of the seed
        assert P.items_for(probe, tok, length, 3, seed=6)[0].ids != items[0].ids


def test_oracle_scores_100_and_guesser_scores_chance(cells):
    for (probe, _), items in cells.items():
        spec = P.get(probe)
        assert R.score(items, [spec.oracle(it) for it in items]) == 1.0
        rng = random.Random(1)
        trials = [R.score(items, [spec.guess(it, rng) for it in items]) for _ in range(20)]
        p, n = spec.chance(items), 20 * len(items)
        assert abs(sum(trials) / 20 - p) <= 4 * math.sqrt(p * (1 - p) / n) + 1e-9, probe
    assert P.get("code").chance(cells[("code", 512)]) == pytest.approx(1 / N.CONSTANTS)
    assert P.get("restated").chance(cells[("restated", 512)]) == pytest.approx(1 / N.PEOPLE)
    assert P.get("reading").chance(cells[("reading", None)]) < 0.05


def test_scoring_normalises_case_punctuation_and_articles(tok, cells):
    items = cells[("restated", 512)][:2]
    assert R.score(items, [[" " + it.answers[0].upper() + "."] for it in items]) == 1.0
    assert R.score(items, [["the " + it.answers[0]] for it in items]) == 1.0
    assert R.score(items, [[it.answers[0] + " x"] for it in items]) == 0.0


def test_no_item_shares_a_passage_with_the_training_data(cells):
    """The held-out rule: the recipe trains on the plays, BoolQ passages and retrieval documents built from them;
    no passage of any item (target or distractor) equals, by hash, a training document or a paragraph of one."""
    from nha_convert.corpora.sources import boolq_documents, shakespeare_documents
    from nha_convert.corpora.documents import filler_passages

    training = set()
    for doc in [*boolq_documents(), *shakespeare_documents(), *filler_passages("train"), *filler_passages("eval")]:
        training.add(N.passage_hash(doc))
        training.update(N.passage_hash(p) for p in doc.split("\n\n") if p.strip())
    used = {N.passage_hash(p) for p in N.sciq_passages()}  # every passage an item can hold
    assert len(used) > 800 and not used & training
    targets = {N.passage_hash(it.passage) for (p, _), items in cells.items() if p.startswith("reading")
               for it in items}
    assert targets <= used and len(targets) >= 100
    assert N.passage_hash(" A  b.\n") == N.passage_hash("a B.")  # blanks and case do not hide a copy


def test_restated_names_and_values_are_disjoint_from_the_retrieval_pools():
    from nha_convert.corpora import retrieval as RD

    theirs = set(RD.FIRST.split()) | set(RD.LAST.split()) | set(RD.PET_NAMES.split()) | set(RD.JOBS) | set(RD.PETS)
    theirs |= {a + b for a in RD.TOWN_A.split() for b in RD.TOWN_B.split()}
    ours = set(N.FIRST_NAMES) | set(N.LAST_NAMES) | {v for _, _, vals in N.RESTATED.values() for v in vals}
    assert not {w.lower() for w in ours} & {w.lower() for w in theirs}
    for kind, (statement, question, _) in N.RESTATED.items():  # asked in other words than it was stated
        said = set(statement.replace("{name}", "").replace("{v}", "").lower().split())
        asked = set(question.replace("{name}", "").lower().split())
        assert len(said & asked) <= 2, kind


def test_registry_parses_probe_lists():
    assert P.parse("natural") == list(P.NATURAL) == ["reading", "reading-distractors", "code", "restated"]
    assert P.parse("all")[:2] == ["passkey", "mqar"] and P.parse("code, code,passkey") == ["code", "passkey"]
    with pytest.raises(NHAError, match="unknown recall probe 'cod'"):
        P.parse("cod")
    with pytest.raises(NHAError, match="code length 64 is too short"):
        N.code_items(_Tiny(), 64, 1)


class _Tiny:
    """A character tokenizer: enough for the builders' length checks."""

    def __call__(self, text, add_special_tokens=True, **kw):
        return {"input_ids": [ord(c) % 256 for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_slots_masked_is_the_model_converted_with_zero_slots(arch):
    base = tiny(arch)
    nha = nha_convert.convert(copy.deepcopy(base), NHASettings(window=8, slots=4, sinks=2, full_layers=[1],
                                                               slot_bias=-1.0))
    swa = nha_convert.convert(copy.deepcopy(base), NHASettings(window=8, slots=0, sinks=2, full_layers=[1]))
    ids = torch.randint(0, 256, (2, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = nha(ids).logits
        with slots_masked(nha):
            masked = nha(ids).logits
        after = nha(ids).logits
        want = swa(ids).logits
    assert torch.equal(masked, want)  # exactly: the op with m = 0 is the sliding window
    assert torch.equal(before, after) and not torch.allclose(before, want)  # restored; the slots did something
    assert has_slots(nha) and not has_slots(swa) and not has_slots(base)


def test_right_padded_batches_give_the_answers_of_single_items(tok):
    """Items of different lengths in one batch (padded on the right) read exactly what they read alone."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=len(tok))).eval()
    model = nha_convert.convert(model, NHASettings(window=16, slots=4))
    items = P.items_for("reading", tok, None, 6, seed=1) + R.mqar_items(tok, 300, 2, n_pairs=4)
    alone = R.model_predictions(model, tok, items, batch_size=1)
    assert R.model_predictions(model, tok, items, batch_tokens=4096) == alone
    assert len({len(it.ids) for it in items}) > 3


def test_generated_answers_batched_and_masked(tok):
    """Reading answers are short greedy generations: left-padded batches give each item's own generation, and with
    the slots masked they are those of the slots=0 model (the decode path with m = 0 too)."""
    base = tiny("llama", vocab_size=len(tok))
    nha = nha_convert.convert(copy.deepcopy(base), NHASettings(window=16, slots=4, sinks=2))
    swa = nha_convert.convert(copy.deepcopy(base), NHASettings(window=16, slots=0, sinks=2))
    items = P.items_for("reading", tok, None, 4, seed=2)
    assert len({it.answer_spans[0][0] for it in items}) == 4
    alone = generated_predictions(nha, tok, items, 5)
    assert generated_predictions(nha, tok, items, 5, batch_tokens=1 << 16) == alone
    with slots_masked(nha):
        masked = generated_predictions(nha, tok, items, 5, batch_tokens=1 << 16)
    assert masked == generated_predictions(swa, tok, items, 5, batch_tokens=1 << 16)


def test_reading_is_right_when_the_generation_contains_the_answer(cells):
    items = cells[("reading", None)][:3]
    assert R.score(items, [[f"The answer is {it.answers[0].upper()}, of course."] for it in items]) == 1.0
    assert R.score(items, [[it.answers[0] + "x"] for it in items]) == 0.0
    assert N.contains("surface tension", "Surface tension is the energy") and not N.contains("ion", "tension")


def test_ablation_round_trips_merges_and_fills_the_summary():
    from nha_convert.eval.markdown import recall_markdown
    from nha_convert.eval.results import EvalResults
    from nha_convert.eval.tables import recall_rows

    chance = {"code": 0.2, "passkey": 1e-5}
    data = {"models": [{"label": "base"}, {"label": "nha"}], "reference": "base",
            "recall": {"base": {"code": {"1024": 0.9}, "passkey": {"1024": 1.0}, "chance": chance},
                       "nha": {"code": {"1024": 0.5}, "passkey": {"1024": 1.0}, "chance": chance}},
            "ablation": {"nha": {"slots": {"recall": {"code": {"1024": 0.25}, "passkey": {"1024": 0.0},
                                                      "chance": chance}, "perplexity": None}}}}
    res = EvalResults.from_dict(data)
    assert EvalResults.from_json(res.to_json()).to_dict() == res.to_dict() and res.to_dict()["ablation"]
    other = EvalResults.from_dict({"models": [{"label": "nha2"}], "ablation": {"nha2": {"slots": {}}}})
    assert set(res.merge(other).ablation) == {"nha", "nha2"}
    columns, rows = recall_rows(data)
    assert columns == ["base", "nha", "nha slots masked", "nha slots carry", "chance"]
    assert [(r["probe"], r["values"]["nha slots carry"]) for r in rows] == [("passkey", 1.0), ("code", 0.25)]
    md = recall_markdown(data)
    assert "| code | 1024 | 0.90 | 0.50 | 0.25 | +0.25 | 0.2 |" in md and "| nha, slots carry | +1.00 |" in md
