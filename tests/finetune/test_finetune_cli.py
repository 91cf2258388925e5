"""The nha-finetune command: --check, one-line errors, Ctrl-C then --resume (2 processes: test_finetune_distributed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.cli import default_signals
from tests.helpers.finetune import recipe_text, save_tiny_base, write_corpus

ROOT = Path(__file__).resolve().parents[2]
STAGES = """
stages:
  - kind: distill
    name: lora
    trains: lora
    lora: {r: 4}
    steps: 6
    batch_size: 2
    grad_accum: 2
    seq_len: 32
    eval_rows: 2
    ce_weight: 0.5
  - kind: finetune
    trains: attention
    steps: 4
    batch_size: 2
    seq_len: 32
    eval_rows: 2
"""


def _cli(*args, **kw):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "nha_convert.cli.finetune", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=600, **kw)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    base, data = save_tiny_base(root / "base"), write_corpus(root / "data")
    path = root / "r.yaml"
    path.write_text(recipe_text(base, data, root / "run", STAGES))
    return path


def test_check_prints_the_resolved_stages(recipe):
    r = _cli(recipe, "--check", "--set", "stages.lora.minutes=0.5")
    assert r.returncode == 0, r.stderr
    assert "0: lora (distill), trains lora, 0.5 minutes" in " ".join(r.stderr.split())
    assert "1: finetune (finetune), trains attention, 4 steps" in " ".join(r.stderr.split())


def test_bad_recipe_is_one_line_error(recipe, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(recipe.read_text().replace("    grad_accum: 2", "    grad_acum: 2"))
    r = _cli(bad)
    assert r.returncode == 1
    assert r.stderr.startswith(f"error: {bad}:")
    assert "unknown field 'stages[0].grad_acum'; did you mean 'grad_accum'?" in " ".join(r.stderr.split())
    assert "Traceback" not in r.stderr


def test_ctrl_c_saves_and_resume_finishes(recipe, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "nha_convert.cli.finetune", str(recipe), "-o", str(run),
           "--set", "stages.lora.steps=400"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=default_signals)  # Ctrl-C reaches it however the suite was started
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and any('"loss"' in line for line in metrics.read_text().splitlines()):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "--resume" in err and "interrupted after step" in " ".join(err.split())
    assert not (run / "model").exists() and any((run / "checkpoints").iterdir())
    stopped = max(json.loads(line)["global_step"] for line in metrics.read_text().splitlines())
    assert stopped < 404

    r = _cli(recipe, "-o", run, "--resume", "--set", "stages.lora.steps=400", "--set", "stages.lora.max_minutes=0.05")
    assert r.returncode == 0, r.stderr
    assert (run / "model" / "model.safetensors").is_file()
    assert "resuming from" in r.stderr
