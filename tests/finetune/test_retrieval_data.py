"""Retrieval documents: answers recoverable from the text, beyond the window, lengths as asked, no eval leak;
the recall probe on a converted folder."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from nha_convert.errors import NHAError
from nha_convert.corpora import retrieval as rd
from nha_convert.finetune.recipe import ProbeSpec, SourceSpec, parse_recipe


@pytest.fixture(scope="module")
def tok(smollm2_path):
    return AutoTokenizer.from_pretrained(smollm2_path)


@pytest.fixture(scope="module")
def train_docs(tok):
    return rd.retrieval_documents(tok, 24, split="train", seed=3, min_tokens=600, max_tokens=1200, min_distance=256)


@pytest.fixture(scope="module")
def eval_docs(tok):
    return rd.retrieval_documents(tok, 24, split="eval", seed=3, min_tokens=600, max_tokens=1200, min_distance=256)


def _statement_found(doc: rd.RetrievalDoc, qa: rd.QA) -> bool:
    """The fact, exactly as one of the format's templates states it, lies before the question."""
    before = doc.text[: qa.fact_end]
    if doc.format == "passkey":
        return any(f.format(noun=qa.key, v=qa.answer) in before for f in rd.PASSKEY_FACTS)
    if doc.format == "kv_list":
        return any(line.format(k=qa.key, v=qa.answer) in before for line in rd.KV_LINES)
    return any(s.format(name=qa.key, a=qa.answer, pet=p) in before for s, _, _ in rd.FACTS.values() for p in rd.PETS)


def test_answers_are_recoverable_and_beyond_the_window(tok, train_docs, eval_docs):
    assert {d.format for d in train_docs} == set(rd.DEFAULT_FORMATS)
    for doc in train_docs + eval_docs:
        for qa in doc.qas:
            assert doc.text[qa.answer_start: qa.answer_end] == " " + qa.answer
            assert qa.fact_end <= qa.question_start < qa.answer_start
            assert _statement_found(doc, qa), (doc.format, qa)
            gap = len(tok(doc.text[qa.fact_end: qa.question_start], add_special_tokens=False)["input_ids"])
            assert gap >= 256
        ids, spans = rd.token_spans(doc, tok)
        assert [tok.decode(ids[a:b]).strip() for a, b in spans] == [qa.answer for qa in doc.qas]


def test_lengths_as_asked(tok, train_docs):
    for doc in train_docs:
        assert 600 <= doc.target_tokens <= 1200
        n = len(tok(doc.text, add_special_tokens=False)["input_ids"])
        assert abs(n - doc.target_tokens) <= 3, (doc.format, n, doc.target_tokens)
    assert len({d.target_tokens for d in train_docs}) > 12  # drawn, not one length


def test_no_eval_answer_key_or_passage_in_training(train_docs, eval_docs):
    train_text = "\n".join(d.text for d in train_docs)
    assert not {a for d in eval_docs for a in d.answers} & {a for d in train_docs for a in d.answers}
    eval_keys = {k for d in eval_docs for k in d.keys}
    assert eval_keys and not eval_keys & {k for d in train_docs for k in d.keys}
    assert not [k for k in eval_keys if k in train_text]
    assert not set(d for doc in eval_docs for d in doc.passages) & set(d for doc in train_docs for d in doc.passages)
    assert not set(rd.filler_passages("eval")) & set(rd.filler_passages("train"))
    assert all(rd.split_of(a) == "eval" for d in eval_docs for a in d.answers)


def test_cloze_asks_a_real_passage_in_its_own_words_beyond_the_window(tok):
    """A cloze document's answer (the rest of a sentence, or a blanked word) stands in the passage it showed, more
    than min_distance tokens before the question, and the eval split's passages never reach the train split."""
    kw = dict(min_tokens=300, max_tokens=700, min_distance=96, formats=["cloze"])
    train = rd.retrieval_documents(tok, 40, split="train", seed=5, **kw)
    held = rd.retrieval_documents(tok, 20, split="eval", seed=5, **kw)
    for doc in train + held:
        (qa,) = doc.qas
        shown = doc.text[: qa.fact_end]
        assert doc.text[qa.answer_start: qa.answer_end] == " " + qa.answer
        assert qa.answer in shown[-2000:] and qa.key in shown  # the answer and its sentence are in the passage read
        gap = len(tok(doc.text[qa.fact_end: qa.question_start], add_special_tokens=False)["input_ids"])
        assert gap >= 96
        ids, (span,) = rd.token_spans(doc, tok)
        assert tok.decode(ids[span[0]: span[1]]).strip() == qa.answer
    assert not {p for d in held for p in d.passages} & {p for d in train for p in d.passages}
    questions = {d.text[d.qas[0].question_start: d.qas[0].answer_start].split('"')[0] for d in train}
    assert len(questions) >= 4  # several wordings: continuation and blanks


