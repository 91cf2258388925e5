"""nha-finetune on 2 processes (CPU, gloo) against 1 process at the same global batch: DDP and FSDP2.

Two processes with one row each must follow the one-process run with two rows (or two accumulated micro-batches of
one row) step for step: fp32 on CPU, the only difference is the order of the gradient sum. FSDP2 runs through accelerate's FSDP path, forced on CPU by
tests/accelerate_on_cpu.py. A stage-start checkpoint under FSDP2 is where a resumed run could drift (the sharded
optimizer save fills an empty AdamW with a step at lr 0, see checkpoints.forget_optimizer_state): resuming from one
must give the same final weights. The GPU twin of this file is tests/gpu/test_finetune_multi_gpu.py.
About 45 s.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.finetune import losses, recipe_text, save_tiny_base, stages_for, write_corpus

ROOT = Path(__file__).resolve().parents[2]

def _finetune(tmp: Path, name: str, *, processes: int, fsdp: bool = False, resume: bool = False) -> Path:
    base, data, recipe = tmp / "base", tmp / "data", tmp / f"{name}.yaml"
    if not base.exists():
        save_tiny_base(base, tie=True)
        write_corpus(data)
    recipe.write_text(recipe_text(base, data, tmp / name, stages_for(processes)))
    env = {**os.environ, "NHA_BACKEND": "torch", "ACCELERATE_USE_CPU": "true", "NHA_TEST_FSDP": str(int(fsdp)),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    launcher = [sys.executable] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    cmd = [*launcher, str(ROOT / "tests" / "accelerate_on_cpu.py"), str(recipe), "--resume" if resume else "--overwrite"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return tmp / name


def _weights(run: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted((run / "model").glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    return tmp, _finetune(tmp, "one", processes=1)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_follow_the_one_process_loss_curve(runs, mode):
    tmp, one = runs
    two = _finetune(tmp, mode, processes=2, fsdp=mode == "fsdp")
    a, b = losses(one), losses(two)
    assert [x[:2] for x in a] == [x[:2] for x in b] and len(a) == 10
    for (stage, step, la), (_, _, lb) in zip(a, b):
        assert abs(la - lb) <= 1e-5 * abs(la), (mode, stage, step, la, lb)
    starts = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines() if '"stage_start"' in x]
    assert {s["devices"] for s in starts} == {2} and {s["global_batch"] for s in starts} == {2}
    w1, w2 = _weights(one), _weights(two)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)


def test_fsdp_resume_from_a_stage_start_checkpoint_gives_the_same_weights(runs):
    tmp, _ = runs
    full = tmp / "fsdp"
    if not (full / "model").is_dir():
        _finetune(tmp, "fsdp", processes=2, fsdp=True)
    cut = tmp / "fsdp_cut"
    shutil.copytree(full, cut)
    ckpts = sorted((cut / "checkpoints").iterdir())
    starts = [c for c in ckpts if json.loads((c / "trainer_state.json").read_text())["step"] == 0]
    assert starts, [c.name for c in ckpts]
    for c in ckpts[ckpts.index(starts[-1]) + 1:]:
        shutil.rmtree(c)
    shutil.rmtree(cut / "model")
    (cut / "DONE").unlink()
    _finetune(tmp, "fsdp_cut", processes=2, fsdp=True, resume=True)
    w_full, w_cut = _weights(full), _weights(cut)
    for k in w_full:
        torch.testing.assert_close(w_cut[k], w_full[k], rtol=0, atol=0, msg=k)
