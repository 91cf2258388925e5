"""benchmarks/loss_curves.py reads the loss at the same real tokens: two runs with the same loss per token but
different steps agree at every mark, a run that learns less per token does not, and resumed (repeated) steps and
the tokens of earlier stages do not shift the curve."""

from __future__ import annotations

import json

from tests.helpers.scripts import load_benchmark

curves = load_benchmark("loss_curves")


def _run(tokens_per_step: int, offset: float = 0.0, steps: int = 200, log_every: int = 10, resumed_at: int | None = None,
         earlier_stage_tokens: int = 0) -> list[dict]:
    """A transfer stage, then distill whose loss is 3 - tokens / 1e6 (+ offset) with a small alternating wiggle."""
    lines = [{"stage": "transfer", "global_step": 5, "loss": 9.0, "tokens": earlier_stage_tokens}]
    for s in range(log_every, steps + 1, log_every):
        tok = s * tokens_per_step
        line = {"stage": "distill", "step": s, "global_step": 5 + s, "loss": 3 - tok / 1e6 + offset
                + 0.01 * (-1) ** (s // log_every), "tokens": earlier_stage_tokens + tok}
        lines.append(line)
        if resumed_at is not None and s == resumed_at:  # a resume logs the steps since the checkpoint again
            lines += [dict(x) for x in lines[-3:]]
    lines.append({"event": "eval", "stage": "distill", "val_loss": 1.5 + offset})
    return lines


def test_same_loss_per_token_agrees_at_every_mark_whatever_the_step_size():
    runs = {"16K steps": _run(1000, earlier_stage_tokens=50_000, resumed_at=100), "64K steps": _run(4000, steps=50, log_every=2)}
    result = curves.compare(runs, "distill", 5)
    a, b = result["runs"]["16K steps"], result["runs"]["64K steps"]
    assert result["marks"] == [20_000, 60_000, 100_000, 140_000, 180_000]  # band centres up to the 200K both reached
    for i, mark in enumerate(result["marks"]):
        assert abs(a["loss"][i] - (3 - mark / 1e6)) < 0.011 and abs(b["loss"][i] - (3 - mark / 1e6)) < 0.011
    assert "no" not in curves.markdown(result).split("\n", 2)[2]
    assert a["held_out"] == b["held_out"] == 1.5


def test_a_run_that_learns_less_per_token_is_told_apart():
    result = curves.compare({"before": _run(1000), "after": _run(1000, offset=0.2)}, "distill", 4)
    rows = curves.markdown(result).splitlines()[2:-1]
    assert len(rows) == 4 and all(r.endswith("| no |") for r in rows)


def test_the_command_reads_run_folders(tmp_path, capsys, monkeypatch):
    for name, run in (("a", _run(1000)), ("b", _run(2000, steps=100))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in run) + "\n")
    monkeypatch.setattr("sys.argv", ["loss_curves.py", str(tmp_path / "a"), str(tmp_path / "b"), "--marks", "3",
                                     "--json", str(tmp_path / "c.json")])
    curves.main()
    out = capsys.readouterr().out
    assert out.count("| yes |") == 3 and json.loads((tmp_path / "c.json").read_text())["marks"][-1] == 166_667