def test_deterministic_by_seed(tok):
    a = rd.retrieval_documents(tok, 3, seed=1, min_tokens=300, max_tokens=400, min_distance=100)
    b = rd.retrieval_documents(tok, 3, seed=1, min_tokens=300, max_tokens=400, min_distance=100)
    c = rd.retrieval_documents(tok, 3, seed=2, min_tokens=300, max_tokens=400, min_distance=100)
    assert [d.text for d in a] == [d.text for d in b] and [d.text for d in a] != [d.text for d in c]


def test_too_short_for_the_distance_is_one_line(tok):
    with pytest.raises(NHAError, match="no room for 500 tokens") as e:
        rd.retrieval_documents(tok, 1, min_tokens=300, max_tokens=300, min_distance=500)
    assert "\n" not in str(e.value)


def test_recipe_source_fits_its_rows(tok):
    from nha_convert.finetune.data import load_documents, tokenize_documents

    text = ("data:\n  sources:\n    - {kind: retrieval, samples: 3, min_tokens: 400, max_tokens: %d, min_distance: 128}\n"
            "stages:\n  - {kind: finetune, steps: 1, seq_len: 512}\n")
    recipe = parse_recipe(text % 512, "r.yaml", budget=None)
    docs = load_documents(recipe.data, tokenizer=tok, seed=0)
    assert len(docs) == 3
    assert all(400 <= len(ids) <= 512 for ids in tokenize_documents(docs, tok))  # BOS / EOS included
    with pytest.raises(NHAError, match="longer than every stage's seq_len") as e:
        parse_recipe(text % 1024, "r.yaml", budget=None)
    assert str(e.value).startswith("r.yaml:3: data.sources[0]:")


def test_recall_probe_runs_on_an_nha_folder(tok, tmp_path):
    import nha_convert
    from nha_convert.finetune.probe import stage_end_probe
    from nha_convert.finetune.progress import MetricsLog

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
                                        max_position_embeddings=1024))
    nha_convert.save(nha_convert.convert(base, nha_convert.NHASettings(window=16, slots=8, sinks=4)), tok,
                     tmp_path / "nha")
    model = nha_convert.load(tmp_path / "nha")
    metrics = tmp_path / "metrics.jsonl"
    trainer = SimpleNamespace(recipe=SimpleNamespace(probe=ProbeSpec(lengths=[256], items=2), seed=0), main=True,
                              metrics=MetricsLog(metrics, True), console=SimpleNamespace(print=lambda *a, **k: None),
                              accelerator=SimpleNamespace(wait_for_everyone=lambda: None))
    result = stage_end_probe(trainer, model, tok, "distill", 7)
    assert set(result) == {"passkey", "mqar", "retrieval"}
    assert all(set(r) == {"256"} and 0.0 <= r["256"] <= 1.0 for r in result.values())
    (record,) = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert record["event"] == "recall" and record["stage"] == "distill" and record["global_step"] == 7
    assert record["retrieval"] == result["retrieval"] and record["passkey"] == result["passkey"]
    assert model.training is False  # the probe leaves the mode as it found it (load gives eval mode)


def test_source_spec_defaults_fit_the_default_seq_len():
    s = SourceSpec(kind="retrieval")
    assert s.min_distance < s.min_tokens <= s.max_tokens == 2048


