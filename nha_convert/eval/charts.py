"""PNG charts of one run (matplotlib, files only): task scores, recall, perplexity by position, speed.

A NaN or infinite value (a broken model) is left out of its chart and named in a note on it: the report is still
written, and report.md shows the value itself.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .files import atomic_write
from .results import ResultsLike, as_dict
from .tables import is_lower_better, labels, recall_probes, task_rows


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    def write(tmp: Path) -> None:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")

    try:
        return atomic_write(path, write)
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _points(pairs: Any, what: str, skipped: list[str]) -> list[tuple[Any, Any]]:
    """The pairs (x, y) whose y is a finite number; `what` goes into `skipped` when one is not."""
    pairs = list(pairs)
    kept = [(x, y) for x, y in pairs if _finite(y)]
    if any(y is not None and not _finite(y) for _, y in pairs):
        skipped.append(what)
    return kept


def _legend(ax: Any, size: int) -> None:
    if ax.get_legend_handles_labels()[0]:  # nothing plotted (every value non-finite): no empty legend
        ax.legend(fontsize=size)


def _mark_skipped(ax: Any, skipped: list[str]) -> None:
    if skipped:
        ax.text(0.01, 0.99, "not finite, not plotted: " + ", ".join(dict.fromkeys(skipped)), transform=ax.transAxes,
                va="top", fontsize=7, color="red")


def tasks_chart(results: dict[str, Any], path: Path) -> Path | None:
    rows = [r for r in task_rows(results) if not is_lower_better(r["metric"])]
    if not rows:
        return None
    plt = _plt()
    names = labels(results)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4))
    width = 0.8 / max(len(names), 1)
    skipped: list[str] = []
    for i, lab in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(rows))]
        pts = _points(((x, r["values"][lab] or 0) for x, r in zip(xs, rows)), lab, skipped)
        ax.bar([p[0] for p in pts], [p[1] for p in pts], width, label=lab)
    _mark_skipped(ax, skipped)
    ax.set_xticks(range(len(rows)), [f"{r['task']}\n{r['metric']}" for r in rows], fontsize=8)
    ax.set_ylabel("score")
    _legend(ax, 8)
    ax.set_title("Task scores")
    return _save(fig, path)


def _k(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def _length_ticks(ax: Any, values: list[int]) -> None:
    if values:
        ax.set_xticks(values, [_k(v) for v in values])
        ax.minorticks_off()


def recall_chart(results: dict[str, Any], path: Path) -> Path | None:
    rec = results.get("recall") or {}
    probes = [p for p in recall_probes(rec) if any(r.get(p) for r in rec.values())]
    if not probes:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(probes), figsize=(5 * len(probes), 3.6), squeeze=False)
    for ax, probe in zip(axes[0], probes):
        skipped: list[str] = []
        for lab in labels(results):
            pts = sorted(_points(((int(L), a) for L, a in (rec.get(lab, {}).get(probe) or {}).items()), lab, skipped))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=lab)
        chance = next((r["chance"][probe] for r in rec.values() if probe in r.get("chance", {})), None)
        if chance is not None:
            ax.axhline(chance, ls="--", c="gray", lw=1, label="chance")
        _mark_skipped(ax, skipped)
        ax.set_xscale("log", base=2)
        _length_ticks(ax, sorted({int(L) for r in rec.values() for L in (r.get(probe) or {})}))
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("accuracy")
        ax.set_title(probe)
        _legend(ax, 8)
    return _save(fig, path)


def perplexity_chart(results: dict[str, Any], path: Path) -> Path | None:
    ppl = results.get("perplexity") or {}
    if not ppl:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    skipped: list[str] = []
    plotted = False
    for lab in labels(results):
        if lab in ppl:
            pts = _points(enumerate(ppl[lab]["ppl"]), lab, skipped)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=lab)
                plotted = True
    buckets = next(iter(ppl.values()))["buckets"]
    ax.set_xticks(range(len(buckets)), buckets, rotation=30, fontsize=8)
    _mark_skipped(ax, skipped)
    if plotted:  # a log axis with no finite data cannot be drawn
        ax.set_yscale("log")
    ax.set_xlabel("token position")
    ax.set_ylabel("perplexity")
    ax.set_title("Perplexity by position (held-out text)")
    return _save(fig, path)


def bench_chart(results: dict[str, Any], path: Path) -> Path | None:
    rows = (results.get("bench") or {}).get("rows") or []
    if not rows:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    models = list(dict.fromkeys(r["model"] for r in rows))
    skipped: list[list[str]] = [[], [], []]
    for m in models:
        mine = [r for r in rows if r["model"] == m]
        pre = sorted(set(_points(((r["context"], r["prefill_s"]) for r in mine if r["batch"] == 1 and r["prefill_s"]),
                                 m, skipped[0])))
        if pre:
            axes[0].plot([p[0] for p in pre], [p[1] for p in pre], marker="o", label=m)
        for ctx in sorted({r["context"] for r in mine}):
            dec = sorted(_points(((r["batch"], r["decode_tok_s"]) for r in mine
                                  if r["context"] == ctx and r["decode_tok_s"]), f"{m} @ {ctx}", skipped[1]))
            if dec:
                axes[1].plot([d[0] for d in dec], [d[1] for d in dec], marker="o", label=f"{m} @ {ctx}")
        st = sorted(set(_points(((r["context"], r["state_mib_per_seq"]) for r in mine), m, skipped[2])))
        if st:
            axes[2].plot([s[0] for s in st], [s[1] for s in st], marker="o", label=m)
    for ax, sk in zip(axes, skipped):
        _mark_skipped(ax, sk)
    for ax, title, ylabel in ((axes[0], "Prefill latency (batch 1)", "seconds"),
                              (axes[1], "Decode throughput", "tokens / s"),
                              (axes[2], "Decode state per sequence", "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        _legend(ax, 7)
    contexts = sorted({r["context"] for r in rows})
    _length_ticks(axes[0], contexts)
    _length_ticks(axes[2], contexts)
    _length_ticks(axes[1], sorted({r["batch"] for r in rows}))
    axes[0].set_xlabel("context (tokens)")
    axes[1].set_xlabel("batch")
    axes[2].set_xlabel("context (tokens)")
    return _save(fig, path)


CHARTS = (("tasks", tasks_chart), ("recall", recall_chart), ("perplexity", perplexity_chart), ("bench", bench_chart))


def write_charts(results: ResultsLike, out: Path) -> dict[str, Path]:
    """<name>.png in `out` for each chart that has data; returns {name: path}."""
    results = as_dict(results)
    files = {}
    for name, fn in CHARTS:
        p = fn(results, out / f"{name}.png")
        if p is not None:
            files[name] = p
    return files
