"""Side-by-side report files and the regression gate, on a hand-written results dict."""

from __future__ import annotations

import json
import os

import pytest

from nha_convert.errors import NHAError
from nha_convert.eval import gate as G
from nha_convert.eval import report as Rep


def _results():
    return {
        "version": 1, "command": "nha-eval x", "device": "cpu", "dtype": "float32",
        "models": [{"label": "base", "source": "b", "kind": "base", "nha": None},
                   {"label": "nha", "source": "n", "kind": "nha",
                    "nha": {"window": 64, "slots": 64, "sinks": 0, "windows": [None, 64]}},
                   {"label": "swa-sinks-w64", "source": "b+swa", "kind": "swa-sinks", "nha": None}],
        "reference": "base", "subject": "nha",
        "tasks": {
            "base": {"piqa": {"acc": 0.64, "acc_norm": 0.63}, "hellaswag": {"acc": 0.3, "acc_norm": 0.40},
                     "lambada_openai": {"acc": 0.40, "perplexity": 20.0}},
            "nha": {"piqa": {"acc": 0.62, "acc_norm": 0.61}, "hellaswag": {"acc": 0.3, "acc_norm": 0.38},
                    "lambada_openai": {"acc": 0.30, "perplexity": 25.0}},
            "swa-sinks-w64": {"piqa": {"acc": 0.60, "acc_norm": 0.6}, "hellaswag": {"acc": 0.3, "acc_norm": 0.36},
                              "lambada_openai": {"acc": 0.20, "perplexity": 40.0}},
        },
        "recall": {lab: {"passkey": {"1024": a, "4096": a / 2}, "mqar": {"1024": a}, "chance": {"passkey": 1e-5,
                                                                                              "mqar": 0.0625}}
                   for lab, a in (("base", 1.0), ("nha", 0.8), ("swa-sinks-w64", 0.1))},
        "perplexity": {lab: {"buckets": ["1-64", "64-128"], "ppl": [30.0 * f, 20.0 * f], "overall_ppl": 22.0 * f}
                       for lab, f in (("base", 1.0), ("nha", 1.1), ("swa-sinks-w64", 1.3))},
        "bench": {"rows": [
            {"model": m, "context": c, "batch": b, "prefill_s": 0.1 * c / 1024 * (2 if m == "base" else 1),
             "prefill_tok_s": 1.0, "decode_tok_s": 100.0 * b * (1 if m == "base" else 3), "decode_ms_per_step": 1.0,
             "state_mib_per_seq": (c / 1024 if m == "base" else 1.0), "peak_mem_gib": None, "note": ""}
            for m in ("base", "nha") for c in (1024, 4096) for b in (1, 8)]},
    }


def test_task_rows_average_and_recovered():
    rows = Rep.task_rows(_results())
    assert [(r["task"], r["metric"]) for r in rows] == [
        ("piqa", "acc"), ("hellaswag", "acc_norm"), ("lambada_openai", "acc"), ("lambada_openai", "perplexity"),
        ("average", "mean")]
    avg = rows[-1]["values"]
    assert avg["base"] == pytest.approx((0.64 + 0.40 + 0.40) / 3)  # perplexity is not averaged with scores
    assert Rep.recovered(0.32, 0.64, "acc") == pytest.approx(50.0)
    assert Rep.recovered(40.0, 20.0, "perplexity") == pytest.approx(50.0)  # twice the perplexity: half kept


