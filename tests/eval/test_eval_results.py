"""Typed nha-eval results: an exact JSON round trip, results.json files of the old shape still read, and report.md
unchanged for the same results (a golden string, rendered by report.py before it was split in modules)."""

from __future__ import annotations

import json

import pytest

from nha_convert.errors import NHAError
from nha_convert.eval import gate as G
from nha_convert.eval import report as Rep
from nha_convert.eval.results import (RESULTS_VERSION, BenchResults, EvalResults, EvalSettings, ModelEntry,
                                      PerplexityResult, load_results)


def fixed_results():
    return {
        "version": 1, "created": "2026-11-30T12:00:00+00:00", "command": "nha-eval out/nha --compare base --ppl",
        "device": "CPU x86_64, 2 cores (torch 2.13.0)", "dtype": "float32",
        "settings": {"tasks": ["piqa", "lambada_openai"], "limit": 20, "num_fewshot": None, "batch_size": 16,
                     "mmlu_split": "validation", "seed": 1234, "data": "offline"},
        "models": [{"label": "base", "source": "base", "kind": "base", "nha": None},
                   {"label": "nha", "source": "out/nha", "kind": "nha",
                    "nha": {"window": 64, "slots": 16, "sinks": 4, "windows": [None, 64]},
                    "training": {"run": "/runs/r", "budget": "cpu", "steps": 8, "tokens": 1024, "stages": {}}}],
        "reference": "base",
        "tasks": {"base": {"piqa": {"acc": 0.64, "acc_norm": 0.63}, "lambada_openai": {"acc": 0.4, "perplexity": 20.0}},
                  "nha": {"piqa": {"acc": 0.62, "acc_norm": 0.61}, "lambada_openai": {"acc": 0.3, "perplexity": 25.5}}},
        "samples": {"base": {"piqa": 20, "lambada_openai": 20}, "nha": {"piqa": 20, "lambada_openai": 20}},
        "seconds": {"base": 12.5, "nha": 14.25},
        "recall": {lab: {"chance": {"passkey": 1e-05, "mqar": 0.0625}, "passkey": {"1024": a, "4096": a / 2},
                         "mqar": {"1024": a}} for lab, a in (("base", 1.0), ("nha", 0.75))},
        "perplexity": {lab: {"text": "heldout", "seq_len": 128, "sequences": 2, "buckets": ["1-64", "64-128"],
                             "ppl": [30.0 * f, 20.0 * f], "overall_ppl": 22.0 * f}
                       for lab, f in (("base", 1.0), ("nha", 1.125))},
        "subject": "nha",
        "bench": {"rows": [{"model": m, "context": c, "batch": 1, "prefill_s": 0.5 * c / 1024,
                            "prefill_tok_s": 2048.0, "decode_tok_s": 10.0 * (2 if m == "nha" else 1),
                            "decode_ms_per_step": 50.0, "state_mib_per_seq": 1.0 if m == "nha" else c / 512,
                            "peak_mem_gib": None, "note": ""} for m in ("base", "nha") for c in (1024, 2048)],
                  "runs": [{"model": "base", "device": "CPU x86_64, 2 cores (torch 2.13.0)", "dtype": "float32",
                            "nha": None, "settings": None}]},
        "parity": {"nha": {"tolerance": 0.001, "prompt_tokens": [128, 92], "prefill": 64, "chunk_edges": [0, 64],
                           "new_tokens": 8, "cache_bytes": 4096,
                           "paths": [{"path": "chunked", "max_diff": 1e-05, "first_divergence": None, "error": None,
                                      "ok": True},
                                     {"path": "decode", "max_diff": 3.5, "first_divergence": 110, "error": None,
                                      "ok": False}]}},
    }


def test_json_round_trip_is_exact():
    r = EvalResults.from_dict(fixed_results())
    assert r.format_version == RESULTS_VERSION and isinstance(r.settings, EvalSettings)
    assert isinstance(r.models[1], ModelEntry) and r.models[1].training["steps"] == 8
    assert isinstance(r.perplexity["nha"], PerplexityResult) and isinstance(r.bench, BenchResults)
    assert EvalResults.from_json(r.to_json()) == r
    assert r.to_dict() == fixed_results()  # results.json keeps its shape, key order included
    assert r.to_json() == json.dumps(fixed_results(), indent=2)
    built = EvalResults(command="nha-eval x", models=[ModelEntry(label="m", source="m", kind="base")],
                        perplexity={"m": PerplexityResult(buckets=["1-64"], ppl=[2.0], overall_ppl=2.0)})
    assert EvalResults.from_json(built.to_json()) == built


