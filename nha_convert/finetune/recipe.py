"""The `nha-finetune` recipe: a YAML file validated into pydantic models (schema.py), every error naming the field
and its line.

A recipe names the model (a base model plus conversion settings, or an already converted folder), the teacher
(a frozen copy of the base model by default), the data, the output folder and a list of stages. `budgets` holds
named sets of per-stage overrides (e.g. a tiny `cpu` budget and a `gpu` budget), chosen with `--budget`;
`--set a.b=c` overrides any single field. See docs/recipes.md for the full field list.

Budgets and `--set` edit the YAML tree before validation, and every key of that tree remembers where it came from
(a file line or the `--set` item), so pydantic's error locations map back to `file:line` (`_explain`).
"""

from __future__ import annotations

import difflib
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import NHAError
from .schema import (AMOUNTS, PROBE_KINDS, STAGE_KINDS, TRAINABLES, DataSpec, LoraSpec, ModelSpec, OutputSpec,
                     ProbeSpec, Recipe, StageSpec, TeacherSpec, stage_name)
from .sources import SourceSpec
from .spec import SYNONYMS, RuleError, suggest, yaml_number

__all__ = ["AMOUNTS", "PROBE_KINDS", "STAGE_KINDS", "SYNONYMS", "TRAINABLES", "DataSpec", "LoraSpec", "ModelSpec",
           "OutputSpec", "ProbeSpec", "Recipe", "SourceSpec", "StageSpec", "TeacherSpec", "parse_recipe",
           "read_recipe", "stage_name", "default_budget", "set_field", "load_yaml"]


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
    try:
        recipe = Recipe.model_validate(tree)
    except ValidationError as e:
        raise NHAError(_explain(e.errors()[0], tree)) from None
    recipe._source, recipe._budget = source, budget  # private attributes: settable on every pydantic 2.x
    return recipe


def read_recipe(path: str | Path, budget: str | None = "auto", overrides: list[str] | None = None) -> Recipe:
    p = Path(path)
    if not p.is_file():
        raise NHAError(f"recipe {p} not found; see recipes/ for examples (e.g. recipes/smollm2-135m.yaml)")
    return parse_recipe(p.read_text(), str(p), budget, overrides)


# --- pydantic errors -> one `file:line: message` line ----------------------------------------------


def _where(tree: Any, loc: tuple) -> str:
    """The deepest place along `loc` the tree knows: a key's line, else its mapping's (for a missing key)."""
    node, where = tree, getattr(tree, "where", "?")
    for key in loc:
        try:
            where = node.at(key)
            node = node[key]
        except (KeyError, IndexError, AttributeError, TypeError):
            break
    return where


def _path(loc: tuple) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in loc).lstrip(".")


def _unwrap(tp: Any) -> Any:
    """Annotated[X, ...] -> X; Optional[X] -> X (a null is never the problem in a type error)."""
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _tagged(tp: Any) -> dict[str, Any]:
    """{kind: class} of a union of models told apart by a one-value `kind` literal (the data sources), else {}."""
    if get_origin(tp) not in (Union, types.UnionType):
        return {}
    out = {}
    for member in get_args(tp):
        kind = getattr(member, "model_fields", {}).get("kind")
        if kind is None or get_origin(kind.annotation) is not Literal or len(get_args(kind.annotation)) != 1:
            return {}
        out[get_args(kind.annotation)[0]] = member
    return out


def _walk(loc: tuple) -> tuple[tuple, Any]:
    """(loc without the tags pydantic puts in it after a discriminated union, the schema type at loc: Recipe at
    ()), following model fields, list items, dict values and union tags."""
    tp: Any = Recipe
    clean = []
    for key in loc:
        tp = _unwrap(tp)
        tagged = _tagged(tp)
        if key in tagged:  # a tag, not a field: the member class it chose
            tp = tagged[key]
            continue
        clean.append(key)
        if isinstance(tp, type) and issubclass(tp, BaseModel) and key in tp.model_fields:
            tp = tp.model_fields[key].annotation
        elif get_origin(tp) in (list, dict):
            tp = get_args(tp)[-1]
        else:
            tp = None
    return tuple(clean), _unwrap(tp)


def _annotation(loc: tuple) -> Any:
    return _walk(loc)[1]


def _type_name(tp: Any) -> str:
    tp = _unwrap(tp)
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if origin is dict or (isinstance(tp, type) and issubclass(tp, (BaseModel, dict))) or _tagged(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _shown(value: Any) -> str:
    # a YAML 1.1 number string ('1e-3') is shown as the number it was written as
    return value if isinstance(value, str) and yaml_number(value) is not value else repr(value)


_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="), "less_than": ("lt", "<"),
           "less_than_equal": ("le", "<=")}


def _explain(err: dict, tree: Any) -> str:
    """One pydantic error as `where: message`, the message naming the field path and what it should be."""
    raw, kind, value = tuple(err["loc"]), err["type"], err.get("input")
    loc = _walk(raw)[0]
    path = _path(loc)
    exc = err.get("ctx", {}).get("error")
    if isinstance(exc, RuleError):
        full = loc + exc.loc
        label = _path(full) if exc.label is None else exc.label
        return f"{_where(tree, full)}: {label + ': ' if label else ''}{exc}"
    where = _where(tree, loc)
    if kind == "extra_forbidden":
        model = _annotation(raw[:-1])
        stray = getattr(model, "stray_field", lambda key: None)(loc[-1])  # a field of another kind of source
        if stray:
            return f"{where}: {path}: {stray}"
        known = list(getattr(model, "own_fields", lambda: model.model_fields)()) if isinstance(model, type) else []
        return f"{where}: unknown field {path!r}; {suggest(loc[-1], known)}known fields here: {', '.join(known)}"
    if kind in ("missing", "union_tag_not_found"):
        missing = path if kind == "missing" else _path(loc + ("kind",))
        return f"{where}: missing field {missing!r}"
    if kind in ("literal_error", "union_tag_invalid"):
        if kind == "union_tag_invalid":  # an unknown source kind: the choices are the union's tags
            where, path, value = _where(tree, loc + ("kind",)), _path(loc + ("kind",)), err["ctx"]["tag"]
            choices = list(_tagged(_annotation(raw)))
        else:
            choices = list(get_args(_annotation(raw)))
        close = difflib.get_close_matches(str(value), [str(a) for a in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{where}: {path} must be one of {' | '.join(repr(a) for a in choices)}, got {value!r}{hint}"
    if kind in _BOUNDS:
        key, op = _BOUNDS[kind]
        return f"{where}: {path} must be {op} {err['ctx'][key]:g}, got {_shown(value)}"
    if kind == "too_short":
        return f"{where}: {path} is empty"
    if kind.endswith("_type") or kind.endswith("_parsing") or kind == "int_from_float":
        return f"{where}: {path} must be {_type_name(_annotation(raw))}, got {value!r}"
    return f"{where}: {path}: {err['msg']}"