def test_answer_weight_marks_exactly_the_answer_tokens(tok):
    """answer_weight: the weighted tokens of each document decode to its answers, and they survive the held-out
    split and the packing into rows (the weight of predicting token t sits at t in Rows.loss_weight)."""
    from nha_convert.finetune.data import WeightedTokens, make_rows, split_documents, tokenize_documents

    src = SourceSpec(kind="retrieval", samples=4, min_tokens=400, max_tokens=500, min_distance=128, answer_weight=8)
    texts = rd.source_documents(src, tok, seed=1)
    plain = rd.source_documents(SourceSpec(kind="retrieval", samples=4, min_tokens=400, max_tokens=500,
                                           min_distance=128), tok, seed=1)
    assert texts == plain and all(isinstance(t, rd.AnswerText) for t in texts)
    assert not any(isinstance(t, rd.AnswerText) for t in plain)
    docs = tokenize_documents(texts, tok)
    assert [list(d) for d in docs] == tokenize_documents(plain, tok)  # same tokens, weights beside them
    for text, ids in zip(texts, docs):
        assert isinstance(ids, WeightedTokens)
        marked = [i for i, w in zip(ids, ids.weights) if w == 8.0]
        answers = "".join(text[a:b] for a, b in text.answer_spans)
        assert tok.decode(marked).replace(" ", "") == answers.replace(" ", "")
        assert set(ids.weights) == {1.0, 8.0}
    train, held = split_documents(docs, 0.5, seed=0)  # whole documents
    assert all(isinstance(d, WeightedTokens) for d in train + held)
    tails = split_documents(docs[:1], 0.5, seed=0)  # fewer documents than 1/held_out: cut inside each
    assert [w for part in tails for w in part[0].weights] == docs[0].weights
    rows = make_rows(docs + [[1, 2, 3, 4, 5]], seq_len=256, pad_id=0, min_chunk=4)
    assert rows.loss_weight is not None
    assert int((rows.loss_weight == 8.0).sum()) == sum(w == 8.0 for d in docs for w in d.weights)
    assert (rows.loss_weight[rows.attention_mask == 0] == 1.0).all()
    from collections import Counter  # the weighted positions hold exactly the answer tokens

    assert Counter(rows.input_ids[rows.loss_weight == 8.0].tolist()) == Counter(
        i for d in docs for i, w in zip(d, d.weights) if w == 8.0)


def test_answer_weight_belongs_to_retrieval_sources_and_is_positive():
    with pytest.raises(Exception, match="answer_weight"):
        SourceSpec(kind="shakespeare", answer_weight=4)
    with pytest.raises(Exception, match="greater than 0"):
        SourceSpec(kind="retrieval", answer_weight=0)


# --- kv_pairs: how many pairs a key-value list holds (an easier curriculum with fewer) ----------------------------


def test_kv_pairs_bounds_the_pairs_of_every_list(tok):
    docs = rd.retrieval_documents(tok, 12, seed=5, min_tokens=600, max_tokens=800, min_distance=256,
                                  formats=["kv_list"], kv_pairs=(1, 2))
    assert {len(d.keys) for d in docs} <= {1, 2} and len({len(d.keys) for d in docs}) == 2
    for doc in docs:  # still answerable: every asked key's line is in the text before its question
        for qa in doc.qas:
            assert qa.key in doc.keys and _statement_found(doc, qa)
            assert doc.text[qa.answer_start: qa.answer_end] == " " + qa.answer


def test_default_kv_pairs_keep_the_documents_of_before(tok):
    """The default draws 4-16 pairs exactly as before the knob existed: same texts from the same seed."""
    kw = dict(seed=5, min_tokens=600, max_tokens=800, min_distance=256, formats=["kv_list"])
    a = rd.retrieval_documents(tok, 4, **kw)
    b = rd.retrieval_documents(tok, 4, kv_pairs=(4, 16), **kw)
    assert [d.text for d in a] == [d.text for d in b]
    assert all(4 <= len(d.keys) <= 16 for d in a)


@pytest.mark.parametrize("bad", [[0, 2], [3, 2], [3], [1, 17]])
def test_bad_kv_pairs_is_one_line(bad):
    text = ("data:\n  sources:\n    - {kind: retrieval, samples: 3, min_tokens: 400, max_tokens: 512,"
            f" min_distance: 128, kv_pairs: {bad}}}\nstages:\n  - {{kind: finetune, steps: 1, seq_len: 512}}\n")
    with pytest.raises(NHAError) as e:
        parse_recipe(text, "r.yaml", budget=None)
    msg = str(e.value)
    assert msg.startswith("r.yaml:3: ") and "\n" not in msg, msg
    assert f"kv_pairs must be [lo, hi] with 1 <= lo <= hi <= 16, got {bad}" in msg
    with pytest.raises(NHAError, match="kv_pairs must be"):
        rd.check_kv_pairs(bad)
    with pytest.raises(Exception, match="kv_pairs"):
        SourceSpec(kind="boolq", kv_pairs=[1, 2])


def test_kv_pairs_in_a_recipe_reach_the_generator(tok):
    src = SourceSpec(kind="retrieval", samples=3, min_tokens=600, max_tokens=800, formats=["kv_list"], kv_pairs=[1, 1])
    texts = rd.source_documents(src, tok, seed=0)
    docs = rd.retrieval_documents(tok, 3, seed=0, min_tokens=598, max_tokens=798, min_distance=256,
                                  formats=["kv_list"], kv_pairs=(1, 1))
    assert texts == [d.text for d in docs] and all(len(d.keys) == 1 for d in docs)
