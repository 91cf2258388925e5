"""The training loss of two or more runs at the same real tokens: did a faster setting learn as much per token?

    python benchmarks/loss_curves.py out/a out/b --stage distill            # run folders (or their metrics.jsonl)
    python benchmarks/loss_curves.py out/a out/b --stage distill --marks 12 --json docs/bench/curves.json

Issue 12 asks that the throughput changes (packed rows, bigger steps, the fused loss) give "the same loss at the same
tokens as before, within noise". Each run's metrics.jsonl logs the training loss and the cumulative real tokens every
`log_every` steps; this cuts the stage's tokens that every run reached into equal bands and prints, at the centre of
each, each run's loss (the mean of its logged losses in the band) and its noise (their standard deviation), then the
held-out losses the runs logged at the stage's end. Two runs agree within noise at a mark when their difference is
below the larger of the two deviations. Log often enough (`output.log_every`) for several points per band.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a run folder's metrics.jsonl (or of the file itself)."""
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.is_file():
        sys.exit(f"error: no metrics.jsonl at {path}; give a run folder of nha-finetune or its metrics.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stage_points(lines: list[dict[str, Any]], stage: str) -> list[tuple[int, float]]:
    """(real tokens since the stage started, training loss) of every logged step of `stage`, in order. A resumed
    run logs some steps twice; the last entry of a step wins."""
    by_step: dict[int, dict[str, Any]] = {}
    for x in lines:
        if x.get("stage") == stage and "event" not in x and "loss" in x and "tokens" in x:
            by_step[x["global_step"]] = x
    rows = [by_step[s] for s in sorted(by_step)]
    if not rows:
        return []
    # `tokens` counts from the start of the run; the stage's own count starts at its first logged step, less the
    # tokens of that step's interval (its first log line comes after `log_every` steps).
    first = rows[0]["tokens"] - (rows[1]["tokens"] - rows[0]["tokens"] if len(rows) > 1 else 0)
    return [(int(x["tokens"] - first), float(x["loss"])) for x in rows]


def held_out(lines: list[dict[str, Any]], stage: str) -> float | None:
    """The last held-out loss the run logged for `stage`."""
    evals = [x["val_loss"] for x in lines if x.get("event") == "eval" and x.get("stage") == stage and "val_loss" in x]
    return float(evals[-1]) if evals else None


def at_marks(points: list[tuple[int, float]], marks: list[int], half: float) -> list[tuple[float, float, int]]:
    """(mean loss, standard deviation, logged points) in [mark - half, mark + half] for every mark."""
    out = []
    for m in marks:
        band = [loss for tok, loss in points if m - half <= tok <= m + half]
        mean = statistics.fmean(band) if band else float("nan")
        sd = statistics.stdev(band) if len(band) > 1 else float("nan")
        out.append((mean, sd, len(band)))
    return out


def compare(runs: dict[str, list[dict[str, Any]]], stage: str, n_marks: int) -> dict[str, Any]:
    """The table as data: common token marks, each run's loss and noise there, and its final held-out loss."""
    points = {name: stage_points(lines, stage) for name, lines in runs.items()}
    empty = [name for name, p in points.items() if len(p) < 2]
    if empty:
        sys.exit(f"error: no logged steps of stage {stage!r} in {', '.join(empty)} (stages: "
                 f"{', '.join(sorted({x['stage'] for ls in runs.values() for x in ls if 'stage' in x}))})")
    reach = min(p[-1][0] for p in points.values())
    spacing = reach / n_marks
    marks = [round(spacing * (i + 0.5)) for i in range(n_marks)]  # the centres of n equal bands up to `reach`
    table = {name: at_marks(p, marks, spacing / 2) for name, p in points.items()}
    return {"stage": stage, "marks": marks,
            "runs": {name: {"loss": [r[0] for r in rows], "sd": [r[1] for r in rows], "n": [r[2] for r in rows],
                            "held_out": held_out(runs[name], stage)} for name, rows in table.items()}}


def markdown(result: dict[str, Any]) -> str:
    names = list(result["runs"])
    head = "| real tokens | " + " | ".join(f"{n} loss (sd)" for n in names) + " | within noise |"
    lines = [head, "|" + "---|" * (len(names) + 2)]
    for i, mark in enumerate(result["marks"]):
        cells = [result["runs"][n] for n in names]
        means = [c["loss"][i] for c in cells]
        sds = [c["sd"][i] for c in cells]
        agree = max(means) - min(means) <= max(sds) if all(s == s for s in sds) else None
        lines.append(f"| {mark / 1e6:.2f}M | " + " | ".join(f"{m:.4f} ({s:.4f})" for m, s in zip(means, sds))
                     + f" | {'-' if agree is None else 'yes' if agree else 'no'} |")
    lines.append("| held-out at the stage's end | "
                 + " | ".join("-" if c["held_out"] is None else f"{c['held_out']:.4f}" for c in result["runs"].values())
                 + " | |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run folders of nha-finetune, or metrics.jsonl files")
    p.add_argument("--stage", default="distill", help="the stage to compare (default distill)")
    p.add_argument("--marks", type=int, default=8, help="token marks in the table (default 8)")
    p.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")
    args = p.parse_args()
    if len(args.runs) < 2:
        sys.exit("error: give at least two runs to compare")
    if args.marks < 1:
        sys.exit(f"error: --marks must be >= 1, got {args.marks}")
    names = [str(r) for r in args.runs]
    result = compare({n: read_metrics(r) for n, r in zip(names, args.runs)}, args.stage, args.marks)
    print(markdown(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
