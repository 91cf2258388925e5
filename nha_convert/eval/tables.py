"""The numbers of a results dict arranged for reading: task rows with an average, percent of the reference kept.

Shared by the Markdown tables, the charts and the regression gate.
"""

from __future__ import annotations

from typing import Any

from .results import ResultsLike, as_dict
from .tasks import LOWER_IS_BETTER, primary_metric


def labels(results: ResultsLike) -> list[str]:
    results = as_dict(results)
    return [m["label"] for m in results["models"]]


def is_lower_better(metric: str) -> bool:
    return metric in LOWER_IS_BETTER


def task_rows(results: ResultsLike) -> list[dict[str, Any]]:
    """One row per task: its primary metric for each model, plus an 'average' row over the tasks all models have."""
    results = as_dict(results)
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
    scored = [r for r in rows if not is_lower_better(r["metric"])]
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
    return 100.0 * (ref / value if is_lower_better(metric) else value / ref)


def recall_probes(rec: dict[str, Any]) -> list[str]:
    """The probes of recall results in order: the registered ones first (eval/probes.py), then --recall-file's."""
    from .probes import PROBES

    found = list(dict.fromkeys(p for r in rec.values() for p in r if p != "chance"))
    return [p for p in PROBES if p in found] + [p for p in found if p not in PROBES]


def masked_recall(results: ResultsLike) -> dict[str, dict[str, Any]]:
    """{label: recall results with the slots masked} of the models run with --ablate slots."""
    results = as_dict(results)
    out = {}
    for lab, ab in (results.get("ablation") or {}).items():
        rec = (ab.get("slots") or {}).get("recall")
        if rec:
            out[lab] = rec
    return out


def recall_rows(results: ResultsLike) -> tuple[list[str], list[dict[str, Any]]]:
    """One row per probe and length: every model's score, for each model run with --ablate slots its score with the
    slots masked and what the slots carry (score - masked), and chance. (columns, rows of {probe, length, values})."""
    results = as_dict(results)
    rec = results.get("recall") or {}
    masked = masked_recall(results)
    names = [lab for lab in labels(results) if lab in rec]
    columns: list[str] = []
    for lab in names:
        columns.append(lab)
        if lab in masked:
            columns += [f"{lab} slots masked", f"{lab} slots carry"]
    columns.append("chance")
    rows = []
    for probe in recall_probes(rec):
        chance = next((r["chance"][probe] for r in rec.values() if probe in r.get("chance", {})), None)
        for length in sorted({int(L) for r in rec.values() for L in (r.get(probe) or {})}):
            key, values = str(length), {"chance": chance}
            for lab in names:
                v = rec[lab].get(probe, {}).get(key)
                values[lab] = v
                if lab in masked:
                    m = masked[lab].get(probe, {}).get(key)
                    values[f"{lab} slots masked"] = m
                    values[f"{lab} slots carry"] = None if v is None or m is None else v - m
            rows.append({"probe": probe, "length": length, "values": values})
    return columns, rows