def test_write_report_files(tmp_path):
    files = Rep.write_report(_results(), tmp_path / "out")
    assert set(files) == {"json", "markdown", "tasks", "recall", "perplexity", "bench"}
    assert json.loads(files["json"].read_text())["reference"] == "base"
    for name in ("tasks", "recall", "perplexity", "bench"):
        assert files[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = files["markdown"].read_text()
    assert "| piqa | acc | 0.6400 | 0.6200 | 0.6000 | 96.9 | 93.8 |" in md
    assert "nha % of base" in md and "passkey (chance 1e-05)" in md and "pos 64-128" in md
    assert "decode NHA/base" in md and "3.00x" in md
    assert not [p for p in os.listdir(tmp_path / "out") if p.endswith(".partial")]  # atomic writes cleaned up


def test_merge_refuses_clashing_labels():
    a, b = _results(), _results()
    with pytest.raises(NHAError, match="appears in both"):
        Rep.merge(a, b)
    b["models"] = [dict(b["models"][0], label="base-old")]
    b["tasks"] = {"base-old": b["tasks"]["base"]}
    merged = Rep.merge(a, b)
    assert "base-old" in Rep.labels(merged) and merged["tasks"]["base-old"]["piqa"]["acc"] == 0.64


def test_flatten_names_every_metric_of_the_subject():
    flat = G.flatten(_results())
    assert flat["piqa/acc"] == 0.62 and flat["lambada_openai/perplexity"] == 25.0  # the subject: nha
    assert flat["recall/passkey/4096"] == 0.4 and flat["perplexity/overall"] == pytest.approx(24.2)
    assert G.flatten(_results(), "base")["average"] == pytest.approx(1.44 / 3)
    with pytest.raises(NHAError, match="no model"):
        G.flatten(_results(), "nope")


def test_gate_passes_within_tolerance_and_names_each_fall():
    res = _results()
    exp = {"metrics": {"piqa/acc": 0.625, "hellaswag/acc_norm": 0.38, "lambada_openai/perplexity": 24.9}}
    assert G.check(res, exp, 0.01) == []  # 0.62 >= 0.615; 25.0 <= 24.9 * 1.01
    exp = {"metrics": {"piqa/acc": 0.64, "hellaswag/acc_norm": 0.38, "lambada_openai/perplexity": 20.0,
                       "recall/mqar/1024": {"value": 0.9, "tolerance": 0.2}, "mmlu/acc": 0.3}}
    fails = {f.metric: f for f in G.check(res, exp, 0.01)}
    assert set(fails) == {"piqa/acc", "lambada_openai/perplexity", "mmlu/acc"}
    assert "0.62 < 0.63" in str(fails["piqa/acc"]) and "missing" in str(fails["mmlu/acc"])
    assert fails["lambada_openai/perplexity"].lower_is_better


def test_expected_from_round_trips_through_the_gate():
    res = _results()
    exp = G.expected_from(res)
    assert exp["model"] == "nha" and exp["metrics"]["hellaswag/acc_norm"] == 0.38
    assert "hellaswag/acc" not in exp["metrics"]  # only the primary metric of each task
    assert G.check(res, exp) == []
    res["tasks"]["nha"]["hellaswag"]["acc_norm"] = 0.30
    assert [f.metric for f in G.check(res, exp)] == ["hellaswag/acc_norm", "average"]


def test_cli_check_exit_codes(tmp_path, run_cli):
    """`nha-eval --results r.json --check e.json`: exit 0 within tolerance, 1 naming each metric that fell."""
    from nha_convert.cli import eval as cli

    (tmp_path / "r.json").write_text(json.dumps(_results()))
    (tmp_path / "ok.json").write_text(json.dumps({"metrics": {"piqa/acc": 0.62}}))
    (tmp_path / "bad.json").write_text(json.dumps({"metrics": {"piqa/acc": 0.7, "hellaswag/acc_norm": 0.5}}))

    def run(expected):
        code, _, err = run_cli(cli.main, "nha-eval", "--results", tmp_path / "r.json",
                               "--check", tmp_path / expected, "--out", tmp_path / "o")
        return code, err

    code, err = run("ok.json")
    assert code == 0 and "check passed" in err
    code, err = run("bad.json")
    assert code == 1 and "FAIL piqa/acc" in err and "FAIL hellaswag/acc_norm" in err
    code, err = run("nope.json")
    assert code == 1 and "error:" in err and "Traceback" not in err
    assert (tmp_path / "o" / "report.md").is_file()
