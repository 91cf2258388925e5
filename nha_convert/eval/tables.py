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
    """The probes of recall results in order: the built-in ones first, then --recall-file's."""
    found = list(dict.fromkeys(p for r in rec.values() for p in r if p != "chance"))
    return [p for p in ("passkey", "mqar") if p in found] + [p for p in found if p not in ("passkey", "mqar")]
