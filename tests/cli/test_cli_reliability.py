"""Reliability of nha-convert, nha-finetune and nha-eval (issue 15): exit codes, one-line errors, checks before any
model loads, the run-folder lock, checkpoint validation with fallback, file permissions.

SIGINT tests run the real command in a subprocess and send the signal once a marker line is on stderr (never after
a fixed sleep), so they hold on a loaded machine; each takes well under a minute.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from nha_convert.cli import convert as convert_cli
from nha_convert.cli import eval as eval_cli
from nha_convert.cli import finetune as finetune_cli
from tests.helpers.cli import Proc, no_model_loads, one_line_error
from tests.helpers.finetune import tiny_run_root

MAINS = {"nha-convert": convert_cli.main, "nha-finetune": finetune_cli.main, "nha-eval": eval_cli.main}
STAGES = """
stages:
  - kind: distill
    name: lora
    trains: lora
    lora: {r: 4}
    steps: 4
    batch_size: 2
    seq_len: 32
    eval_rows: 2
    ce_weight: 0.5
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny Llama (byte tokenizer, 512 positions), a corpus and a recipe training it into root/run."""
    return tiny_run_root(tmp_path_factory.mktemp("rel"), STAGES)


_no_model_loads = no_model_loads
_one_line_error = one_line_error


# --- usage errors and --version (the same runner serves all three) ------------------------------------------


@pytest.mark.parametrize("prog,args,want", [
    ("nha-convert", ["--window", "abc", "-o", "x"], "Invalid value for '--window'"),
    ("nha-convert", ["--no-such-option"], "No such option: --no-such-option"),
    ("nha-convert", [], "Missing option '--output'"),
    ("nha-finetune", [], "Missing argument 'recipe'"),
    ("nha-finetune", ["r.yaml", "--budget"], "Option '--budget' requires an argument"),
    ("nha-eval", ["m", "--recall-n", "x"], "Invalid value for '--recall-n'"),
])
def test_usage_error_is_one_line_exit_2(run_cli, prog, args, want):
    code, out, err = run_cli(MAINS[prog], prog, *args)
    _one_line_error(code, err, want, exit_code=2)
    assert f"(see {prog} --help)" in err and out == ""


@pytest.mark.parametrize("prog", sorted(MAINS))
def test_version(run_cli, prog):
    from importlib.metadata import version

    code, out, err = run_cli(MAINS[prog], prog, "--version")
    assert (code, out, err) == (0, f"{prog} {version('nha-convert')}\n", "")


def test_finetune_help_has_examples_and_exits_0(run_cli):
    code, out, _ = run_cli(finetune_cli.main, "nha-finetune", "--help")
    assert code == 0 and "Examples" in out and "--resume -o runs/a" in out


# --- checks before any model loads ---------------------------------------------------------------------------


def _truncated_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    return dst


def test_convert_checks_before_loading(tiny, tmp_path, run_cli, monkeypatch):
    _no_model_loads(monkeypatch)
    bad = _truncated_copy(tiny / "base", tmp_path / "truncated")
    code, _, err = run_cli(convert_cli.main, "nha-convert", bad, "-o", tmp_path / "out")
    _one_line_error(code, err, "model.safetensors is")
    assert "truncated" in err and not (tmp_path / "out").exists()
    (bad / "model.safetensors").unlink()
    code, _, err = run_cli(convert_cli.main, "nha-convert", bad, "-o", tmp_path / "out")
    _one_line_error(code, err, "holds no weights")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, _, err = run_cli(convert_cli.main, "nha-convert", tiny / "base", "-o", blocker / "out")
    _one_line_error(code, err, f"{blocker} is a file")
    code, _, err = run_cli(convert_cli.main, "nha-convert", tiny / "base", "-o", blocker)
    _one_line_error(code, err, "exists and is not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "truncated"]


def _recipe(tiny: Path, tmp_path: Path, **replace: str) -> Path:
    text = (tiny / "r.yaml").read_text()
    for old, new in replace.items():
        text = text.replace(old, new)
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("case,want", [
    ("missing data", "data file"),
    ("seq_len", "seq_len 4096 tokens exceeds the context length of model.base"),
    ("truncated", "model.safetensors is"),
    ("output is a file", "is a file"),
])
def test_finetune_checks_before_loading(tiny, tmp_path, run_cli, monkeypatch, case, want):
    _no_model_loads(monkeypatch)
    run = tmp_path / "run"
    args: list = []
    if case == "missing data":
        recipe = _recipe(tiny, tmp_path, **{str(tiny / "data"): str(tmp_path / "nothing-here")})
    elif case == "seq_len":
        recipe = _recipe(tiny, tmp_path, **{"seq_len: 32": "seq_len: 4096"})
    elif case == "truncated":
        bad = _truncated_copy(tiny / "base", tmp_path / "truncated")
        recipe = _recipe(tiny, tmp_path, **{f"base: {tiny / 'base'}": f"base: {bad}"})
    else:
        recipe = _recipe(tiny, tmp_path)
        (tmp_path / "f").write_text("x")
        run = tmp_path / "f" / "run"
    code, _, err = run_cli(finetune_cli.main, "nha-finetune", recipe, "-o", run, *args)
    _one_line_error(code, err, want)
    assert not run.exists() and not list(tmp_path.glob(".*.lock"))


@pytest.fixture(scope="module")
def eval_folder(tiny) -> Path:
    """The tiny base with the byte tokenizer, as nha-eval reads it (512 positions)."""
    return tiny / "base"


@pytest.mark.parametrize("case,want", [
    ("malformed check", "is not valid JSON"),
    ("missing check", "no expected-values file"),
    ("non-numeric check", "metric 'piqa/acc' must be a number"),
    ("limit 0", "--limit must be > 0"),
    ("limit negative", "--limit must be > 0"),
    ("out is a file", "is a file"),
    ("out under a file", "is a file"),
    ("recall beyond context", "recall length(s) 1024 exceed the context length of base (512 tokens)"),
    ("ppl beyond context", "--ppl-len 4096 exceeds the context length of base (512 tokens)"),
    ("truncated", "model.safetensors is"),
])
def test_eval_checks_before_loading(eval_folder, tmp_path, run_cli, monkeypatch, case, want):
    _no_model_loads(monkeypatch)
    out = tmp_path / "out"
    model = str(eval_folder)
    extra: list = ["--tasks", "none", "--ppl"]
    if case.endswith("check"):
        exp = tmp_path / "exp.json"
        if case == "malformed check":
            exp.write_text("{not json")
        elif case == "non-numeric check":
            exp.write_text(json.dumps({"metrics": {"piqa/acc": "high"}}))
        extra += ["--check", exp]
    elif case.startswith("limit"):
        extra = ["--tasks", "piqa", "--limit", "0" if case == "limit 0" else "-3"]
    elif case == "out is a file":
        out.write_text("x")
    elif case == "out under a file":
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" / "out"
    elif case == "recall beyond context":
        extra = ["--tasks", "none", "--recall", "--recall-lengths", "256,1024"]
    elif case == "ppl beyond context":
        extra += ["--ppl-len", "4096"]
    else:
        model = str(_truncated_copy(eval_folder, tmp_path / "base"))
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = run_cli(eval_cli.main, "nha-eval", model, *extra, "--out", out)
    _one_line_error(code, err, want)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


# --- permissions -----------------------------------------------------------------------------------------------


def test_outputs_follow_the_umask(tiny, tmp_path, run_cli):
    old = os.umask(0o022)
    try:
        code, _, err = run_cli(convert_cli.main, "nha-convert", tiny / "base", "-o", tmp_path / "nha",
                               "--window", "8", "--slots", "4")
        assert code == 0, err
        code, _, err = run_cli(eval_cli.main, "nha-eval", tmp_path / "nha", "--tasks", "none", "--ppl",
                               "--ppl-len", "64", "--ppl-seqs", "1", "--out", tmp_path / "ev")
        assert code == 0, err
    finally:
        os.umask(old)
    assert (tmp_path / "nha").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "nha" / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "ev").stat().st_mode & 0o777 == 0o755
    for name in ("results.json", "report.md", "perplexity.png"):
        assert (tmp_path / "ev" / name).stat().st_mode & 0o777 == 0o644, name
    # the converted folder's summary does not claim a gain an all-full model lacks
    code, _, err = run_cli(convert_cli.main, "nha-convert", tiny / "base", "-o", tmp_path / "full",
                           "--full-layers", "0,1", "--slots", "4")
    assert code == 0 and "x smaller" not in err and "larger" in err


# --- checkpoints ---------------------------------------------------------------------------------------------


def test_resume_skips_a_damaged_checkpoint(tiny, tmp_path, run_cli):
    """Checkpoints at steps 2 and 4 (the last stage end is saved by Ctrl-C at step 4 of 4... here: step 3)."""
    from safetensors.torch import load_file

    from nha_convert.finetune.checkpoints import checkpoint_dirs, problem
    from nha_convert.finetune.recipe import read_recipe
    from nha_convert.finetune.trainer import Interrupted, Trainer

    recipe = _recipe(tiny, tmp_path, **{str(tiny / "run"): str(tmp_path / "run")})

    def stop_at_3(step: int) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        Trainer(read_recipe(recipe), step_callback=stop_at_3).run()
    older, latest = checkpoint_dirs(tmp_path / "run")
    assert (older.name, latest.name) == ("step-00000002-stage0", "step-00000003-stage0")
    assert problem(older) is None and problem(latest) is None

    spare = tmp_path / "spare"
    shutil.copytree(latest, spare)
    (latest / "optimizer.bin").unlink()
    assert problem(latest) == "optimizer.bin is missing"
    shutil.rmtree(latest)
    shutil.copytree(spare, latest)
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    assert "model.safetensors is" in problem(latest) and "truncated" in problem(latest)

    code, _, err = run_cli(finetune_cli.main, "nha-finetune", recipe, "--resume")
    assert code == 0, err
    said = " ".join(err.split())
    assert "skipping damaged checkpoint(s) step-00000003-stage0 (model.safetensors is" in said
    assert "resuming from the previous intact one, step-00000002-stage0" in said
    assert f"resuming from {older}" in said

    straight = tmp_path / "straight"
    Trainer(read_recipe(recipe, overrides=[f"output.dir={straight}"])).run()
    a, b = load_file(str(tmp_path / "run" / "model" / "model.safetensors")), load_file(
        str(straight / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # resumed from step 2: bit-exact


def test_resume_with_no_intact_checkpoint_is_one_line(tiny, tmp_path, run_cli):
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000002-stage0"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{trunc")
    recipe = _recipe(tiny, tmp_path, **{str(tiny / "run"): str(tmp_path / "run")})
    code, _, err = run_cli(finetune_cli.main, "nha-finetune", recipe, "--resume")
    _one_line_error(code, err, "no intact checkpoint")
    assert "trainer_state.json is unreadable" in err and ckpt.is_dir()


# --- subprocesses: the lock, and SIGINT --------------------------------------------------------------------------


def _interrupted(code: int, err: str, marker: str, sig: int = signal.SIGINT) -> None:
    assert code == 128 + sig, err  # 130 after Ctrl-C, 143 after SIGTERM, as a shell reports them
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "Terminated" not in err
    after = err[err.index(marker):].splitlines()[1:]
    assert after == ["interrupted" if sig == signal.SIGINT else "terminated"], err  # one line after the marker


# SIGTERM (`timeout`, `kill`) unwinds like Ctrl-C: the same cleanup, exit 143 (cli/common.py, Terminated).
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_convert_signal_while_loading(smollm2_path, tmp_path, sig):
    proc = Proc("nha_convert.cli.convert", smollm2_path, "-o", tmp_path / "out")
    proc.wait_for("loading base model")
    code, err = proc.interrupt(sig=sig)
    _interrupted(code, err, "loading base model", sig)
    assert list(tmp_path.iterdir()) == []  # no output, no partial folder


def test_convert_sigint_while_converting(smollm2_path, tmp_path):
    """During the work itself: auto:K scores every layer on calibration text (seconds on a CPU)."""
    proc = Proc("nha_convert.cli.convert", smollm2_path, "-o", tmp_path / "out", "--full-layers", "auto:2",
                "--calibration-len", "256", "--calibration-seqs", "2")
    proc.wait_for("converting attention layers", timeout=240)
    code, err = proc.interrupt()
    _interrupted(code, err, "converting attention layers")
    assert list(tmp_path.iterdir()) == []


def test_eval_sigint_while_loading_and_while_working(smollm2_path, eval_folder, tmp_path):
    proc = Proc("nha_convert.cli.eval", smollm2_path, "--tasks", "none", "--ppl", "--out", tmp_path / "a")
    proc.wait_for("loading ")
    code, err = proc.interrupt()
    _interrupted(code, err, "loading ")
    proc = Proc("nha_convert.cli.eval", eval_folder, "--tasks", "none", "--recall", "--recall-lengths", "256",
                "--recall-n", "5000", "--out", tmp_path / "b")
    proc.wait_for("passkey @ 256 tokens: 0/5000")
    code, err = proc.interrupt()
    _interrupted(code, err, "passkey @ 256 tokens:")
    assert list(tmp_path.iterdir()) == []  # no report from an interrupted run


def test_an_error_raised_while_ctrl_c_unwinds_still_exits_130(capsys):
    """CI caught this: Ctrl-C during model construction reached torch's device mode, whose exit then failed with
    "trying to pop from empty mode stack"; that RuntimeError replaced the KeyboardInterrupt and printed a traceback.
    Any error raised while an interrupt unwinds is the interrupt; an error of its own still propagates."""
    import typer

    from nha_convert.cli import common

    app = typer.Typer()

    @app.command()
    def work(fail_alone: bool = False) -> None:
        if fail_alone:
            raise RuntimeError("a bug of its own")
        try:
            raise KeyboardInterrupt
        finally:
            raise RuntimeError("trying to pop from empty mode stack")  # what torch's mode exit raised

    assert common.run(app, "prog", []) == 130
    assert capsys.readouterr().err == "interrupted\n"
    with pytest.raises(RuntimeError, match="of its own"):
        common.run(app, "prog", ["--fail-alone"])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_finetune_signal_while_loading_leaves_no_run_folder(tiny, tmp_path, sig):
    run = tmp_path / "run"
    proc = Proc("nha_convert.cli.finetune", tiny / "r.yaml", "-o", run)
    proc.wait_for("loading models")
    code, err = proc.interrupt(sig=sig)
    _interrupted(code, err, "loading models", sig)
    assert list(tmp_path.iterdir()) == []  # neither an empty run folder nor a lock file


def test_finetune_lock_and_second_ctrl_c(tiny, tmp_path, run_cli):
    run = tmp_path / "run"
    recipe = tiny / "r.yaml"
    first = Proc("nha_convert.cli.finetune", recipe, "-o", run, "--set", "stages.lora.steps=100000",
                 "--set", "output.checkpoint_every=0")
    try:
        metrics = run / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.is_file() and '"loss"' in metrics.read_text()):
            assert first.p.poll() is None and time.monotonic() < deadline, "".join(first.lines)
            time.sleep(0.1)
        files = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
        log = metrics.read_text()
        for extra in ([], ["--resume"], ["--overwrite"]):
            code, _, err = run_cli(finetune_cli.main, "nha-finetune", recipe, "-o", run, *extra)
            _one_line_error(code, err, f"run folder {run} is in use by pid {first.p.pid} on ")
        assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == files
        assert metrics.read_text().startswith(log)  # only the first run appended
    finally:
        code, err = first.interrupt(times=2)  # the second Ctrl-C aborts at once (or the first one's save ends it)
    assert code == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith(("interrupted", "Ctrl-C")), err
    assert not list(tmp_path.glob(".*.lock"))
