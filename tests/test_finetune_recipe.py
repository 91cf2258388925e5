"""Recipe schema: unknown or mistyped fields fail naming the field and its YAML line; budgets and --set."""

from __future__ import annotations

from pathlib import Path

import pytest

from nha_convert.errors import NHAError
from nha_convert.finetune.recipe import parse_recipe, read_recipe

RECIPES = sorted(p for p in (Path(__file__).parent.parent / "recipes").glob("*.yaml")
                 if not p.name.startswith("accelerate-"))

GOOD = """\
model:
  base: null
  nha: {window: 64, slots: 64}
data:
  sources:
    - kind: shakespeare
stages:
  - name: transfer
    kind: attention_transfer
    steps: 10
    lr: 1e-3
  - kind: distill
    tokens: 1e6
    seq_len: 128
budgets:
  cpu:
    stages:
      transfer: {steps: 2}
      all: {batch_size: 1}
    output: {dir: out/cpu}
"""


def _error(text: str, **kw) -> str:
    with pytest.raises(NHAError) as info:
        parse_recipe(text, "r.yaml", **{"budget": None, **kw})
    return str(info.value)


def test_good_recipe_types_and_yaml11_numbers():
    r = parse_recipe(GOOD, "r.yaml", budget=None)
    assert r.stages[0].lr == 1e-3 and isinstance(r.stages[0].lr, float)  # YAML 1.1 reads 1e-3 as a string
    assert r.stages[1].tokens == 1_000_000 and isinstance(r.stages[1].tokens, int)
    assert r.model.nha == {"window": 64, "slots": 64}
    assert r.nha_settings().window == 64
    assert r.data.sources[0].kind == "shakespeare"


@pytest.mark.parametrize("old,new,expect", [
    ("    lr: 1e-3", "    lrate: 1e-3", "r.yaml:11: unknown field 'stages[0].lrate'; did you mean 'lr'?"),
    ("    steps: 10", "    steps: ten", "r.yaml:10: stages[0].steps must be an integer, got 'ten'"),
    ("  nha: {window: 64, slots: 64}", "  nha: {windw: 64, slots: 64}",
     "r.yaml:3: unknown field 'model.nha.windw'; did you mean 'window'?"),
    ("  - kind: distill", "  - kind: distil", "r.yaml:12: stages[1].kind must be one of"),
    ("  base: null", "  base: null\n  dtpye: float32", "r.yaml:3: unknown field 'model.dtpye'; did you mean 'dtype'?"),
    ("    - kind: shakespeare", "    - kind: jsonl", "r.yaml:6: data.sources[0]: a jsonl source needs `path`"),
    ("    tokens: 1e6", "    tokens: 1e6\n    steps: 3", "r.yaml:12: stages[1] (distill): give exactly one of steps"),
    ("    lr: 1e-3", "    lr: 1e-3\n    lr: 2e-3", "r.yaml:12: duplicate field 'lr'"),
    ("    seq_len: 128", "    seq_len: [128]", "r.yaml:14: stages[1].seq_len must be an integer"),
    ("  nha: {window: 64, slots: 64}", "  nha: {window: -1}", "r.yaml:3: model.nha: window must be >= 0"),
    ("    lr: 1e-3", "    lr: 1e-3\n    temperature: 2.0", "temperature and ce_weight only apply to distill"),
])
def test_schema_errors_name_field_and_line(old, new, expect):
    assert old in GOOD
    assert expect in _error(GOOD.replace(old, new))


def test_yaml_syntax_error_names_line():
    assert _error("stages:\n  - kind: [finetune\n").startswith("r.yaml:")


def test_missing_stages_and_kind():
    assert "no stages" in _error("model: {base: null}\n")
    assert "r.yaml:2: missing field 'stages[0].kind'" in _error("stages:\n  - steps: 3\n")


def test_budget_and_set_overrides():
    r = parse_recipe(GOOD, "r.yaml", budget="cpu", overrides=["stages.distill.lr=5e-4", "model.nha.sinks=4",
                                                               "stages.1.steps=7", "stages.1.tokens=null"])
    assert [s.steps for s in r.stages] == [2, 7]
    assert [s.batch_size for s in r.stages] == [1, 1]
    assert r.stages[1].lr == 5e-4 and r.model.nha["sinks"] == 4
    assert r.output.dir == "out/cpu" and r.budget == "cpu"
    assert "no budget 'gpu'" in _error(GOOD, budget="gpu")
    msg = _error(GOOD, overrides=["stages.transfer.stpes=3"])
    assert msg.startswith("--set stages.transfer.stpes=3: unknown field 'stages[0].stpes'; did you mean 'steps'?")
    assert "no stage named 'nope'" in _error(GOOD, overrides=["stages.nope.steps=3"])


def test_budget_typo_names_its_line():
    text = GOOD.replace("      transfer: {steps: 2}", "      transfer: {stepz: 2}")
    assert _error(text, budget="cpu").startswith("r.yaml:18: unknown field 'stages[0].stepz'")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_are_valid_in_every_budget(path):
    import yaml

    budgets = list((yaml.safe_load(path.read_text()) or {}).get("budgets") or {}) or [None]
    for budget in budgets:
        r = read_recipe(path, budget=budget)
        assert r.stages


def test_default_recipe_has_cpu_and_gpu_budgets():
    path = Path(__file__).parent.parent / "recipes" / "smollm2-135m.yaml"
    cpu, gpu = read_recipe(path, budget="cpu"), read_recipe(path, budget="gpu")
    assert cpu.model.base is None and cpu.model.nha["window"] == cpu.model.nha["slots"] == 64
    assert all(s.steps is not None and s.steps <= 8 for s in cpu.stages)
    assert sum(s.minutes for s in gpu.stages) <= 10 and all(s.bf16 for s in gpu.stages)


def test_recipe_file_not_found(tmp_path):
    with pytest.raises(NHAError, match="not found"):
        read_recipe(tmp_path / "nope.yaml")
