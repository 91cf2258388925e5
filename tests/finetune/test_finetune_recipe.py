"""Recipe schema: unknown or mistyped fields fail naming the field and its YAML line; budgets and --set."""

from __future__ import annotations

from pathlib import Path

import pytest

from nha_convert.errors import NHAError
from nha_convert.finetune.recipe import parse_recipe, read_recipe

RECIPES = sorted(p for p in (Path(__file__).parents[2] / "recipes").glob("*.yaml")
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
    # field constraints (pydantic) and rules across fields: the same one line with file:line
    ("    lr: 1e-3", "    lr: -1e-3", "r.yaml:11: stages[0].lr must be > 0, got -0.001"),
    ("    seq_len: 128", "    seq_len: 0", "r.yaml:14: stages[1].seq_len must be > 0, got 0"),
    ("    steps: 10", "    steps: 10\n    min_lr_ratio: 1.5",
     "r.yaml:11: stages[0].min_lr_ratio must be <= 1, got 1.5"),
    ("    steps: 10", "    steps: 10\n    lora: {dropout: 1}", "r.yaml:11: stages[0].lora.dropout must be < 1, got 1"),
    ("  sources:\n    - kind: shakespeare", "  sources: []", "r.yaml:5: data.sources is empty"),
    ("    steps: 10", "    steps: 10\n    trains: al_but_mlp",
     "r.yaml:11: stages[0].trains must be one of 'gates' | 'lora' | 'attention' | 'all_but_mlp', got 'al_but_mlp' "
     "(did you mean 'all_but_mlp'?)"),
    # a field of another source kind would be ignored silently: it is an error naming the fields of this kind
    ("    - kind: shakespeare", "    - kind: shakespeare\n      path: x.txt",
     "r.yaml:7: data.sources[0].path: does not apply to a shakespeare source (its fields: kind, max_docs)"),
    ("  base: null", "  base: x\n  converted: y", "r.yaml:3: give either model.base (+ model.nha) or model.converted"),
    ("  base: null", "  base: null\n  dtype: bfloat16",
     "r.yaml:9: stages[0] (transfer): model.dtype bfloat16 needs bf16: true in every stage"),
    ("  - kind: distill", "  - kind: distill\n    name: transfer",
     "r.yaml:8: stages[0] (transfer): two stages are named 'transfer'"),
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
    path = Path(__file__).parents[2] / "recipes" / "smollm2-135m.yaml"
    cpu, gpu = read_recipe(path, budget="cpu"), read_recipe(path, budget="gpu")
    assert cpu.model.base is None and cpu.model.nha["window"] == cpu.model.nha["slots"] == 64
    assert all(s.steps is not None and s.steps <= 8 for s in cpu.stages)
    assert sum(s.minutes for s in gpu.stages) <= 10 and all(s.bf16 for s in gpu.stages)


def test_recipe_file_not_found(tmp_path):
    with pytest.raises(NHAError, match="not found"):
        read_recipe(tmp_path / "nope.yaml")


# --- the pydantic schema: its errors still name the YAML line (or the --set item) -----------------------------------


def test_unknown_key_in_a_source_names_line_and_suggests():
    text = GOOD.replace("    - kind: shakespeare", "    - kind: text\n      pth: d.txt")
    msg = _error(text)
    assert msg.startswith("r.yaml:7: unknown field 'data.sources[0].pth'; did you mean 'path'? known fields here:")
    assert "\n" not in msg


def test_set_values_are_converted_by_the_schema():
    r = parse_recipe(GOOD, "r.yaml", budget=None, overrides=[
        "stages.transfer.lr=5e-4", "stages.distill.tokens=2e6", "stages.transfer.bf16=true", "seed=1e3"])
    assert r.stages[0].lr == 5e-4 and isinstance(r.stages[0].lr, float)  # '5e-4' is a string to YAML 1.1
    assert r.stages[1].tokens == 2_000_000 and isinstance(r.stages[1].tokens, int)
    assert r.stages[0].bf16 is True and r.seed == 1000
    assert _error(GOOD, overrides=["stages.transfer.steps=2.5"]) == \
        "--set stages.transfer.steps=2.5: stages[0].steps must be an integer, got 2.5"
    assert _error(GOOD, overrides=["stages.transfer.bf16=1"]) == \
        "--set stages.transfer.bf16=1: stages[0].bf16 must be true/false, got 1"
    assert _error(GOOD, overrides=["stages.transfer.lr=-3"]) == \
        "--set stages.transfer.lr=-3: stages[0].lr must be > 0, got -3"


def test_loader_fields_are_not_recipe_fields():
    r = parse_recipe(GOOD, "r.yaml", budget="cpu")
    assert (r.source, r.budget) == ("r.yaml", "cpu")
    assert _error(GOOD.replace("\nstages:", "\nsource: x\nstages:", 1)).startswith("r.yaml:7: unknown field 'source'")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_load_without_and_with_each_budget(path):
    import yaml

    for budget in [None, *((yaml.safe_load(path.read_text()) or {}).get("budgets") or {})]:
        assert read_recipe(path, budget=budget).stages


@pytest.mark.parametrize("budget", ["gpu", "cpu"])
def test_hybrid_recipe_is_the_all_nha_recipe_plus_two_full_layers(budget):
    # recipes.md and the hybrid's header say so (session 11): a change to one recipe must be made to both
    root = Path(__file__).parents[2] / "recipes"
    hybrid = read_recipe(root / "smollm2-135m-hybrid.yaml", budget=budget)
    same = read_recipe(root / "smollm2-135m.yaml", budget=budget,
                       overrides=["model.nha.full_layers=auto:2", f"output.dir={hybrid.output.dir}"]
                       + (["model.calibration.seq_len=192", "model.calibration.text_seqs=1",
                           "model.calibration.retrieval_docs=1"] if budget == "cpu" else []))
    # the budgets as written differ (the hybrid's cpu budget shrinks the calibration); their effect is compared above
    assert hybrid.model_dump(exclude={"budgets"}) == same.model_dump(exclude={"budgets"})