def test_the_object_does_not_share_the_callers_dicts():
    data = fixed_results()
    r = EvalResults.from_dict(data)
    r.tasks["nha"]["piqa"]["acc"] = 0.0
    r.to_dict()["models"].clear()
    assert data["tasks"]["nha"]["piqa"]["acc"] == 0.62 and len(r.models) == 2


# What nha-eval wrote before the typed results: a bench-only run (no "subject"), and an older file with no
# "version", "samples" or "seconds" and a key this code does not know.
OLD_BENCH_ONLY = {
    "version": 1, "created": "2026-11-01T00:00:00+00:00", "command": "nha-eval tiny-random --bench",
    "device": "CPU x86_64, 2 cores (torch 2.13.0)", "dtype": "float32",
    "settings": {"tasks": [], "limit": None, "num_fewshot": None, "batch_size": 16, "mmlu_split": "validation",
                 "seed": 1234},
    "models": [], "reference": None, "tasks": {}, "samples": {}, "seconds": {}, "recall": {}, "perplexity": {},
    "bench": fixed_results()["bench"]}
OLD_UNVERSIONED = {
    "models": [{"label": "base", "source": "b", "kind": "base", "nha": None},
               {"label": "nha", "source": "n", "kind": "nha", "nha": None}],
    "reference": "base", "tasks": {"base": {"piqa": {"acc": 0.6}}, "nha": {"piqa": {"acc": 0.5}}},
    "perplexity": {lab: {"buckets": ["1-64"], "ppl": [30.0], "overall_ppl": 30.0} for lab in ("base", "nha")},
    "notes": {"written by": "a later nha-eval"}}


@pytest.mark.parametrize("old", [OLD_BENCH_ONLY, OLD_UNVERSIONED])
def test_old_results_files_still_read(tmp_path, old):
    (tmp_path / "results.json").write_text(json.dumps(old))
    r = load_results(tmp_path / "results.json")
    assert r.format_version == 1 and r.labels() == [m["label"] for m in old["models"]]
    assert EvalResults.from_json(r.to_json()) == r
    assert Rep.markdown(r) == Rep.markdown(old)  # the same report as from the file's own dict
    if old["models"]:
        assert G.flatten(r.to_dict()) == G.flatten(old)
        assert r.extra == {"notes": {"written by": "a later nha-eval"}}
        assert r.to_dict()["notes"] == old["notes"]  # kept when the file is written again
    else:
        assert r.subject is None and r.bench.speedups is None and len(r.bench.rows) == 4


def test_a_malformed_results_file_is_one_line(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"models": [{"source": "no label"}]}))
    with pytest.raises(NHAError, match="is not an nha-eval results file"):
        load_results(tmp_path / "r.json")
    with pytest.raises(NHAError, match="no 'models' key"):
        (tmp_path / "r.json").write_text("[]")
        load_results(tmp_path / "r.json")


def test_typed_merge_keeps_labels_apart():
    a, b = EvalResults.from_dict(OLD_UNVERSIONED), EvalResults.from_dict(OLD_UNVERSIONED)
    with pytest.raises(NHAError, match="appears in both"):
        a.merge(b)
    b.models = [ModelEntry(label="base-old", source="b", kind="base")]
    b.tasks = {"base-old": {"piqa": {"acc": 0.7}}}
    a.merge(b)
    assert a.labels() == ["base", "nha", "base-old"] and a.tasks["base-old"]["piqa"]["acc"] == 0.7


def test_markdown_matches_the_golden_report():
    assert Rep.markdown(fixed_results()) == GOLDEN_MD
    assert Rep.markdown(EvalResults.from_dict(fixed_results())) == GOLDEN_MD


