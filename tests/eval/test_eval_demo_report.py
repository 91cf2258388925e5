"""The demo's report tells the truth at a glance: the training budget stands next to the quality numbers, and the
bench says what NHA gains on the machine that ran it (decode state and decode tokens/s, base vs NHA)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import nha_convert
from nha_convert.cli import eval as cli
from nha_convert.eval import report as Rep

SMOKE = "> **`nha`: CPU smoke budget: 8 steps, 1,024 tokens; not a quality result.**"


def fake_run(root, budget="cpu", tokens_per_step=128):
    """A run folder as nha-finetune leaves it: metrics.jsonl, a checkpoint naming the budget, model/ (empty here)."""
    run = root / "run"
    (run / "model").mkdir(parents=True)
    lines = []
    for stage, first in (("transfer", 0), ("distill", 4)):
        lines.append({"event": "stage_start", "stage": stage, "global_step": first, "steps": 4})
        lines.append({"event": "eval", "stage": stage, "step": 0, "global_step": first, "val_loss": 1.0})
        for s in range(1, 5):
            g = first + s
            lines.append({"stage": stage, "step": s, "global_step": g, "loss": 1.0, "tokens": g * tokens_per_step})
    text = "".join(json.dumps(x) + "\n" for x in lines) + '{"stage": "distill", "step": 5, "glo'  # cut by a crash
    (run / "metrics.jsonl").write_text(text)
    for name in ("step-00000004-stage0", "step-00000008-stage1"):
        (run / "checkpoints" / name).mkdir(parents=True)
        (run / "checkpoints" / name / "trainer_state.json").write_text(json.dumps({"budget": budget}))
    return run


def test_training_summary_reads_the_run_folder(tmp_path):
    run = fake_run(tmp_path)
    assert Rep.training_summary(run / "model") == {
        "run": str(run.resolve()), "budget": "cpu", "steps": 8, "tokens": 1024,
        "stages": {"transfer": 4, "distill": 4}}
    (tmp_path / "plain").mkdir()
    assert Rep.training_summary(tmp_path / "plain") is None  # no run wrote it: nothing claimed


def _results(training):
    ppl = {"buckets": ["1-64"], "ppl": [30.0], "overall_ppl": 30.0}
    return {"models": [{"label": "base", "source": "b", "kind": "base", "nha": None},
                       {"label": "nha", "source": "run/model", "kind": "nha", "nha": None, "training": training}],
            "reference": "base", "tasks": {"base": {"piqa": {"acc": 0.6}}, "nha": {"piqa": {"acc": 0.5}}},
            "perplexity": {"base": ppl, "nha": ppl}}


def test_smoke_budget_stands_next_to_the_quality_numbers():
    md = Rep.markdown(_results({"budget": "cpu", "steps": 8, "tokens": 1024, "stages": {}}))
    tasks = md.split("## Tasks")[1].split("## ")[0]
    ppl = md.split("## Perplexity")[1].split("## ")[0]
    for section in (tasks, ppl):  # the note comes before the table it qualifies
        assert SMOKE in section and section.index(SMOKE) < section.index("| ")
        assert "the GPU recipe (`--budget gpu`): see docs/results.md" in section
    assert "trained 8 steps on 1,024 tokens (budget cpu)" in md


@pytest.mark.parametrize("training, smoke", [
    ({"budget": "gpu", "steps": 900, "tokens": 40_000_000}, False),
    ({"budget": "gpu", "steps": 3, "tokens": 5_000}, True),  # a named budget that saw almost no data is a smoke run
    ({"budget": None, "steps": 900, "tokens": 40_000_000}, False),
])
def test_budget_note_for_other_budgets(training, smoke):
    note = Rep.budget_note(_results(training))
    assert ("not a quality result" in note) is smoke
    if not smoke:
        assert note == f"> `nha`: trained with budget `{training['budget']}`: 900 steps, 40,000,000 tokens."
    assert Rep.budget_note(_results(None)) is None


def _row(model, ctx, tok_s, mib):
    return {"model": model, "context": ctx, "batch": 1, "prefill_s": 1.0, "decode_tok_s": tok_s,
            "decode_ms_per_step": 1e3 / tok_s, "state_mib_per_seq": mib, "note": ""}


def test_bench_headline_states_what_nha_gains_here():
    res = {"models": [], "device": "CPU x86_64, 2 cores (torch 2.13.0)",
           "bench": {"rows": [_row("base", 1024, 20.0, 22.5), _row("nha", 1024, 18.0, 5.0),
                              _row("base", 2048, 10.0, 45.0), _row("nha", 2048, 15.0, 5.0),
                              _row("nha", 4096, 15.0, 5.0)]}}  # no base row at 4096: not a comparison
    assert Rep.bench_headline(res) == (
        "**NHA vs the base model on this machine** (CPU x86_64, 2 cores (torch 2.13.0), 2048 tokens of context, "
        "batch 1): decode state 5.00 MiB per sequence vs 45.00 MiB of KV cache (9.0x smaller); decode 15.0 tokens/s "
        "vs 10.0 (1.50x).")
    assert Rep.bench_markdown(res).startswith("**NHA vs the base model on this machine**")
    assert Rep.bench_headline({"models": [], "bench": {"rows": [_row("nha", 2048, 15.0, 5.0)]}}) is None


def test_parity_section_names_failing_paths():
    paths = [{"path": "chunked", "max_diff": 1e-5, "first_divergence": None, "error": None, "ok": True},
             {"path": "decode", "max_diff": 3.5, "first_divergence": 110, "error": None, "ok": False},
             {"path": "generate", "max_diff": None, "first_divergence": None, "error": "NHAError: lost", "ok": False}]
    md = Rep.parity_markdown({"parity": {"nha": {"tolerance": 1e-3, "prompt_tokens": [128, 92, 57],
                                                 "paths": paths}}})
    assert "3 left-padded prompts of 128, 92, 57 tokens (tolerance 0.001)" in md
    assert "| nha | chunked | 1e-05 | – | ok |" in md
    assert "| nha | decode | 3.5 | position 110 | **FAIL** |" in md
    assert "| nha | generate | – | – | **FAIL**: NHAError: lost |" in md


def test_demo_shaped_run_carries_budget_and_bench(tmp_path, run_cli, smollm2_path):
    """nha-eval RUN/model --compare BASE --ppl --bench, as `make demo` calls it: base and NHA bench rows, the
    training summary in results.json and the smoke note in report.md."""
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=len(tok),
                                        max_position_embeddings=2048))
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    run = fake_run(tmp_path)
    nha_convert.save(nha_convert.convert(base, nha_convert.NHASettings(window=16, slots=4, sinks=4)), tok,
                     run / "model", overwrite=True)
    out = tmp_path / "eval"
    code, _, err = run_cli(cli.main, "nha-eval", run / "model", "--compare", tmp_path / "base", "--tasks", "none",
                           "--ppl", "--ppl-len", 64, "--ppl-seqs", 1, "--bench", "--bench-contexts", 64,
                           "--bench-batches", 1, "--bench-steps", 2, "--out", out)
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["models"][1]["training"]["steps"] == 8 and "training" not in res["models"][0]
    assert [(r["model"], r["context"]) for r in res["bench"]["rows"]] == [("base", 64), ("nha", 64)]
    assert [m["label"] for m in res["models"]] == ["base", "run"]  # RUN/model is labelled by its run
    md = (out / "report.md").read_text()
    assert SMOKE.replace("`nha`", "`run`") in md
    assert Rep.bench_headline(res) in md and "64 tokens of context, batch 1" in md
