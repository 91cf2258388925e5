"""Side-by-side reports of one evaluation run: results.json, report.md and PNG charts.

`results` is one plain dict (the JSON written to disk):
  models:     [{"label", "source", "kind": "base" | "nha" | "swa-sinks" | "random", "nha": {...} | None}]
  reference:  label of the model others are compared against (percent of its score recovered), or None
  tasks:      {label: {task: {metric: value}}}          (lm-eval; groups such as mmlu included)
  recall:     {label: {"passkey": {length: acc}, "mqar": {...}, "chance": {probe: acc}}}
  perplexity: {label: {"buckets": [...], "ppl": [...], "overall_ppl": x, ...}}
  bench:      {"rows": [BenchRow dicts], "speedups": [...]}
  parity:     {label: parity.ParityReport dict}                 (nha-eval --parity)
A model entry may carry "training": what the nha-finetune run behind its folder trained (training_summary).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from ..errors import NHAError
from ..io import default_permissions
from .tasks import LOWER_IS_BETTER, primary_metric

RESULTS_VERSION = 1


# ---------------------------------------------------------------- files

def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) on a temporary file beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        default_permissions(tmp)  # mkstemp made it 0600; others may read a results folder, as the umask says
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_json(path: str | os.PathLike, missing: str) -> Any:
    """A JSON file's content; a missing file or bad JSON is a one-line NHAError (`missing` names the fix)."""
    p = Path(path)
    if not p.is_file():
        raise NHAError(missing)
    try:
        return json.loads(p.read_text())
    except ValueError as e:
        raise NHAError(f"{p} is not valid JSON ({e})") from None


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    res = read_json(p, f"no results file {p}; run nha-eval with --out first")
    if not isinstance(res, dict) or "models" not in res:
        raise NHAError(f"{p} is not an nha-eval results file (no 'models' key)")
    return res


