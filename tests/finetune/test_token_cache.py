"""The token cache of the data sources ($NHA_CACHE/corpus): a cached read gives exactly the tokens (and answer
weights) a fresh build gives, is keyed by everything that changes them, and a damaged file is rebuilt."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from nha_convert.backend import overriding
from nha_convert.finetune import data
from nha_convert.finetune.data import WeightedTokens, load_documents, load_tokens, token_cache_path, tokenize_documents
from nha_convert.finetune.recipe import DataSpec, SourceSpec


@pytest.fixture(scope="module")
def tok(smollm2_path):
    return AutoTokenizer.from_pretrained(smollm2_path)


def _spec(samples: int = 4, weight: float = 5.0, text: str | None = None) -> DataSpec:
    sources = [SourceSpec(kind="retrieval", samples=samples, min_tokens=300, max_tokens=400, min_distance=100,
                          answer_weight=weight)]
    if text is not None:
        sources.append(SourceSpec(kind="text", path=text))
    return DataSpec(sources=sources)


def _plain(docs):
    return [(list(d), d.weights if isinstance(d, WeightedTokens) else None) for d in docs]


@pytest.fixture()
def cache(tmp_path):
    with overriding(cache=tmp_path / "cache", corpus_cache=True):
        yield tmp_path / "cache" / "corpus"


def test_cached_tokens_equal_a_fresh_build(tok, cache, tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("a user's own text, never cached: it can change under the same path")
    spec = _spec(text=str(tmp_path / "notes.txt"))
    fresh = tokenize_documents(load_documents(spec, tokenizer=tok, seed=3), tok)
    first = load_tokens(spec, tok, seed=3)
    assert _plain(first) == _plain(fresh)
    assert isinstance(first[0], WeightedTokens) and max(first[0].weights) == 5.0
    assert [p.name.split("-")[0] for p in cache.iterdir()] == ["retrieval"]  # the text source is not cached

    def no_build(*args, **kwargs):
        raise AssertionError("the retrieval source was built again")

    monkeypatch.setattr("nha_convert.corpora.retrieval.source_documents", no_build)
    assert _plain(load_tokens(spec, tok, seed=3)) == _plain(fresh)


def test_key_covers_settings_seed_and_tokenizer(tok, cache):
    src = _spec().sources[0]
    path = token_cache_path(0, src, tok, 3)
    assert path is not None and path.parent == cache
    others = [token_cache_path(0, _spec(samples=5).sources[0], tok, 3),
              token_cache_path(0, _spec(weight=1.0).sources[0], tok, 3),
              token_cache_path(0, src, tok, 4),
              token_cache_path(1, src, tok, 3)]  # the source's index moves its seed
    assert len({path, *others}) == 5
    assert token_cache_path(0, SourceSpec(kind="text", path="x.txt"), tok, 3) is None


def test_off_switch_and_damaged_file(tok, cache):
    spec = _spec()
    fresh = _plain(load_tokens(spec, tok, seed=3))
    path = token_cache_path(0, spec.sources[0], tok, 3)
    path.write_bytes(b"not a torch file")
    assert _plain(load_tokens(spec, tok, seed=3)) == fresh  # rebuilt, and written again
    assert _plain(data._load_tokens(path)) == fresh
    with overriding(corpus_cache=False):  # NHA_CORPUS_CACHE=0
        assert token_cache_path(0, spec.sources[0], tok, 3) is None
