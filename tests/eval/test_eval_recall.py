"""Recall probes: exact lengths, a scorer that gives an oracle 100% and a guesser chance, teacher forcing."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from nha_convert.errors import NHAError
from nha_convert.corpora.item_files import length_bucket
from nha_convert.corpora.synthetic import mqar_items, passkey_items
from nha_convert.eval import recall as R


@pytest.fixture(scope="module")
def tok(smollm2_path):
    return AutoTokenizer.from_pretrained(smollm2_path)


@pytest.mark.parametrize("probe", R.PROBES)
@pytest.mark.parametrize("length", [256, 1024])
def test_items_have_exact_length_and_answers_in_place(tok, probe, length):
    items = R.make_items(probe, tok, length, 6, seed=3)
    for it in items:
        assert len(it.ids) == length
        assert it.answer_spans[-1][1] == length  # the last answer ends the sequence
        for (s, e), ans in zip(it.answer_spans, it.answers):
            assert tok.decode(it.ids[s:e]).strip() == ans
            assert all(ans not in q for q in it.queries)  # no question contains an answer
    assert R.make_items(probe, tok, length, 6, seed=3)[0].ids == items[0].ids  # deterministic
    assert R.make_items(probe, tok, length, 6, seed=4)[0].ids != items[0].ids


@pytest.mark.parametrize("probe", R.PROBES)
def test_oracle_scores_100_and_guesser_scores_chance(tok, probe):
    items = R.make_items(probe, tok, 512, 100, seed=1)
    assert R.score(items, R.oracle_predictions(items)) == 1.0
    guess = R.score(items, R.guess_predictions(items, seed=2))
    n = sum(len(it.answers) for it in items)
    p = R.chance(probe)
    assert abs(guess - p) <= 4 * math.sqrt(p * (1 - p) / n) + 1e-9  # within 4 sigma of chance
    if probe == "passkey":
        assert guess == 0.0  # 1 in 90000


def test_scorer_counts_each_question_and_checks_shapes(tok):
    items = mqar_items(tok, 512, 2, n_pairs=8, n_queries=4)
    preds = R.oracle_predictions(items)
    preds[0][1] = "0"
    assert R.score(items, preds) == 7 / 8
    with pytest.raises(ValueError):
        R.score(items, preds[:1])
    with pytest.raises(NHAError, match="too short"):
        passkey_items(tok, 16, 1)


class _TeacherForcedModel(torch.nn.Module):
    """Logits that put all mass on the true next token of known sequences (a perfect reader), or on token 0."""

    def __init__(self, seqs, vocab, perfect=True):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seqs, self.vocab, self.perfect = seqs, vocab, perfect

    def forward(self, input_ids, use_cache=False, logits_to_keep=0):
        B, T = input_ids.shape
        logits = torch.zeros(B, T, self.vocab)
        for b in range(B):
            ids = self.seqs[tuple(input_ids[b].tolist())]
            for t in range(T - 1):
                logits[b, t, ids[t + 1] if self.perfect else 0] = 1.0
        return SimpleNamespace(logits=logits[:, -logits_to_keep:])


@pytest.mark.parametrize("probe", R.PROBES)
def test_model_predictions_read_the_answer_positions(tok, probe):
    items = R.make_items(probe, tok, 300, 4)
    seqs = {tuple(it.ids): it.ids for it in items}
    perfect = _TeacherForcedModel(seqs, len(tok))
    assert R.score(items, R.model_predictions(perfect, tok, items, batch_size=2)) == 1.0
    blind = _TeacherForcedModel(seqs, len(tok), perfect=False)
    assert R.score(items, R.model_predictions(blind, tok, items, batch_size=3)) == 0.0


def test_run_recall_on_a_tiny_model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=len(tok))).eval()
    res = R.run_recall(model, tok, [256], n=2, n_pairs=4)
    assert set(res) == {"passkey", "mqar", "chance"}
    assert res["chance"]["mqar"] == 0.25 and 0.0 <= res["passkey"]["256"] <= 1.0


def test_real_smollm2_finds_a_short_passkey(smollm2_path):
    """The real base model reads the passkey back at 256 tokens (the H100 run gives 1.00 up to 2K)."""
    from transformers import AutoModelForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    items = passkey_items(tok, 256, 3)
    assert R.score(items, R.model_predictions(model, tok, items)) == 1.0


# --- --recall-file: recall items of the user's own -------------------------------------------------------------

CITIES = ("Alice lives in Paris. Bob lives in Rome. Carol lives in Oslo. Dan lives in Lima.\n"
          "Question: where does {who} live?\nAnswer: {who} lives in")


def _write(path, rows):
    import json

    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_recall_file_is_checked_line_by_line(tmp_path):
    name, qs = R.read_recall_file(_write(tmp_path / "cities.jsonl", [
        {"prompt": "p1", "answer": " a", "depth": 0.5}, "", {"prompt": "p2", "answer": " b"}]))
    assert name == "cities" and [(q.prompt, q.answer, q.line) for q in qs] == [("p1", " a", 1), ("p2", " b", 3)]
    cases = [
        (["{not json"], "bad.jsonl:1: not JSON"),
        ([{"prompt": "p"}], 'bad.jsonl:1: needs "prompt" and "answer"'),
        ([{"prompt": "p", "answer": "x"}, {"prompt": "", "answer": "y"}], 'bad.jsonl:2: needs "prompt"'),
        ([], "holds no questions"),
    ]
    for rows, want in cases:
        with pytest.raises(NHAError, match=want):
            R.read_recall_file(_write(tmp_path / "bad.jsonl", rows))
    with pytest.raises(NHAError, match="built-in probe"):
        R.read_recall_file(_write(tmp_path / "passkey.jsonl", [{"prompt": "p", "answer": "a"}]))
    with pytest.raises(NHAError, match="cannot read it"):
        R.read_recall_file(tmp_path / "missing.jsonl")


def test_recall_file_items_put_the_answer_last_and_bucket_by_length(tok, tmp_path):
    _, qs = R.read_recall_file(_write(tmp_path / "c.jsonl", [
        {"prompt": CITIES.format(who="Bob"), "answer": " Rome"},
        {"prompt": "filler. " * 200 + CITIES.format(who="Dan"), "answer": " Lima"}]))
    by_bucket = R.file_items("c", qs, tok)
    assert list(by_bucket) == [64, 512] and [length_bucket(n) for n in (1, 64, 65, 1024)] == [1, 64, 128, 1024]
    for items in by_bucket.values():
        (it,) = items
        (s, e), = it.answer_spans
        assert e == len(it.ids) and tok.decode(it.ids[s:e]) == it.answers[0]
    with pytest.raises(NHAError, match="c, line 2: .* more than the context length"):
        R.file_items("c", qs, tok, limit=256)


def test_real_smollm2_answers_a_recall_file(smollm2_path, tmp_path):
    """Formats that are not the project's own: the base model reads each fact back."""
    from transformers import AutoModelForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    rows = [("Note for the trip: the hotel room number is 4417. Bring a jacket, it will be cold.\nQuestion: what is the "
             "hotel room number?\nAnswer: the hotel room number is", " 4417"),
            ("Mira keeps her bicycle in a blue shed behind the library. The shed has a green door.\nQuestion: what "
             "colour is the shed?\nAnswer: the shed is", " blue"),
            ("The meeting was moved to Thursday because the room was booked on Monday.\nWhich day is the meeting "
             "now? The meeting is on", " Thursday")]
    path = _write(tmp_path / "notes.jsonl", [{"prompt": p, "answer": a} for p, a in rows])
    res = R.run_recall(model, tok, [], probes=[], files=[R.read_recall_file(path)])
    assert set(res) == {"chance", "notes"} and res["chance"] == {}
    assert res["notes"] and all(acc == 1.0 for acc in res["notes"].values()), res