def merge(into: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """Add the models of another results dict (e.g. a base evaluated earlier); labels must not clash."""
    have = {m["label"] for m in into["models"]}
    for m in other["models"]:
        if m["label"] in have:
            raise NHAError(f"model label {m['label']!r} appears in both results; rename one (--label)")
        into["models"].append(m)
    for section in ("tasks", "samples", "seconds", "recall", "perplexity"):
        into.setdefault(section, {}).update(other.get(section) or {})
    return into


# ---------------------------------------------------------------- training budget

SMOKE_TOKENS = 1_000_000  # fewer training tokens than this cannot recover a converted model: a pipeline check only
GPU_RESULTS = "docs/results.md"


def training_summary(model_dir: str | os.PathLike) -> dict[str, Any] | None:
    """What the nha-finetune run behind a model folder (<run>/model) trained, from <run>/metrics.jsonl: steps,
    tokens, steps per stage, and the budget named in its newest checkpoint. None for a folder no run wrote."""
    run = Path(model_dir).expanduser().resolve().parent
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        return None
    steps, tokens, stages = 0, 0, {}
    for line in metrics.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut short by a crash: the records before it still count
            continue
        if rec.get("event") or "step" not in rec:  # stage starts, evaluations: no training step
            continue
        steps, tokens = max(steps, rec.get("global_step", 0)), max(tokens, rec.get("tokens", 0))
        stages[rec["stage"]] = max(stages.get(rec["stage"], 0), rec["step"])
    from ..finetune.checkpoints import STATE_FILE, checkpoint_dirs

    budget = None
    for ckpt in reversed(checkpoint_dirs(run)):
        try:
            budget = json.loads((ckpt / STATE_FILE).read_text()).get("budget")
            break
        except (OSError, ValueError):
            continue
    return {"run": str(run), "budget": budget, "steps": steps, "tokens": tokens, "stages": stages}


def is_smoke(training: dict[str, Any]) -> bool:
    return training.get("budget") == "cpu" or training.get("tokens", 0) < SMOKE_TOKENS


def budget_note(results: dict[str, Any]) -> str | None:
    """One line per trained model, to stand next to its numbers: its budget, and whether they mean anything."""
    lines = []
    for m in results["models"]:
        t = m.get("training")
        if not t:
            continue
        amount = f"{t['steps']} steps, {t['tokens']:,} tokens"
        if is_smoke(t):
            name = "CPU smoke budget" if t.get("budget") == "cpu" else f"smoke budget ({t.get('budget') or 'unnamed'})"
            lines.append(f"> **`{m['label']}`: {name}: {amount}; not a quality result.** It checks the pipeline "
                         f"runs; the recovery needs the GPU recipe (`--budget gpu`): see {GPU_RESULTS}.")
        else:
            lines.append(f"> `{m['label']}`: trained with budget `{t.get('budget')}`: {amount}.")
    return "\n>\n".join(lines) or None


# ---------------------------------------------------------------- tables

def labels(results: dict[str, Any]) -> list[str]:
    return [m["label"] for m in results["models"]]


def _is_lower_better(metric: str) -> bool:
    return metric in LOWER_IS_BETTER


def task_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per task: its primary metric for each model, plus an 'average' row over the tasks all models have."""
    tasks = results.get("tasks") or {}
    names = labels(results)
    order: list[str] = []
    for lab in names:
        for t in tasks.get(lab, {}):
            if t not in order:
                order.append(t)
    rows = []
    for t in order:
        metric = primary_metric(t)
        vals = {lab: tasks.get(lab, {}).get(t, {}).get(metric) for lab in names}
        rows.append({"task": t, "metric": metric, "values": vals})
        if t.startswith("lambada"):  # perplexity is the other number papers give for LAMBADA
            ppl = {lab: tasks.get(lab, {}).get(t, {}).get("perplexity") for lab in names}
            if any(v is not None for v in ppl.values()):
                rows.append({"task": t, "metric": "perplexity", "values": ppl})
    scored = [r for r in rows if not _is_lower_better(r["metric"])]
    if len(scored) > 1:
        avg = {}
        for lab in names:
            v = [r["values"][lab] for r in scored]
            avg[lab] = sum(v) / len(v) if all(x is not None for x in v) else None
        rows.append({"task": "average", "metric": "mean", "values": avg})
    return rows


def recovered(value: float | None, ref: float | None, metric: str) -> float | None:
    """Percent of the reference score kept (for perplexity: reference / value)."""
    if value is None or ref is None or value == 0 or ref == 0:
        return None
    return 100.0 * (ref / value if _is_lower_better(metric) else value / ref)


def _f(x: Any, spec: str = ".4f") -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return str(x)
    return format(x, spec) if isinstance(x, (int, float)) else str(x)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def tasks_markdown(results: dict[str, Any]) -> str | None:
    rows = task_rows(results)
    if not rows:
        return None
    names = labels(results)
    ref = results.get("reference")
    others = [n for n in names if ref and n != ref]
    header = ["task", "metric", *names, *[f"{n} % of {ref}" for n in others]]
    body = []
    for r in rows:
        fmt = ".2f" if _is_lower_better(r["metric"]) else ".4f"
        line = [r["task"], r["metric"], *[_f(r["values"][n], fmt) for n in names]]
        line += [_f(recovered(r["values"][n], r["values"].get(ref), r["metric"]), ".1f") for n in others]
        body.append(line)
    return _md_table(header, body)


def recall_markdown(results: dict[str, Any]) -> str | None:
    rec = results.get("recall") or {}
    if not rec:
        return None
    lines = []
    for probe in ("passkey", "mqar"):
        lengths = sorted({int(L) for r in rec.values() for L in (r.get(probe) or {})})
        if not lengths:
            continue
        chance = next((r["chance"][probe] for r in rec.values() if probe in r.get("chance", {})), None)
        header = [f"{probe} (chance {_f(chance, '.3g')})", *[str(L) for L in lengths]]
        body = [[lab, *[_f(rec[lab].get(probe, {}).get(str(L)), ".2f") for L in lengths]]
                for lab in labels(results) if lab in rec]
        lines.append(_md_table(header, body))
    return "\n\n".join(lines) or None


def perplexity_markdown(results: dict[str, Any]) -> str | None:
    ppl = results.get("perplexity") or {}
    if not ppl:
        return None
    first = next(iter(ppl.values()))
    header = ["model", *[f"pos {b}" for b in first["buckets"]], "overall"]
    body = [[lab, *[_f(x, ".2f") for x in ppl[lab]["ppl"]], _f(ppl[lab]["overall_ppl"], ".2f")]
            for lab in labels(results) if lab in ppl]
    return _md_table(header, body)


BENCH_COLUMNS = [("model", "model", "s"), ("context", "context", "d"), ("batch", "batch", "d"),
                 ("prefill_s", "prefill s", ".3f"), ("prefill_tok_s", "prefill tok/s", ".0f"),
                 ("decode_tok_s", "decode tok/s", ".1f"), ("decode_ms_per_step", "ms/step", ".2f"),
                 ("state_mib_per_seq", "state MiB/seq", ".2f"), ("peak_mem_gib", "peak GiB", ".1f"),
                 ("note", "note", "s")]


def bench_headline(results: dict[str, Any]) -> str | None:
    """NHA vs base on the machine that ran the bench, in words: state per sequence and decode tokens/s, at the
    longest context where both the base model and NHA decoded at batch 1 (each at its fastest run)."""
    bench = results.get("bench") or {}
    rows = [r for r in bench.get("rows") or [] if r.get("batch") == 1 and r.get("decode_tok_s")]

    def fastest(ctx: int, model: str) -> dict[str, Any] | None:
        have = [r for r in rows if r["context"] == ctx and r["model"].startswith(model)]
        return max(have, key=lambda r: r["decode_tok_s"]) if have else None

    for ctx in sorted({r["context"] for r in rows}, reverse=True):
        base, nha = fastest(ctx, "base"), fastest(ctx, "nha")
        if base and nha:
            break
    else:
        return None
    device = (bench.get("runs") or [{}])[-1].get("device") or results.get("device") or "this machine"
    state = ""
    if base.get("state_mib_per_seq") and nha.get("state_mib_per_seq"):
        b, n = base["state_mib_per_seq"], nha["state_mib_per_seq"]
        state = f"decode state {n:.2f} MiB per sequence vs {b:.2f} MiB of KV cache ({b / n:.1f}x smaller); "
    return (f"**NHA vs the base model on this machine** ({device}, {ctx} tokens of context, batch 1): "
            f"{state}decode {nha['decode_tok_s']:.1f} tokens/s vs {base['decode_tok_s']:.1f} "
            f"({nha['decode_tok_s'] / base['decode_tok_s']:.2f}x).")


def bench_markdown(results: dict[str, Any]) -> str | None:
    bench = results.get("bench") or {}
    rows = bench.get("rows") or []
    if not rows:
        return None
    head = bench_headline(results)
    text = _md_table([c[1] for c in BENCH_COLUMNS], [[_f(r.get(k), f) for k, _, f in BENCH_COLUMNS] for r in rows])
    if head:
        text = head + "\n\n" + text
    sp = bench.get("speedups")
    if sp is None:
        from .bench import speedups

        sp = speedups(rows)
    if sp:
        text += "\n\n" + _md_table(["context", "batch", "decode NHA/base", "prefill base/NHA"],
                                   [[str(s["context"]), str(s["batch"]), _f(s["decode_x"], ".2f") + "x",
                                     _f(s["prefill_x"], ".2f") + "x"] for s in sp])
    return text


def parity_markdown(results: dict[str, Any]) -> str | None:
    par = results.get("parity") or {}
    if not par:
        return None
    body = []
    for label, rep in par.items():
        for p in rep["paths"]:
            where = "–" if p["first_divergence"] is None else \
                f"{'new token' if p['path'] == 'generate' else 'position'} {p['first_divergence']}"
            result = "ok" if p["ok"] else "**FAIL**" + (f": {p['error']}" if p["error"] else "")
            body.append([label, p["path"], _f(p["max_diff"], ".3g"), where, result])
    first = next(iter(par.values()))
    head = (f"Each path against one full forward, on {len(first['prompt_tokens'])} left-padded prompts of "
            f"{', '.join(map(str, first['prompt_tokens']))} tokens (tolerance {first['tolerance']:g}).")
    return head + "\n\n" + _md_table(["model", "path", "max logit diff", "first diverging token", "result"], body)


def markdown(results: dict[str, Any]) -> str:
    parts = ["# nha-eval report", ""]
    meta = [f"- {k}: `{results[k]}`" for k in ("command", "device", "dtype", "created") if results.get(k)]
    for m in results["models"]:
        desc = m.get("source", "")
        if m.get("nha"):
            n = m["nha"]
            desc += f" (window {n.get('window')}, slots {n.get('slots')}, sinks {n.get('sinks')}, " \
                    f"full layers {[i for i, w in enumerate(n.get('windows', [])) if w is None]})"
        if m.get("training"):
            t = m["training"]
            desc += f"; trained {t['steps']} steps on {t['tokens']:,} tokens (budget {t.get('budget')})"
        meta.append(f"- model `{m['label']}` ({m.get('kind')}): {desc}")
    parts += meta + [""]
    note = budget_note(results)
    for title, fn, noted in (("Tasks", tasks_markdown, True), ("Recall", recall_markdown, True),
                             ("Perplexity by position (held-out text)", perplexity_markdown, True),
                             ("Speed and memory", bench_markdown, False), ("Parity", parity_markdown, False)):
        body = fn(results)
        if body:
            parts += [f"## {title}", ""] + ([note, ""] if note and noted else []) + [body, ""]
    return "\n".join(parts)


# ---------------------------------------------------------------- charts

def _plt():
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
    rows = [r for r in task_rows(results) if not _is_lower_better(r["metric"])]
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
    probes = [p for p in ("passkey", "mqar") if any(r.get(p) for r in rec.values())]
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


def write_report(results: dict[str, Any], out_dir: str | os.PathLike, charts: bool = True) -> dict[str, Path]:
    """results.json, report.md and the charts that have data; returns {name: path}."""
    out = Path(out_dir)
    files: dict[str, Path] = {}
    text = json.dumps(results, indent=2, sort_keys=False, default=_json_default)
    files["json"] = atomic_write(out / "results.json", lambda p: p.write_text(text + "\n"))
    md = markdown(results)
    files["markdown"] = atomic_write(out / "report.md", lambda p: p.write_text(md))
    if charts:
        for name, fn in (("tasks", tasks_chart), ("recall", recall_chart), ("perplexity", perplexity_chart),
                         ("bench", bench_chart)):
            p = fn(results, out / f"{name}.png")
            if p is not None:
                files[name] = p
    return files


def _json_default(x: Any) -> Any:
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
