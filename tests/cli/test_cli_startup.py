"""Start-up and the smaller items of issue 29: --help / --version import neither torch nor transformers, a
mistyped task gets "did you mean", nha-eval's help is short with examples first, nha-finetune --check makes every
check the run makes, and the ETA right after a resume is not inflated by the first step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nha_convert.cli import eval as eval_cli
from nha_convert.cli import finetune as finetune_cli
from tests.helpers.cli import ROOT, no_model_loads, one_line_error
from tests.helpers.finetune import recipe_text, save_tiny_base, write_corpus

HEAVY = ("torch", "transformers", "scipy", "lm_eval", "accelerate")


@pytest.mark.parametrize("module", ["convert", "eval", "finetune"])
@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_import_nothing_heavy(module, flag):
    code = (f"import sys; sys.argv = ['nha-{module}', '{flag}']\n"
            f"from nha_convert.cli.{module} import main\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_importing_the_package_still_registers_the_model_types():
    code = ("import nha_convert, sys\nassert 'transformers' not in sys.modules\n"
            "from transformers import AutoConfig\nprint(type(AutoConfig.for_model('nha_llama')).__name__)\n"
            "import nha_convert.convert\n"  # the submodule of the same name leaves the function in place
            "assert nha_convert.convert.__name__ == 'convert' and callable(nha_convert.convert)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "NHALlamaConfig", r.stderr


def test_mistyped_task_gets_did_you_mean():
    from nha_convert.errors import NHAError
    from nha_convert.eval.lm_eval_runner import check_tasks

    class Manager:
        all_tasks = ["piqa", "arc_easy", "hellaswag"]

    with pytest.raises(NHAError, match="unknown task 'piqaa'; did you mean 'piqa'\\?"):
        check_tasks(Manager(), ["piqaa"])


def test_eval_help_is_short_with_examples_first(run_cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = run_cli(eval_cli.main, "nha-eval", "--help")
    lines = out.splitlines()
    assert code == 0 and len(lines) <= 180, len(lines)
    first_example = next(i for i, x in enumerate(lines) if "nha-eval out/smollm2-nha --compare" in x)
    assert first_example < next(i for i, x in enumerate(lines) if "Options" in x)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("check")
    save_tiny_base(root / "base")
    write_corpus(root / "data")
    (root / "r.yaml").write_text(recipe_text(root / "base", root / "data", root / "run", """
stages:
  - kind: finetune
    trains: attention
    steps: 2
    batch_size: 2
    seq_len: 32
"""))
    return root


@pytest.mark.parametrize("case,want", [
    ("seq_len", "seq_len 4096 tokens exceeds the context length of model.base"),
    ("missing data", "data file"),
    ("run folder in use", "is not empty; pass --resume"),
])
def test_finetune_check_makes_the_run_checks(tiny, tmp_path, run_cli, monkeypatch, case, want):
    no_model_loads(monkeypatch)
    text = (tiny / "r.yaml").read_text().replace(str(tiny / "run"), str(tmp_path / "run"))
    if case == "seq_len":
        text = text.replace("seq_len: 32", "seq_len: 4096")
    elif case == "missing data":
        text = text.replace(str(tiny / "data"), str(tmp_path / "nothing"))
    else:
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "x").write_text("x")
    (tmp_path / "r.yaml").write_text(text)
    code, _, err = run_cli(finetune_cli.main, "nha-finetune", tmp_path / "r.yaml", "--check")
    one_line_error(code, err, want)


def test_eta_after_a_resume_leaves_out_the_first_step(monkeypatch):
    """Resumed at step 100 of 200: the first step takes 20 s (warm-up), each next one 1 s."""
    from rich.console import Console

    from nha_convert.finetune import progress

    now = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    printed: list[str] = []
    console = Console(file=open(os.devnull, "w"), force_terminal=False)
    monkeypatch.setattr(console, "print", lambda text, **k: printed.append(text))
    bar = progress.StageProgress(console, "s", 200, 100, True, 1)
    for step, seconds in ((101, 20.0), (102, 1.0), (103, 1.0)):
        now[0] += seconds
        bar.update(step, 1.0, 10)
    assert printed[-1].endswith("ETA 97 s")  # 97 steps left at 1 s each (was (22 / 3) * 97 = 711 s)
