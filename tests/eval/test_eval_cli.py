"""nha-eval end to end on tiny random models: base vs NHA vs the swa-sinks baseline, report files, gate."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import nha_convert
from nha_convert.cli import eval as cli


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory, smollm2_path):
    """A tiny base Llama (real SmolLM2 tokenizer) and its NHA conversion, saved as HF folders."""
    root = tmp_path_factory.mktemp("tiny")
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=len(tok),
                                         max_position_embeddings=2048))
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    nha_convert.convert(model, nha_convert.NHASettings(window=16, slots=4, full_layers=[1]))
    nha_convert.save(model, tok, root / "nha")
    return root


def _run(run_cli, *args):
    code, _, err = run_cli(cli.main, "nha-eval", *args)
    return code, err


def test_side_by_side_with_baseline_and_gate(tiny_folders, tmp_path, run_cli):
    out = tmp_path / "out"
    code, err = _run(run_cli, tiny_folders / "nha", "--compare", tiny_folders / "base",
                     "--baseline", "swa-sinks", "--tasks", "piqa", "--limit", 2, "--batch-size", 2,
                     "--recall", "--recall-lengths", 256, "--recall-n", 1, "--recall-pairs", 4,
                     "--ppl", "--ppl-len", 64, "--ppl-seqs", 1, "--out", out,
                     "--write-expected", tmp_path / "exp.json")
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert [m["label"] for m in res["models"]] == ["base", "nha", "swa-sinks-w16"]
    assert [m["kind"] for m in res["models"]] == ["base", "nha", "swa-sinks"]
    assert res["reference"] == "base" and res["subject"] == "nha"
    # The baseline has the NHA model's window and full layers, no slots, 4 sinks.
    swa = res["models"][2]["nha"]
    assert (swa["window"], swa["slots"], swa["sinks"], swa["windows"]) == (16, 0, 4, [16, None])
    for lab in ("base", "nha", "swa-sinks-w16"):
        assert set(res["tasks"][lab]["piqa"]) == {"acc", "acc_norm"} and res["samples"][lab]["piqa"] == 2
        assert set(res["recall"][lab]) == {"passkey", "mqar", "reading", "reading-distractors", "code", "restated",
                                           "chance"}
        assert res["perplexity"][lab]["buckets"] == ["1-64"]
    md = (out / "report.md").read_text()
    assert "nha % of base" in md and "swa-sinks-w16 % of base" in md
    assert all((out / f"{n}.png").is_file() for n in ("tasks", "recall", "perplexity"))

    exp = json.loads((tmp_path / "exp.json").read_text())
    assert exp["model"] == "nha" and "piqa/acc" in exp["metrics"]
    code, err = _run(run_cli, "--results", out / "results.json", "--check", tmp_path / "exp.json",
                     "--out", tmp_path / "o2")
    assert code == 0, err
    exp["metrics"]["piqa/acc"] += 0.5
    (tmp_path / "exp.json").write_text(json.dumps(exp))
    code, err = _run(run_cli, "--results", out / "results.json", "--check", tmp_path / "exp.json",
                     "--out", tmp_path / "o2")
    assert code == 1 and "FAIL piqa/acc" in err


def test_recall_file_alone(tiny_folders, tmp_path, run_cli):
    """--recall-file without --recall: only the file's probe, in results.json, the report, the chart and the gate."""
    rows = [{"prompt": "The code is 4417. " + "Filler text. " * n + "The code is", "answer": " 4417"} for n in (2, 90)]
    (tmp_path / "codes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    code, err = _run(run_cli, tiny_folders / "nha", "--compare", tiny_folders / "base", "--tasks", "none",
                     "--recall-file", tmp_path / "codes.jsonl", "--out", out, "--write-expected", tmp_path / "e.json")
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    for lab in ("base", "nha"):
        assert set(res["recall"][lab]) == {"codes", "chance"} and set(res["recall"][lab]["codes"]) == {"32", "512"}
    assert "codes (tokens up to)" in (out / "report.md").read_text() and (out / "recall.png").is_file()
    assert {"recall/codes/32", "recall/codes/512"} <= set(json.loads((tmp_path / "e.json").read_text())["metrics"])


