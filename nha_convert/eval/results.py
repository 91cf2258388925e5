"""Typed results of one nha-eval run, and their JSON form (results.json).

On disk (format version 1, the shape every nha-eval has written):
  version:    1 (absent in files that predate the key: read as 1)
  created, command, device, dtype: what ran where
  settings:   {"tasks", "limit", "num_fewshot", "batch_size", "mmlu_split", "seed", "data"}
  models:     [{"label", "source", "kind": "base" | "nha" | "swa-sinks" | "random", "nha": {...} | None,
                "training": training.training_summary(...)}]       (training only for an nha-finetune folder)
  reference:  label of the model others are compared against (percent of its score recovered), or None
  subject:    label of the model under test (the gate's default), or None
  tasks:      {label: {task: {metric: value}}}          (lm-eval; groups such as mmlu included)
  samples:    {label: {task: documents}};  seconds: {label: seconds}
  recall:     {label: {"passkey": {length: acc}, "mqar": {...}, "chance": {probe: acc}}}
  perplexity: {label: {"buckets": [...], "ppl": [...], "overall_ppl": x, "text", "seq_len", "sequences"}}
  bench:      {"rows": [bench.BenchRow dicts], "speedups": [...], "runs": [...]}
  parity:     {label: parity.ParityReport dict}                 (nha-eval --parity)
  ablation:   {label: {"slots": {"recall": {...as recall[label]}, "perplexity": {...}}}}   (--ablate slots: the
              same NHA model with its slot path masked, i.e. as its own sliding window)
Keys this code does not know ride along in `extra` and are written back, so an older nha-eval re-rendering a newer
file keeps what it cannot read. Bump RESULTS_VERSION when a key changes meaning, and keep reading the old shape.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar, Union

from ..errors import NHAError
from .files import json_default, read_json

RESULTS_VERSION = 1

OMIT_NONE = {"omit_none": True}  # field metadata: the key is absent from the JSON while the value is None

TaskScores = dict[str, dict[str, dict[str, float]]]  # label -> task -> metric -> value
RecallScores = dict[str, dict[str, dict[str, float]]]  # label -> probe -> length -> accuracy; "chance" -> probe


def _dump(value: Any) -> Any:
    """The JSON form of a field: records by their to_dict, containers copied (the caller may edit the result)."""
    if isinstance(value, _Record):
        return value.to_dict()
    if isinstance(value, list):
        return [_dump(v) for v in value]
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    return value


@dataclass(kw_only=True)
class _Record:
    """A JSON object as a dataclass: known keys are fields (in the file's key order), unknown ones go to `extra`."""

    extra: dict[str, Any] = field(default_factory=dict)

    # field name -> JSON key, where they differ; field name -> how to build it from its JSON value
    _KEYS: ClassVar[dict[str, str]] = {}
    _READ: ClassVar[dict[str, Callable[[Any], Any]]] = {}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        if not isinstance(data, dict):
            raise TypeError(f"{cls.__name__} needs a JSON object, got {type(data).__name__}")
        kwargs: dict[str, Any] = {}
        known = set()
        for f in fields(cls):
            key = cls._KEYS.get(f.name, f.name)
            if f.name == "extra" or key not in data:
                continue
            known.add(key)
            value = data[key]
            read = cls._READ.get(f.name)
            kwargs[f.name] = read(value) if read is not None and value is not None else value
        return cls(**kwargs, extra={k: v for k, v in data.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or (value is None and f.metadata.get("omit_none")):
                continue
            out[self._KEYS.get(f.name, f.name)] = _dump(value)
        out.update(_dump(self.extra))
        return out


@dataclass(kw_only=True)
class ModelEntry(_Record):
    """One evaluated model (eval.models.Loaded.info(), plus the training behind an nha-finetune folder)."""

    label: str
    source: str | None = field(default=None, metadata=OMIT_NONE)
    kind: str | None = field(default=None, metadata=OMIT_NONE)  # base | nha | swa-sinks | random
    nha: dict[str, Any] | None = None  # config.nha of a converted model
    training: dict[str, Any] | None = field(default=None, metadata=OMIT_NONE)  # training.training_summary()


@dataclass(kw_only=True)
class EvalSettings(_Record):
    """How lm-eval ran (the same for every model of the run)."""

    tasks: list[str] = field(default_factory=list)
    limit: float | None = None
    num_fewshot: int | None = None
    batch_size: int | str = 16
    mmlu_split: str = "validation"
    seed: int = 1234
    data: str | None = field(default=None, metadata=OMIT_NONE)  # known once lm-eval ran: offline / online copies


@dataclass(kw_only=True)
class PerplexityResult(_Record):
    """perplexity.perplexity_by_position(): perplexity per bucket of token positions, and over all of them."""

    text: str | None = field(default=None, metadata=OMIT_NONE)  # which held-out text
    seq_len: int | None = field(default=None, metadata=OMIT_NONE)
    sequences: int | None = field(default=None, metadata=OMIT_NONE)
    buckets: list[str]
    ppl: list[float]
    overall_ppl: float


@dataclass(kw_only=True)
class BenchResults(_Record):
    """Speed and memory rows (bench.BenchRow dicts), the NHA / base ratios, and what each bench run measured."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    speedups: list[dict[str, Any]] | None = field(default=None, metadata=OMIT_NONE)  # None: computed when shown
    runs: list[dict[str, Any]] | None = field(default=None, metadata=OMIT_NONE)


@dataclass(kw_only=True)
class EvalResults(_Record):
    """Everything one nha-eval run measured; `to_dict()` is the results.json object."""

    format_version: int = RESULTS_VERSION
    created: str | None = field(default=None, metadata=OMIT_NONE)
    command: str | None = field(default=None, metadata=OMIT_NONE)
    device: str | None = field(default=None, metadata=OMIT_NONE)
    dtype: str | None = field(default=None, metadata=OMIT_NONE)
    settings: EvalSettings | None = field(default=None, metadata=OMIT_NONE)
    models: list[ModelEntry] = field(default_factory=list)
    reference: str | None = None
    tasks: TaskScores = field(default_factory=dict)
    samples: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    recall: RecallScores = field(default_factory=dict)
    perplexity: dict[str, PerplexityResult] = field(default_factory=dict)
    subject: str | None = None
    bench: BenchResults | None = field(default=None, metadata=OMIT_NONE)
    parity: dict[str, dict[str, Any]] | None = field(default=None, metadata=OMIT_NONE)
    ablation: dict[str, dict[str, Any]] | None = field(default=None, metadata=OMIT_NONE)

    _KEYS: ClassVar[dict[str, str]] = {"format_version": "version"}
    _READ: ClassVar[dict[str, Callable[[Any], Any]]] = {
        "settings": EvalSettings.from_dict,
        "models": lambda ms: [ModelEntry.from_dict(m) for m in ms],
        "perplexity": lambda ps: {lab: PerplexityResult.from_dict(p) for lab, p in ps.items()},
        "bench": BenchResults.from_dict,
    }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalResults:
        # A copy: the object must not share (and later edit) the caller's nested dicts.
        return super().from_dict(copy.deepcopy(data))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False, default=json_default)

    @classmethod
    def from_json(cls, text: str) -> EvalResults:
        return cls.from_dict(json.loads(text))

    def labels(self) -> list[str]:
        return [m.label for m in self.models]

    def merge(self, other: EvalResults) -> EvalResults:
        """Add the models of another run (e.g. a base evaluated earlier); labels must not clash."""
        have = set(self.labels())
        for m in other.models:
            if m.label in have:
                raise NHAError(f"model label {m.label!r} appears in both results; rename one (--label)")
            self.models.append(m)
        for section in ("tasks", "samples", "seconds", "recall", "perplexity"):
            getattr(self, section).update(getattr(other, section))
        if other.ablation:
            self.ablation = {**(self.ablation or {}), **other.ablation}
        return self


ResultsLike = Union[EvalResults, dict[str, Any]]


def as_dict(results: ResultsLike) -> dict[str, Any]:
    """The plain JSON-shaped dict the renderers read (they also take hand-written dicts, as the tests do)."""
    return results.to_dict() if isinstance(results, EvalResults) else results


def results_from_dict(data: Any, where: str = "the results") -> EvalResults:
    """An EvalResults from a results.json object, or a one-line NHAError naming what is wrong."""
    if not isinstance(data, dict) or "models" not in data:
        raise NHAError(f"{where} is not an nha-eval results file (no 'models' key)")
    try:
        return EvalResults.from_dict(data)
    except (TypeError, ValueError, AttributeError) as e:
        raise NHAError(f"{where} is not an nha-eval results file ({e})") from None


def load_results(path: Any) -> EvalResults:
    """results.json of an earlier run (any version this code reads)."""
    data = read_json(path, f"no results file {path}; run nha-eval with --out first")
    return results_from_dict(data, str(path))


def merge(into: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """merge() on plain dicts: `into` becomes the merged results.json object."""
    merged = EvalResults.from_dict(into).merge(EvalResults.from_dict(other)).to_dict()
    into.clear()
    into.update(merged)
    return into