GOLDEN_MD = (
    '# nha-eval report\n'
    '\n'
    '- command: `nha-eval out/nha --compare base --ppl`\n'
    '- device: `CPU x86_64, 2 cores (torch 2.13.0)`\n'
    '- dtype: `float32`\n'
    '- created: `2026-11-30T12:00:00+00:00`\n'
    '- model `base` (base): base\n'
    '- model `nha` (nha): out/nha (window 64, slots 16, sinks 4, full layers [0]); trained 8 steps '
    'on 1,024 tokens (budget cpu)\n'
    '\n'
    '## Tasks\n'
    '\n'
    '> **`nha`: CPU smoke budget: 8 steps, 1,024 tokens; not a quality result.** It checks the '
    'pipeline runs; the recovery needs the GPU recipe (`--budget gpu`): see docs/results.md.\n'
    '\n'
    '| task | metric | base | nha | nha % of base |\n'
    '|---|---|---|---|---|\n'
    '| piqa | acc | 0.6400 | 0.6200 | 96.9 |\n'
    '| lambada_openai | acc | 0.4000 | 0.3000 | 75.0 |\n'
    '| lambada_openai | perplexity | 20.00 | 25.50 | 78.4 |\n'
    '| average | mean | 0.5200 | 0.4600 | 88.5 |\n'
    '\n'
    '## Recall\n'
    '\n'
    '> **`nha`: CPU smoke budget: 8 steps, 1,024 tokens; not a quality result.** It checks the '
    'pipeline runs; the recovery needs the GPU recipe (`--budget gpu`): see docs/results.md.\n'
    '\n'
    '| passkey (chance 1e-05) | 1024 | 4096 |\n'
    '|---|---|---|\n'
    '| base | 1.00 | 0.50 |\n'
    '| nha | 0.75 | 0.38 |\n'
    '\n'
    '| mqar (chance 0.0625) | 1024 |\n'
    '|---|---|\n'
    '| base | 1.00 |\n'
    '| nha | 0.75 |\n'
    '\n'
    '## Perplexity by position (held-out text)\n'
    '\n'
    '> **`nha`: CPU smoke budget: 8 steps, 1,024 tokens; not a quality result.** It checks the '
    'pipeline runs; the recovery needs the GPU recipe (`--budget gpu`): see docs/results.md.\n'
    '\n'
    '| model | pos 1-64 | pos 64-128 | overall |\n'
    '|---|---|---|---|\n'
    '| base | 30.00 | 20.00 | 22.00 |\n'
    '| nha | 33.75 | 22.50 | 24.75 |\n'
    '\n'
    '## Speed and memory\n'
    '\n'
    '**NHA vs the base model on this machine** (CPU x86_64, 2 cores (torch 2.13.0), 2048 tokens of '
    'context, batch 1): decode state 1.00 MiB per sequence vs 4.00 MiB of KV cache (4.0x smaller); '
    'decode 20.0 tokens/s vs 10.0 (2.00x).\n'
    '\n'
    '| model | context | batch | prefill s | prefill tok/s | decode tok/s | ms/step | state MiB/seq '
    '| peak GiB | note |\n'
    '|---|---|---|---|---|---|---|---|---|---|\n'
    '| base | 1024 | 1 | 0.500 | 2048 | 10.0 | 50.00 | 2.00 | – |  |\n'
    '| base | 2048 | 1 | 1.000 | 2048 | 10.0 | 50.00 | 4.00 | – |  |\n'
    '| nha | 1024 | 1 | 0.500 | 2048 | 20.0 | 50.00 | 1.00 | – |  |\n'
    '| nha | 2048 | 1 | 1.000 | 2048 | 20.0 | 50.00 | 1.00 | – |  |\n'
    '\n'
    '| context | batch | decode NHA/base | prefill base/NHA |\n'
    '|---|---|---|---|\n'
    '| 1024 | 1 | 2.00x | 1.00x |\n'
    '| 2048 | 1 | 2.00x | 1.00x |\n'
    '\n'
    '## Parity\n'
    '\n'
    'Each path against one full forward, on 2 left-padded prompts of 128, 92 tokens (tolerance '
    '0.001).\n'
    '\n'
    '| model | path | max logit diff | first diverging token | result |\n'
    '|---|---|---|---|---|\n'
    '| nha | chunked | 1e-05 | – | ok |\n'
    '| nha | decode | 3.5 | position 110 | **FAIL** |\n'
)
