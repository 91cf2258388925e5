"""Data: the held-out split is disjoint, batches are a pure function of the step (rows: test_finetune_packing.py)."""

from __future__ import annotations

import json

import pytest
import torch

from nha_convert.errors import NHAError
from nha_convert.corpora.sources import jsonl_documents, shakespeare_documents, teacher_documents
from nha_convert.finetune.data import build_corpus, load_documents, split_documents, step_rows, tokenize_documents
from nha_convert.finetune.recipe import DataSpec, SourceSpec
from tests.helpers.finetune import byte_tokenizer, documents, tiny_llama


def test_split_whole_documents_or_tails():
    docs = [[i] * 10 for i in range(20)]
    train, held = split_documents(docs, 0.1, seed=0)
    assert len(held) == 2 and len(train) == 18
    assert not {d[0] for d in train} & {d[0] for d in held}
    assert split_documents(docs, 0.1, seed=0) == (train, held)  # seeded
    few = [list(range(100)), list(range(50))]
    train, held = split_documents(few, 0.1, seed=0)  # fewer documents than 1/held_out: hold out the tails
    assert train == [list(range(90)), list(range(45))] and held == [list(range(90, 100)), list(range(45, 50))]


def test_step_rows_are_a_pure_function_of_the_step():
    a = [step_rows(10, 4, s, seed=7) for s in range(5)]
    b = [step_rows(10, 4, s, seed=7) for s in reversed(range(5))][::-1]
    assert a == b
    flat = sum(a, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))  # epochs are permutations
    assert flat[:10] != flat[10:20]  # a fresh order each epoch
    assert step_rows(10, 4, 0, seed=8) != a[0]


def test_shakespeare_source_leaves_out_the_evaluation_text():
    from nha_convert import assets
    from nha_convert.eval.perplexity import heldout_path

    docs = shakespeare_documents()
    held = heldout_path().read_text(encoding="utf-8", errors="replace")
    assert len(docs) == len(assets.shakespeare_texts()) - 1 == 41
    assert held not in docs and all(held[:2000] not in d for d in docs)


def test_jsonl_source_and_its_errors(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert jsonl_documents(str(p), "text") == ["one", "two"]
    p.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(NHAError, match=r"d.jsonl:1: .*field 'text'"):
        jsonl_documents(str(p), "text")
    p.write_text("{oops\n")
    with pytest.raises(NHAError, match=r"d.jsonl:1: not valid JSON"):
        jsonl_documents(str(p), "text")


def test_tokenised_documents_end_with_eos_and_corpus_rows():
    tok = byte_tokenizer()
    docs = documents(8)
    ids = tokenize_documents(docs, tok)
    assert all(d[-1] == tok.eos_token_id for d in ids)
    assert tok.decode(ids[0][:-1]) == docs[0]
    corpus = build_corpus(DataSpec(held_out=0.25), tok, seed=0, documents=lambda: docs)
    assert len(corpus.train) == 6 and len(corpus.held_out) == 2
    rows = corpus.rows(64)
    assert rows.input_ids.shape[1] == 64 and corpus.rows(64) is rows  # cached per seq_len


def test_teacher_samples_are_seeded_and_cached(tmp_path):
    tok = byte_tokenizer()
    teacher = tiny_llama(0)
    src = SourceSpec(kind="teacher", samples=3, max_new_tokens=12, prompts=["the ", "of "])
    a = teacher_documents(src, teacher, tok, seed=5)
    b = teacher_documents(src, teacher, tok, seed=5)
    assert a == b and len(a) == 3 and a[0].startswith("the ") and a[1].startswith("of ")
    state = torch.random.get_rng_state()
    spec = DataSpec(sources=[src])
    first = load_documents(spec, teacher=teacher, tokenizer=tok, seed=5, cache_dir=tmp_path)
    assert torch.equal(state, torch.random.get_rng_state())  # sampling leaves the global RNG alone
    assert (tmp_path / "teacher_samples_0.jsonl").is_file()
    assert load_documents(spec, teacher=None, tokenizer=tok, seed=5, cache_dir=tmp_path) == first
