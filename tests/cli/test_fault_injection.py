"""Faults against each command (issue 29): NaN weights and losses, truncated and same-size-garbage files, a full disk
(faked: the write raises ENOSPC, or `shutil.disk_usage` reports too little), an unmovable output folder, SIGINT /
SIGTERM while a command starts. Each asserts one line, the documented exit code (docs/errors.md) and that nothing
good was lost. Tiny models only: the module takes well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import errno
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
from tests.helpers.cli import Proc, final_error, no_model_loads, one_line_error
from tests.helpers.finetune import tiny_run_root

STAGES = """
stages:
  - kind: finetune
    name: ft
    trains: attention
    steps: 4
    batch_size: 2
    seq_len: 32
    eval_rows: 2
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny Llama (byte tokenizer), a corpus, and a recipe training it into root/run (checkpoints every 2 steps)."""
    return tiny_run_root(tmp_path_factory.mktemp("faults"), STAGES)


def _recipe(tiny: Path, run: Path, text: str | None = None) -> Path:
    path = run.parent / f"{run.name}.yaml"
    path.write_text((text or (tiny / "r.yaml").read_text()).replace(str(tiny / "run"), str(run)))
    return path


def _nan_copy(src: Path, dst: Path) -> Path:
    """The model with every o_proj weight multiplied by NaN: it outputs NaN everywhere."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    weights = {k: v * float("nan") if "o_proj" in k else v for k, v in weights.items()}
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _garbage_same_size(path: Path) -> None:
    """Overwrite a safetensors file's tensor bytes in place with random bytes: header and size unchanged."""
    from nha_convert.finetune import checkpoints

    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header:] = os.urandom(len(data) - header)
    path.write_bytes(bytes(data))
    # Damage comes long after the save, in practice: forget what this process verified, as a later one would
    # (within one filesystem clock tick a same-size rewrite keeps the file's mtime).
    checkpoints._verified.clear()


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


# --- NaN: the gate fails naming it, the report is still written --------------------------------------------------


def test_eval_of_a_nan_model_writes_the_report_and_fails_the_gate(tiny, tmp_path, run_cli):
    model = _nan_copy(tiny / "base", tmp_path / "nan-model")
    expected = tmp_path / "expected.json"
    expected.write_text(json.dumps({"metrics": {"perplexity/overall": 300.0, "perplexity/0-16": 300.0}}))
    out = tmp_path / "ev"
    code, _, err = run_cli(eval_cli.main, "nha-eval", model, "--tasks", "none", "--ppl", "--ppl-len", "64",
                           "--ppl-seqs", "1", "--out", out, "--check", expected)
    assert code == 1 and "Traceback" not in err, err
    assert "FAIL perplexity/overall: nan is not a finite number (expected 300)" in err
    assert err.strip().splitlines()[-1] == f"error: 2 metric(s) fell below {expected}"
    assert "**nan**" in (out / "report.md").read_text()  # marked in the report
    assert (out / "perplexity.png").is_file() and json.loads((out / "results.json").read_text(), parse_constant=str)


@pytest.mark.parametrize("fault", ["nan", "garbage"])
def test_convert_refuses_a_model_with_nan_or_garbage_weights(tiny, tmp_path, run_cli, fault):
    if fault == "nan":
        model = _nan_copy(tiny / "base", tmp_path / "bad")
    else:
        model = shutil.copytree(tiny / "base", tmp_path / "bad")
        _garbage_same_size(model / "model.safetensors")
    code, _, err = run_cli(convert_cli.main, "nha-convert", model, "-o", tmp_path / "out", "--window", "8",
                           "--slots", "4")
    final_error(code, err, f"model {model}: ")
    assert "weight tensor(s) hold NaN or inf (first: model." in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_gate_fails_every_non_finite_metric(value):
    from nha_convert.eval import gate

    results = {"models": [{"label": "m"}], "tasks": {"m": {"piqa": {"acc": value}}},
               "perplexity": {"m": {"buckets": ["0-64"], "ppl": [value], "overall_ppl": value}}}
    failures = gate.check(results, {"metrics": {"piqa/acc": 0.5, "perplexity/overall": 30.0}}, 0.5)
    assert [f.metric for f in failures] == ["piqa/acc", "perplexity/overall"]
    assert all("is not a finite number" in str(f) for f in failures)
    with pytest.raises(Exception, match="not finite numbers"):
        gate.expected_from(results)