def test_ablate_slots_adds_masked_rows(tiny_folders, tmp_path, run_cli):
    """--ablate slots: the NHA model's probes and perplexity again with its slots masked, next to its own."""
    out = tmp_path / "out"
    code, err = _run(run_cli, tiny_folders / "nha", "--compare", tiny_folders / "base", "--tasks", "none",
                     "--recall", "--recall-probes", "code,restated", "--recall-lengths", 256, "--recall-items", 3,
                     "--ablate", "slots", "--ppl", "--ppl-len", 64, "--ppl-seqs", 1, "--out", out)
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert list(res["ablation"]) == ["nha"]  # the base model has no slots to mask
    masked = res["ablation"]["nha"]["slots"]
    assert set(masked["recall"]) == {"code", "restated", "chance"} and set(masked["recall"]["code"]) == {"256"}
    assert masked["perplexity"]["buckets"] == ["1-64"]
    assert masked["recall"]["chance"] == res["recall"]["nha"]["chance"] == pytest.approx({"code": 0.2,
                                                                                        "restated": 1 / 6})
    md = (out / "report.md").read_text()
    assert "| nha, slots masked |" in md and "| nha, slots carry |" in md
    assert "| probe | tokens | base | nha | nha slots masked | nha slots carry | chance |" in md


def test_bench_cli_writes_rows_and_chart(tmp_path, run_cli):
    code, err = _run(run_cli, "tiny-random", "--bench", "--bench-contexts", "32,64",
                     "--bench-batches", "1,2", "--bench-steps", 1, "--window", 8, "--slots", 4,
                     "--full-layers", "0", "--out", tmp_path)
    assert code == 0, err
    res = json.loads((tmp_path / "results.json").read_text())
    rows = res["bench"]["rows"]
    assert [(r["model"], r["context"], r["batch"]) for r in rows] == [
        (m, c, b) for m in ("base", "nha") for c in (32, 64) for b in (1, 2)]
    assert res["bench"]["runs"][0]["nha"]["windows"] == [None, 8]
    assert (tmp_path / "bench.png").is_file() and "decode NHA/base" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["tiny-random", "--tasks", "piqa"], "random weights"),
    (["{base}", "--baseline", "swa-sinks", "--tasks", "piqa"], "needs a window"),
    (["{nha}", "--baseline", "swa-sinks", "--tasks", "piqa"], "--compare BASE"),
    (["{base}", "--tasks", "no_such_task_xyz", "--limit", "1"], "unknown task"),
    ([], "name at least one model"),
    (["{base}", "--tasks", "none", "--recall-file", "no-such-file.jsonl"], "--recall-file no-such-file.jsonl: cannot"),
    (["{base}", "--tasks", "none"], "nothing to evaluate"),  # once wrote an empty report and exited 0
    (["./no-such-model", "--tasks", "none"], "nothing to evaluate"),
    (["./no-such-model", "--recall"], "no such folder"),  # before any other model loads or any work starts
    (["{nha}", "--compare", "no-such-run.json", "--recall"], "no such results file"),
    (["{nha}", "--tasks", "none", "--recall", "--recall-probes", "code,cod"], "unknown recall probe 'cod'"),
    (["{nha}", "--tasks", "none", "--recall", "--ablate", "gates"], "--ablate takes slots"),
    (["{nha}", "--tasks", "piqa", "--ablate", "slots"], "add --recall or --ppl"),
    (["{nha}", "--tasks", "none", "--recall", "--recall-n", "0"], "--recall-n must be at least 1"),
])
def test_bad_input_is_one_line(tiny_folders, run_cli, args, message):
    args = [a.format(base=tiny_folders / "base", nha=tiny_folders / "nha") for a in args]
    code, err = _run(run_cli, *args)
    assert code != 0 and message in err and "Traceback" not in err
