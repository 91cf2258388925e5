"""The recipe schema: pydantic models, one per recipe section, with the constraints and rules that make a recipe valid.

Loading (YAML with line numbers, budgets, `--set`) and turning pydantic's errors into one `file:line: message` line
live in recipe.py; here each model only says what it accepts (the base class, number types and `RuleError` in
spec.py; the data sources, one class per kind, in sources.py). Kinds are declared once: the stage kinds are the
keys of objectives.OBJECTIVES, the probe kinds those of corpora.synthetic.PROBES plus retrieval.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

from pydantic import Field, PrivateAttr, model_validator

from ..corpora.natural import TEACHER_FORCED
from ..corpora.synthetic import PROBES
from ..errors import NHAError
from ..settings import NHASettings
from .objectives import OBJECTIVES
from .sources import AnySource, SourceSpec
from .spec import Int, Num, Positive, RuleError, Spec, suggest

AMOUNTS = ("steps", "tokens", "minutes")
STAGE_KINDS = tuple(sorted(OBJECTIVES))  # one objective class per stage kind (objectives.py)
TRAINABLES = ("gates", "lora", "attention", "all_but_mlp")
PROBE_KINDS = (*PROBES, "retrieval")  # the built-in recall items, and the held-out retrieval documents
# what `probe.probes` may list: those, and the natural probes graded under teacher forcing (finetune/probe.py)
PROBE_CHOICES = (*PROBE_KINDS, *TEACHER_FORCED)


class ModelSpec(Spec):
    """base: a name, alias, folder or hub id (null = the embedded SmolLM2-135M-Instruct);
    converted: an already converted NHA folder (instead of base + nha);
    nha: NHASettings fields for the conversion (null = train the base model unconverted);
    dtype: weights of the student (float32 = fp32 master weights; bfloat16 keeps frozen weights in bf16 and
    trains the trainable ones in fp32, for 7-8B models; it needs bf16: true in every stage);
    calibration: options of `nha.full_layers: auto:K` (layer_selection.select_full_layers: seq_len, text_seqs,
    retrieval_docs, batch_size), e.g. a small set for a CPU smoke run."""

    base: Optional[str] = None
    converted: Optional[str] = None
    # a plain dict (not NHASettings): callers read back only the keys the recipe gave, the rest stay defaults
    nha: Optional[dict] = Field(default_factory=dict)
    dtype: Literal["float32", "bfloat16"] = "float32"
    calibration: Optional[dict] = None

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.converted is not None and self.base is not None:
            raise RuleError("give either model.base (+ model.nha) or model.converted, not both", "converted", label="")
        if self.nha is not None and self.converted is None:
            known = sorted(f.name for f in dataclasses.fields(NHASettings))
            for key in self.nha:
                if key not in known:
                    raise RuleError(f"unknown field 'model.nha.{key}'; {suggest(key, known)}known: {', '.join(known)}",
                                    "nha", key, label="")
            try:
                NHASettings(**self.nha).validate(num_layers=10**6)  # layer indices are checked at conversion
            except (TypeError, NHAError) as e:
                raise RuleError(str(e), "nha") from None
        return self


class TeacherSpec(Spec):
    """model: "base" (a frozen copy of the base model, before conversion), a name/folder, or null (no teacher).
    dtype: "auto" = bfloat16 on GPU, float32 on CPU."""

    model: Optional[str] = "base"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"


class ProbeSpec(Spec):
    """The recall probe at the end of every stage (finetune/probe.py), logged to metrics.jsonl as event "recall":
    passkey and MQAR (corpora/synthetic.py) at each of `lengths`, and the held-out split of the retrieval documents,
    `items` items each."""

    lengths: list[Positive] = Field(default_factory=lambda: [1024, 2048], min_length=1)
    items: Positive = 8
    probes: list[Literal[PROBE_CHOICES]] = Field(default_factory=lambda: list(PROBE_KINDS))


class DataSpec(Spec):
    """held_out: fraction of documents kept out of training for the validation loss (when there are fewer
    documents than 1/held_out, the last held_out fraction of every document's tokens instead).
    min_chunk: shortest document piece kept as a training row (in tokens).
    pack: several pieces per row (true, the default: almost no padding); false puts each piece in its own row, padded
    to seq_len: the layout before packing, kept to compare the loss at the same tokens (docs/performance.md)."""

    sources: list[AnySource] = Field(default_factory=lambda: [SourceSpec(kind="shakespeare")], min_length=1)
    held_out: Num = Field(0.05, gt=0, lt=1)
    min_chunk: Positive = 32
    pack: bool = True


class LoraSpec(Spec):
    r: Positive = 16
    alpha: Num = 32.0
    dropout: Num = Field(0.0, ge=0, lt=1)
    targets: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class WindowDropoutSpec(Spec):
    """A share of the windowed layers, drawn anew each step, trains with a short window (finetune/windows.py)."""

    share: Num = Field(gt=0, le=1)
    window: Int = Field(0, ge=0)


class StageSpec(Spec):
    """One training stage. gate_lr: learning rate of the NHA gates (default: lr); new weights usually want a
    larger one than LoRA adapters. Exactly one of steps / tokens / minutes: tokens = sequence slots seen (seq_len x
    global batch per step); minutes = a time budget, turned into a step count after timing steps 2-5 (the count is
    stored in checkpoints, so a resumed run keeps it). Setting one of the three in a budget or with --set clears
    the others. max_minutes stops a stage early without changing its schedule (a safety cap). batch_size is per
    device and micro-step; the global batch is batch_size x grad_accum x devices. windows: train each step with a
    window drawn from this list in every windowed NHA layer (finetune/windows.py); evaluation keeps the model's.
    window_dropout: each step, each windowed layer alone runs with the short window `window` (0 = slots and sinks only)
    with probability `share`, so that in those layers only the slots can supply what lies further back.

    Rules that need the rest of the recipe (the amount, the teacher, the kind-specific fields) are checked by
    Recipe, so that a stage built alone in code or tests may leave its amount unset."""

    kind: Literal[STAGE_KINDS]
    name: Optional[str] = None
    trains: Literal[TRAINABLES] = "gates"
    lora: LoraSpec = Field(default_factory=LoraSpec)
    lr: Num = Field(1e-3, gt=0)
    gate_lr: Optional[Num] = Field(None, gt=0)
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: Int = Field(0, ge=0)
    min_lr_ratio: Num = Field(0.1, ge=0, le=1)
    weight_decay: Num = 0.0
    max_grad_norm: Optional[Num] = 1.0
    steps: Optional[Positive] = None
    tokens: Optional[Positive] = None
    minutes: Optional[Num] = Field(None, gt=0)
    batch_size: Positive = 8
    grad_accum: Positive = 1
    seq_len: Positive = 512
    bf16: bool = False
    gradient_checkpointing: bool = False
    temperature: Num = Field(1.0, gt=0)
    ce_weight: Num = Field(0.0, ge=0, le=1)
    loss_chunk: Positive = 1024
    eval_every: Optional[Int] = None
    eval_rows: Positive = 32
    max_minutes: Optional[Num] = Field(None, gt=0)
    windows: Optional[list[Positive]] = Field(None, min_length=1)
    window_dropout: Optional[WindowDropoutSpec] = None


class OutputSpec(Spec):
    """dir: the run folder (checkpoints/, metrics.jsonl, and the final HF folder model/).
    checkpoint_every: optimizer steps between checkpoints (0 = only at stage ends and on Ctrl-C)."""

    dir: str = "out/finetune"
    checkpoint_every: Int = Field(100, ge=0)
    keep_checkpoints: Int = Field(2, ge=1)
    log_every: Positive = 10


class Recipe(Spec):
    model: ModelSpec = Field(default_factory=ModelSpec)
    teacher: TeacherSpec = Field(default_factory=TeacherSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    stages: list[StageSpec] = Field(default_factory=list)
    output: OutputSpec = Field(default_factory=OutputSpec)
    probe: Optional[ProbeSpec] = None
    seed: Int = 0
    # applied to the YAML tree before validation (recipe.py), kept here so a recipe can be inspected
    budgets: dict[str, Optional[dict]] = Field(default_factory=dict)
    # set by the loader, not by the recipe: private attributes are no fields, so `source:` in a recipe is unknown
    _source: str = PrivateAttr("<recipe>")
    _budget: Optional[str] = PrivateAttr(None)

    @property
    def source(self) -> str:
        return self._source

    @source.setter
    def source(self, value: str) -> None:
        self._source = value

    @property
    def budget(self) -> str | None:
        return self._budget

    @budget.setter
    def budget(self, value: str | None) -> None:
        self._budget = value

    def nha_settings(self) -> NHASettings | None:
        return None if self.model.nha is None else NHASettings(**self.model.nha)

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        if not self.stages:
            raise RuleError("the recipe has no stages; add e.g. `stages: [{kind: finetune, steps: 100}]`", label="")
        names = [stage_name(s) for s in self.stages]
        for i, s in enumerate(self.stages):
            label = f"stages[{i}] ({names[i]})"
            problem = self._stage_problem(s, names)
            if problem:
                raise RuleError(problem, "stages", i, label=label)
        longest = max(s.seq_len for s in self.stages)
        for i, src in enumerate(self.data.sources):
            if src.kind == "teacher" and self.teacher.model is None:
                raise RuleError("teacher-sampled text needs a teacher (teacher.model)", "data", "sources", i)
            if src.kind == "retrieval" and src.max_tokens > longest:
                raise RuleError(f"retrieval documents of up to {src.max_tokens} tokens are longer than every "
                                f"stage's seq_len ({longest}), so rows would cut questions from their facts; "
                                "lower max_tokens", "data", "sources", i)
        return self

    def _stage_problem(self, s: StageSpec, names: list[str]) -> str | None:
        """What is wrong with stage `s` in this recipe, or None."""
        name, m = stage_name(s), self.model
        if names.count(name) > 1:
            return f"two stages are named {name!r}; give each a distinct `name`"
        if sum(getattr(s, a) is not None for a in AMOUNTS) != 1:
            return "give exactly one of steps, tokens or minutes"
        if s.kind != "distill" and (s.temperature != 1.0 or s.ce_weight != 0.0):
            return "temperature and ce_weight only apply to distill stages"
        if s.kind in ("attention_transfer", "distill") and self.teacher.model is None:
            return f"a {s.kind} stage needs a teacher; set teacher.model (e.g. base)"
        if s.kind == "attention_transfer" and s.trains == "all_but_mlp":
            return "attention_transfer only trains attention; use trains: gates, lora or attention"
        if s.trains == "gates" and m.nha is None and m.converted is None:
            return "trains: gates needs an NHA model (model.nha or model.converted)"
        if m.dtype == "bfloat16" and not s.bf16:
            return "model.dtype bfloat16 needs bf16: true in every stage"
        return None


def stage_name(stage: StageSpec) -> str:
    return stage.name or stage.kind