def test_report_marks_non_finite_values_and_charts_skip_them(tmp_path):
    from nha_convert.eval.report import write_report

    nan, inf = float("nan"), float("inf")
    results = {"models": [{"label": "a", "kind": "nha"}, {"label": "b", "kind": "base"}],
               "tasks": {"a": {"piqa": {"acc": nan}}, "b": {"piqa": {"acc": 0.6}}},
               "recall": {"a": {"passkey": {"1024": nan}}, "b": {"passkey": {"1024": 1.0}}},
               "perplexity": {"a": {"buckets": ["0-64"], "ppl": [nan], "overall_ppl": nan},
                              "b": {"buckets": ["0-64"], "ppl": [inf], "overall_ppl": inf}},
               "bench": {"rows": [{"model": "nha", "context": 1024, "batch": 1, "prefill_s": nan,
                                   "decode_tok_s": inf, "state_mib_per_seq": nan}]}}
    files = write_report(results, tmp_path)
    assert sorted(files) == ["bench", "json", "markdown", "perplexity", "recall", "tasks"]
    md = (tmp_path / "report.md").read_text()
    assert "**nan**" in md and "**inf**" in md


# --- NaN in training: stop with one line, keep the last good checkpoint ---------------------------------------------


def test_finetune_stops_on_a_non_finite_loss_and_keeps_its_checkpoint(tiny, tmp_path, run_cli, monkeypatch):
    import torch

    from nha_convert.finetune.checkpoints import checkpoint_dirs, problem
    from nha_convert.finetune.trainer import Trainer

    real_step = Trainer._train_step

    def nan_at_step_3(self, run, teacher, rows, autocast):
        stats, tokens, denom = real_step(self, run, teacher, rows, autocast)
        return (stats * float("nan") if run.pos.global_step == 2 else stats), tokens, denom  # step 3's loss

    monkeypatch.setattr(Trainer, "_train_step", nan_at_step_3)
    run = tmp_path / "run"
    code, _, err = run_cli(finetune_cli.main, "nha-finetune", _recipe(tiny, run))
    line = final_error(code, err, "error: stage ft: the loss (nan) became non-finite (NaN or inf) at step 3;")
    assert "the last good checkpoint, step-00000002-stage0, is kept" in line
    assert [c.name for c in checkpoint_dirs(run)] == ["step-00000000-stage0", "step-00000002-stage0"]
    assert all(problem(c) is None for c in checkpoint_dirs(run))
    from safetensors.torch import load_file

    kept = load_file(str(checkpoint_dirs(run)[-1] / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in kept.values())


def test_finetune_never_saves_nan_weights(tiny, tmp_path):
    import torch

    from nha_convert.errors import NHAError
    from nha_convert.finetune.checkpoints import checkpoint_dirs
    from nha_convert.finetune.recipe import read_recipe
    from nha_convert.finetune.trainer import Trainer

    run = tmp_path / "run"
    trainer = Trainer(read_recipe(_recipe(tiny, run)))

    def poison(step: int) -> None:  # after step 2's update, before its checkpoint
        if step == 2:
            with torch.no_grad():
                next(p for p in trainer.student_for_test.parameters() if p.requires_grad).fill_(float("nan"))

    real_setup = Trainer._setup_stage

    def setup(self, *a, **k):
        stage_run = real_setup(self, *a, **k)
        self.student_for_test = stage_run.student
        return stage_run

    trainer.step_callback = poison
    trainer._setup_stage = setup.__get__(trainer)
    with pytest.raises(NHAError, match="the trained weights became non-finite .* at step 2;"):
        trainer.run()
    assert [c.name for c in checkpoint_dirs(run)] == ["step-00000000-stage0"]


# --- damaged checkpoints: skipped with one line, never trusted, never the reason a good one goes ------------------


def test_same_size_garbage_checkpoint_is_skipped_and_good_ones_kept(tiny, tmp_path, run_cli):
    from nha_convert.finetune.checkpoints import checkpoint_dirs, problem
    from nha_convert.finetune.recipe import read_recipe
    from nha_convert.finetune.trainer import Interrupted, Trainer

    run = tmp_path / "run"
    recipe = _recipe(tiny, run)

    def stop_at_3(step: int) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        Trainer(read_recipe(recipe), step_callback=stop_at_3).run()
    good, latest = checkpoint_dirs(run)
    assert (good.name, latest.name) == ("step-00000002-stage0", "step-00000003-stage0")
    _garbage_same_size(latest / "model.safetensors")
    assert problem(latest) == "model.safetensors does not match its checksum (damaged since it was saved)"
    code, _, err = run_cli(finetune_cli.main, "nha-finetune", recipe, "--resume")
    assert code == 0, err
    said = " ".join(err.split())
    assert "skipping damaged checkpoint(s) step-00000003-stage0 (model.safetensors does not match its checksum" in said
    assert f"resuming from {good}" in said and "nan" not in said.lower()


def test_rotation_keeps_the_newest_intact_checkpoints(tmp_path):
    """keep 2: a damaged newest checkpoint does not count, so the good older one stays."""
    from nha_convert.finetune.checkpoints import Position, checkpoint_dirs, save_checkpoint

    acc = _FakeAccelerator()
    sched = _FakeScheduler()
    saved = [save_checkpoint(acc, tmp_path, Position(global_step=s), sched, {}, keep=2) for s in (1, 2)]
    _garbage_same_size(saved[-1] / "model.safetensors")
    save_checkpoint(acc, tmp_path, Position(global_step=3), sched, {}, keep=2)
    assert [c.name for c in checkpoint_dirs(tmp_path)] == [f"step-0000000{s}-stage0" for s in (1, 2, 3)]
    save_checkpoint(acc, tmp_path, Position(global_step=4), sched, {}, keep=2)
    assert [c.name for c in checkpoint_dirs(tmp_path)] == [f"step-0000000{s}-stage0" for s in (3, 4)]


class _FakeAccelerator:
    is_main_process = True

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, folder: str, safe_serialization: bool = True) -> None:
        import torch
        from safetensors.torch import save_file

        save_file({"w": torch.randn(64)}, os.path.join(folder, "model.safetensors"))
        torch.save({"adam": 1}, os.path.join(folder, "optimizer.bin"))


