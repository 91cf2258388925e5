"""PNG charts of one run (matplotlib, files only): task scores, recall, perplexity by position, speed."""

from __future__ import annotations

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


def tasks_chart(results: dict[str, Any], path: Path) -> Path | None:
    rows = [r for r in task_rows(results) if not is_lower_better(r["metric"])]
    if not rows:
        return None
    plt = _plt()
    names = labels(results)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4))
    width = 0.8 / max(len(names), 1)
    for i, lab in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(rows))]
        ax.bar(xs, [r["values"][lab] or 0 for r in rows], width, label=lab)
    ax.set_xticks(range(len(rows)), [f"{r['task']}\n{r['metric']}" for r in rows], fontsize=8)
    ax.set_ylabel("score")
    ax.legend(fontsize=8)
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
        for lab in labels(results):
            pts = sorted((int(L), a) for L, a in (rec.get(lab, {}).get(probe) or {}).items())
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=lab)
        chance = next((r["chance"][probe] for r in rec.values() if probe in r.get("chance", {})), None)
        if chance is not None:
            ax.axhline(chance, ls="--", c="gray", lw=1, label="chance")
        ax.set_xscale("log", base=2)
        _length_ticks(ax, sorted({int(L) for r in rec.values() for L in (r.get(probe) or {})}))
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("accuracy")
        ax.set_title(probe)
        ax.legend(fontsize=8)
    return _save(fig, path)


def perplexity_chart(results: dict[str, Any], path: Path) -> Path | None:
    ppl = results.get("perplexity") or {}
    if not ppl:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for lab in labels(results):
        if lab in ppl:
            ax.plot(range(len(ppl[lab]["ppl"])), ppl[lab]["ppl"], marker="o", label=lab)
    buckets = next(iter(ppl.values()))["buckets"]
    ax.set_xticks(range(len(buckets)), buckets, rotation=30, fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("token position")
    ax.set_ylabel("perplexity")
    ax.set_title("Perplexity by position (held-out text)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def bench_chart(results: dict[str, Any], path: Path) -> Path | None:
    rows = (results.get("bench") or {}).get("rows") or []
    if not rows:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    models = list(dict.fromkeys(r["model"] for r in rows))
    for m in models:
        mine = [r for r in rows if r["model"] == m]
        pre = sorted({(r["context"], r["prefill_s"]) for r in mine if r["batch"] == 1 and r["prefill_s"]})
        if pre:
            axes[0].plot([p[0] for p in pre], [p[1] for p in pre], marker="o", label=m)
        for ctx in sorted({r["context"] for r in mine}):
            dec = sorted((r["batch"], r["decode_tok_s"]) for r in mine if r["context"] == ctx and r["decode_tok_s"])
            if dec:
                axes[1].plot([d[0] for d in dec], [d[1] for d in dec], marker="o", label=f"{m} @ {ctx}")
        st = sorted({(r["context"], r["state_mib_per_seq"]) for r in mine if r["state_mib_per_seq"] is not None})
        if st:
            axes[2].plot([s[0] for s in st], [s[1] for s in st], marker="o", label=m)
    for ax, title, ylabel in ((axes[0], "Prefill latency (batch 1)", "seconds"),
                              (axes[1], "Decode throughput", "tokens / s"),
                              (axes[2], "Decode state per sequence", "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
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
