"""Side-by-side reports of one evaluation run: results.json, report.md and PNG charts in one folder.

The pieces live apart: `results` (the typed results and their JSON form), `files` (atomic writes, JSON reads),
`tables` (rows shared by tables, charts and the gate), `markdown` (report.md), `charts` (matplotlib) and
`training` (the budget behind a fine-tuned folder). The names below stay importable from here for callers of the
single module this used to be.
"""

from __future__ import annotations

import os
from pathlib import Path

from .charts import bench_chart, perplexity_chart, recall_chart, tasks_chart, write_charts
from .files import atomic_write, json_default, read_json
from .markdown import (BENCH_COLUMNS, bench_headline, bench_markdown, budget_note, markdown,
                       parity_markdown, perplexity_markdown, recall_markdown, tasks_markdown)
from .results import RESULTS_VERSION, EvalResults, ResultsLike, load_results, merge
from .tables import labels, recovered, task_rows
from .training import GPU_RESULTS, SMOKE_TOKENS, is_smoke, training_summary

__all__ = ["BENCH_COLUMNS", "GPU_RESULTS", "RESULTS_VERSION", "SMOKE_TOKENS", "EvalResults", "ResultsLike",
           "atomic_write", "bench_chart", "bench_headline", "bench_markdown", "budget_note", "is_smoke",
           "json_default", "labels", "load_results", "markdown", "merge", "parity_markdown", "perplexity_chart",
           "perplexity_markdown", "read_json", "recall_chart", "recall_markdown", "recovered", "task_rows",
           "tasks_chart", "tasks_markdown", "training_summary", "write_charts", "write_report"]


def write_report(results: ResultsLike, out_dir: str | os.PathLike, charts: bool = True) -> dict[str, Path]:
    """results.json, report.md and the charts that have data; returns {name: path}."""
    res = results if isinstance(results, EvalResults) else EvalResults.from_dict(results)
    data = res.to_dict()
    out = Path(out_dir)
    files: dict[str, Path] = {}
    text = res.to_json()
    files["json"] = atomic_write(out / "results.json", lambda p: p.write_text(text + "\n"))
    md = markdown(data)
    files["markdown"] = atomic_write(out / "report.md", lambda p: p.write_text(md))
    if charts:
        files.update(write_charts(data, out))
    return files