class _FakeScheduler:
    def state_dict(self) -> dict:
        return {"last_epoch": 0}


# --- a full disk (faked) ------------------------------------------------------------------------------------------


def test_convert_on_a_full_disk_is_one_line_and_leaves_nothing(tiny, tmp_path, run_cli, monkeypatch):
    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", _enospc)
    code, _, err = run_cli(convert_cli.main, "nha-convert", tiny / "base", "-o", tmp_path / "out",
                           "--window", "8", "--slots", "4")
    final_error(code, err, f"out of disk space in {tmp_path}; the model (out) needs about ")
    assert list(tmp_path.iterdir()) == []  # no partial folder


def test_convert_checks_free_space_before_writing(tiny, tmp_path, run_cli, monkeypatch):
    from transformers import PreTrainedModel

    def must_not_write(*a, **k):
        raise AssertionError("wrote with too little space")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", must_not_write)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    code, _, err = run_cli(convert_cli.main, "nha-convert", tiny / "base", "-o", tmp_path / "out",
                           "--window", "8", "--slots", "4")
    final_error(code, err, "bytes, 1,000 bytes free; free some space or choose another folder")
    assert list(tmp_path.iterdir()) == []


def test_finetune_on_a_full_disk_removes_the_partial_checkpoint_and_says_resume(tiny, tmp_path, run_cli,
                                                                               monkeypatch):
    from accelerate import Accelerator

    from nha_convert.finetune.checkpoints import checkpoint_dirs, problem

    real = Accelerator.save_state
    calls = []

    def full_on_second(self, folder, **kw):
        calls.append(folder)
        if len(calls) == 2:
            Path(folder, "model.safetensors").write_bytes(b"partial")
            _enospc()
        return real(self, folder, **kw)

    monkeypatch.setattr(Accelerator, "save_state", full_on_second)
    run = tmp_path / "run"
    recipe = _recipe(tiny, run)
    code, _, err = run_cli(finetune_cli.main, "nha-finetune", recipe)
    final_error(code, err, f"out of disk space in {run / 'checkpoints'}; checkpoint step-00000002-stage0 needs "
                           "about ")
    assert f"; then continue with: nha-finetune {recipe} --resume" in err
    assert [c.name for c in checkpoint_dirs(run)] == ["step-00000000-stage0"] and problem(checkpoint_dirs(run)[0]) \
        is None
    assert not list((run / "checkpoints").glob(".*partial"))


