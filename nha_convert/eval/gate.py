"""Regression gate: compare a run's metrics with expected values and name every metric that fell.

expected.json:
  {"model": "<label>",                  # optional: which model of the run to check (default: the first)
   "tolerance": 0.01,                   # optional: default tolerance (the CLI's --tolerance wins if given)
   "metrics": {"piqa/acc": 0.64,        # a plain number, or
               "lambada_openai/perplexity": {"value": 30.1, "tolerance": 0.05}}}

Higher-is-better metrics fail when value < expected - tolerance (absolute). Lower-is-better ones (perplexity,
latency, memory) fail when value > expected * (1 + tolerance) (relative: perplexities have no fixed scale).
A NaN or infinite value fails whatever its direction (`nan > limit` is False: a plain comparison would pass it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import NHAError
from .report import read_json, task_rows
from .tasks import LOWER_IS_BETTER


@dataclass
class Failure:
    metric: str
    value: float | None
    expected: float
    tolerance: float
    lower_is_better: bool

    def __str__(self) -> str:
        if self.value is None:
            return f"{self.metric}: missing from the results (expected {self.expected:.4g})"
        if not math.isfinite(self.value):
            return f"{self.metric}: {self.value} is not a finite number (expected {self.expected:.4g})"
        if self.lower_is_better:
            limit = self.expected * (1 + self.tolerance)
            return (f"{self.metric}: {self.value:.4g} > {limit:.4g} (expected {self.expected:.4g}, "
                    f"+{self.tolerance:.1%} allowed)")
        return (f"{self.metric}: {self.value:.4g} < {self.expected - self.tolerance:.4g} "
                f"(expected {self.expected:.4g}, tolerance {self.tolerance:g})")


def lower_is_better(key: str) -> bool:
    parts = key.split("/")
    return parts[-1] in LOWER_IS_BETTER or parts[0] == "perplexity"


def flatten(results: dict[str, Any], label: str | None = None) -> dict[str, float]:
    """All numbers of one model as 'task/metric', 'average', 'recall/<probe>/<length>', 'perplexity/<bucket>'."""
    names = [m["label"] for m in results["models"]]
    if not names:
        raise NHAError("the results hold no models")
    label = label or results.get("subject") or names[0]
    if label not in names:
        raise NHAError(f"no model {label!r} in the results; they hold {', '.join(names)}")
    flat: dict[str, float] = {}
    for task, metrics in (results.get("tasks") or {}).get(label, {}).items():
        for metric, value in metrics.items():
            flat[f"{task}/{metric}"] = value
    for row in task_rows(results):
        if row["task"] == "average" and row["values"].get(label) is not None:
            flat["average"] = row["values"][label]
    rec = (results.get("recall") or {}).get(label, {})
    for probe, by_len in rec.items():
        if probe != "chance":
            for length, acc in by_len.items():
                flat[f"recall/{probe}/{length}"] = acc
    ppl = (results.get("perplexity") or {}).get(label)
    if ppl:
        for bucket, v in zip(ppl["buckets"], ppl["ppl"]):
            flat[f"perplexity/{bucket}"] = v
        flat["perplexity/overall"] = ppl["overall_ppl"]
    return flat


def load_expected(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    exp = read_json(p, f"no expected-values file {p}; write one with --write-expected")
    if not isinstance(exp, dict) or not isinstance(exp.get("metrics"), dict) or not exp["metrics"]:
        raise NHAError(f"{p} needs a non-empty 'metrics' object, e.g. {{\"metrics\": {{\"piqa/acc\": 0.64}}}}")
    return exp


def check(results: dict[str, Any], expected: dict[str, Any], tolerance: float | None = None) -> list[Failure]:
    """Every expected metric that fell by more than its tolerance (or is missing)."""
    tol_default = tolerance if tolerance is not None else float(expected.get("tolerance", 0.01))
    flat = flatten(results, expected.get("model"))
    failures = []
    for key, spec in expected["metrics"].items():
        want, tol = (float(spec["value"]), float(spec.get("tolerance", tol_default))) if isinstance(spec, dict) \
            else (float(spec), tol_default)
        got = flat.get(key)
        low = lower_is_better(key)
        if got is None:
            failures.append(Failure(key, None, want, tol, low))
        elif not math.isfinite(got) or ((got > want * (1 + tol)) if low else (got < want - tol)):
            failures.append(Failure(key, got, want, tol, low))
    return failures


def expected_from(results: dict[str, Any], label: str | None = None, tolerance: float = 0.01,
                  keys: list[str] | None = None) -> dict[str, Any]:
    """An expected-values file from a run (the CI baseline): its primary metrics, or the keys given."""
    flat = flatten(results, label)
    if keys is None:
        from .tasks import primary_metric

        keys = [k for k in flat if "/" in k and k.split("/", 1)[1] == primary_metric(k.split("/", 1)[0])]
        keys += [k for k in flat if k == "average" or k.startswith(("recall/", "perplexity/overall"))]
        if not keys:
            keys = list(flat)
    bad = [k for k in keys if isinstance(flat.get(k), float) and not math.isfinite(flat[k])]
    if bad:
        raise NHAError(f"cannot write expected values from a run whose metrics are not finite numbers "
                       f"({', '.join(f'{k} = {flat[k]}' for k in bad)}); fix the model and run again")
    return {"model": label or results.get("subject") or results["models"][0]["label"], "tolerance": tolerance,
            "metrics": {k: flat[k] for k in keys if k in flat}}
