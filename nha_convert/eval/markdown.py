"""report.md: the results of one run as Markdown tables, with the notes that qualify them."""

from __future__ import annotations

import math
from typing import Any

from .results import ResultsLike, as_dict
from .tables import is_lower_better, labels, masked_recall, recall_probes, recall_rows, recovered, task_rows
from .training import GPU_RESULTS, is_smoke


def budget_note(results: ResultsLike) -> str | None:
    """One line per trained model, to stand next to its numbers: its budget, and whether they mean anything."""
    results = as_dict(results)
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


def _f(x: Any, spec: str = ".4f") -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return f"**{x}**"  # a broken model's number: marked, never formatted as if it were one
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
        fmt = ".2f" if is_lower_better(r["metric"]) else ".4f"
        line = [r["task"], r["metric"], *[_f(r["values"][n], fmt) for n in names]]
        line += [_f(recovered(r["values"][n], r["values"].get(ref), r["metric"]), ".1f") for n in others]
        body.append(line)
    return _md_table(header, body)


def recall_markdown(results: dict[str, Any]) -> str | None:
    rec = results.get("recall") or {}
    if not rec:
        return None
    from .probes import NATURAL

    masked = masked_recall(results)
    natural = any(p in NATURAL for p in recall_probes(rec))
    lines = [recall_summary_markdown(results)] if masked or natural else []  # passkey / MQAR alone: as before
    for probe in recall_probes(rec):
        lengths = sorted({int(L) for r in rec.values() for L in (r.get(probe) or {})})
        if not lengths:
            continue
        chance = next((r["chance"][probe] for r in rec.values() if probe in r.get("chance", {})), None)
        title = f"{probe} (chance {_f(chance, '.3g')})" if chance is not None else f"{probe} (tokens up to)"
        header = [title, *[str(L) for L in lengths]]
        body = []
        for lab in labels(results):
            if lab not in rec:
                continue
            body.append([lab, *[_f(rec[lab].get(probe, {}).get(str(L)), ".2f") for L in lengths]])
            if lab in masked:  # --ablate slots: the same model as its sliding window, and what the slots carry
                m = [masked[lab].get(probe, {}).get(str(L)) for L in lengths]
                v = [rec[lab].get(probe, {}).get(str(L)) for L in lengths]
                body.append([f"{lab}, slots masked", *[_f(x, ".2f") for x in m]])
                body.append([f"{lab}, slots carry", *[_f(None if a is None or b is None else a - b, "+.2f")
                                                      for a, b in zip(v, m)]])
        lines.append(_md_table(header, body))
    return "\n\n".join(x for x in lines if x) or None


def recall_summary_markdown(results: dict[str, Any]) -> str | None:
    """Every probe and length in one table: the models, 'slots masked' and 'slots carry' next to each model run with
    --ablate slots, and chance (the sliding-window baseline is one of the models when --baseline gave it)."""
    columns, rows = recall_rows(results)
    if not rows:
        return None
    body = [[r["probe"], str(r["length"]),
             *[_f(r["values"].get(c), "+.2f" if c.endswith("slots carry") else ".3g" if c == "chance" else ".2f")
               for c in columns]] for r in rows]
    return _md_table(["probe", "tokens", *columns], body)


def perplexity_markdown(results: dict[str, Any]) -> str | None:
    ppl = results.get("perplexity") or {}
    if not ppl:
        return None
    first = next(iter(ppl.values()))
    header = ["model", *[f"pos {b}" for b in first["buckets"]], "overall"]
    body = [[lab, *[_f(x, ".2f") for x in ppl[lab]["ppl"]], _f(ppl[lab]["overall_ppl"], ".2f")]
            for lab in labels(results) if lab in ppl]
    for lab, ab in (results.get("ablation") or {}).items():  # --ablate slots
        m = (ab.get("slots") or {}).get("perplexity")
        if m:
            body.append([f"{lab}, slots masked", *[_f(x, ".2f") for x in m["ppl"]], _f(m["overall_ppl"], ".2f")])
    return _md_table(header, body)


BENCH_COLUMNS = [("model", "model", "s"), ("context", "context", "d"), ("batch", "batch", "d"),
                 ("prefill_s", "prefill s", ".3f"), ("prefill_tok_s", "prefill tok/s", ".0f"),
                 ("decode_tok_s", "decode tok/s", ".1f"), ("decode_ms_per_step", "ms/step", ".2f"),
                 ("state_mib_per_seq", "state MiB/seq", ".2f"), ("peak_mem_gib", "peak GiB", ".1f"),
                 ("note", "note", "s")]


def bench_headline(results: ResultsLike) -> str | None:
    """NHA vs base on the machine that ran the bench, in words: state per sequence and decode tokens/s, at the
    longest context where both the base model and NHA decoded at batch 1 (each at its fastest run)."""
    results = as_dict(results)
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


def markdown(results: ResultsLike) -> str:
    results = as_dict(results)
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