def test_eval_on_a_full_disk_is_one_line(tiny, tmp_path, run_cli, monkeypatch):
    from pathlib import Path as P

    monkeypatch.setattr(P, "write_text", _enospc)
    code, _, err = run_cli(eval_cli.main, "nha-eval", tiny / "base", "--tasks", "none", "--ppl", "--ppl-len", "32",
                           "--ppl-seqs", "1", "--out", tmp_path / "ev")
    final_error(code, err, f"out of disk space in {tmp_path / 'ev'} while writing results.json")
    assert list((tmp_path / "ev").iterdir()) == []


# --- an output folder that cannot be replaced -----------------------------------------------------------------------


def _unmovable(monkeypatch, folder: Path) -> None:
    real = os.rename

    def rename(src, dst, *a, **k):
        if Path(src) == folder:
            raise OSError(errno.EBUSY, "Device or resource busy")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", rename)


def test_overwrite_of_an_unmovable_folder_fails_before_the_work(tiny, tmp_path, run_cli, monkeypatch):
    out = tmp_path / "mount"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    (run := tmp_path / "run").mkdir()
    (run / "keep.txt").write_text("precious")
    no_model_loads(monkeypatch)
    _unmovable(monkeypatch, out)
    code, _, err = run_cli(convert_cli.main, "nha-convert", tiny / "base", "-o", out, "--overwrite")
    one_line_error(code, err, f"--overwrite: {out} cannot be replaced (Device or resource busy")
    _unmovable(monkeypatch, run)
    code, _, err = run_cli(finetune_cli.main, "nha-finetune", _recipe(tiny, run), "--overwrite")
    one_line_error(code, err, f"--overwrite: {run} cannot be replaced")
    assert (out / "keep.txt").read_text() == (run / "keep.txt").read_text() == "precious"


# --- numbers that are not numbers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("args,want", [
    (["--limit", "nan"], "--limit must be > 0 and finite"),
    (["--limit", "inf"], "--limit must be > 0 and finite"),
    (["--tolerance", "-0.1"], "--tolerance must be a number >= 0"),
    (["--tolerance", "nan"], "--tolerance must be a number >= 0"),
])
def test_eval_refuses_non_finite_and_negative_options(tiny, tmp_path, run_cli, monkeypatch, args, want):
    no_model_loads(monkeypatch)
    code, _, err = run_cli(eval_cli.main, "nha-eval", tiny / "base", "--tasks", "piqa", *args, "--out", tmp_path / "o")
    one_line_error(code, err, want)


def test_expected_file_with_nan_or_negative_tolerance_is_refused(tiny, tmp_path, run_cli, monkeypatch):
    no_model_loads(monkeypatch)
    for metrics in ({"piqa/acc": float("nan")}, {"piqa/acc": {"value": 0.5, "tolerance": -1}}):
        exp = tmp_path / "exp.json"
        exp.write_text(json.dumps({"metrics": metrics}))
        code, _, err = run_cli(eval_cli.main, "nha-eval", tiny / "base", "--check", exp, "--out", tmp_path / "o")
        one_line_error(code, err, "metric 'piqa/acc' must be a number or {\"value\": x, \"tolerance\": t} (finite, t >= 0)")


# --- tiny data ------------------------------------------------------------------------------------------------------


def test_finetune_refuses_data_too_small_for_a_step(tiny, tmp_path, run_cli):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("one short line\ntwo\nthree\n")
    text = (tiny / "r.yaml").read_text().replace(str(tiny / "data"), str(data)).replace("min_chunk: 8",
                                                                                        "min_chunk: 1")
    run = tmp_path / "run"
    code, _, err = run_cli(finetune_cli.main, "nha-finetune", _recipe(tiny, run, text))
    final_error(code, err, "stage ft: the data gives ")
    assert "a step needs 2 rows" in err and not run.exists()


# --- signals while a command starts --------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
@pytest.mark.parametrize("module", ["convert", "eval", "finetune"])
def test_signal_during_start_up_is_one_line(tiny, tmp_path, module, sig):
    args = {"convert": [tiny / "base", "-o", tmp_path / "out"], "eval": [tiny / "base", "--out", tmp_path / "o"],
            "finetune": [tiny / "r.yaml", "-o", tmp_path / "run"]}[module]
    proc = Proc(f"nha_convert.cli.{module}", *args)
    time.sleep(0.3)  # importing: the runner has not started yet, or has just started the command's imports
    code, err = proc.interrupt(sig=sig)
    assert code == 128 + sig and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == ("interrupted" if sig == signal.SIGINT else "terminated"), err
    assert list(tmp_path.iterdir()) == []
