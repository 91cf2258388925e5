"""nha-finetune on 2 GPUs under `accelerate launch`, DDP and FSDP2, against 1 GPU at the same global batch.

A tiny NHA model (random weights, byte tokenizer, local text) keeps the run short; what is checked is the
multi-process machinery: data sharding, gradient reduction, the FSDP wrap / gather into an unsharded copy at each
stage end, atomic checkpoints written by every process, and the final folder. The CPU twin (gloo, runs in CI) is
tests/finetune/test_finetune_distributed.py. Needs 2 CUDA devices:
`PYTHONPATH=$PWD:$PWD/kernels python -m pytest tests/gpu/test_finetune_multi_gpu.py -q` (nvidia-h200-x2).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if torch.cuda.device_count() < 2:
    pytest.skip("needs 2 CUDA devices", allow_module_level=True)

from tests.helpers.finetune import losses, stages_for  # noqa: E402
from tests.helpers.finetune import recipe_text, save_tiny_base, write_corpus  # noqa: E402

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]


def _run(tmp: Path, name: str, processes: int, launcher: list[str]) -> Path:
    base, data = tmp / "base", tmp / "data"
    if not base.exists():
        save_tiny_base(base, tie=True)
        write_corpus(data)
    recipe = tmp / f"{name}.yaml"
    recipe.write_text(recipe_text(base, data, tmp / name, stages_for(processes)))
    # The torch op keeps the run free of kernel compilation: the kernels have their own GPU suite.
    env = {**os.environ, "NHA_BACKEND": "torch",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'kernels'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [*launcher, "-m", "nha_convert.cli.finetune", str(recipe), "--overwrite"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return tmp / name


@pytest.fixture(scope="module")
def one_gpu(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multi")
    return tmp, _run(tmp, "one", 1, [sys.executable])


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_gpus_follow_the_one_gpu_loss_curve(one_gpu, mode):
    tmp, one = one_gpu
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2"]
    launch += ["--multi_gpu"] if mode == "ddp" else ["--config_file", str(ROOT / "recipes" / "accelerate-fsdp.yaml")]
    two = _run(tmp, mode, 2, launch)
    a, b = losses(one), losses(two)
    assert [x[:2] for x in a] == [x[:2] for x in b] and len(a) == 10
    for (stage, step, la), (_, _, lb) in zip(a, b):  # same rows, same order; only the reduction order differs
        assert abs(la - lb) <= 1e-3 * max(1.0, abs(la)), (mode, stage, step, la, lb)
    starts = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines() if '"stage_start"' in x]
    assert {s["devices"] for s in starts} == {2} and {s["global_batch"] for s in starts} == {2}
    import nha_convert

    m1 = nha_convert.load(one / "model", dtype=torch.float32, device="cuda")
    m2 = nha_convert.load(two / "model", dtype=torch.float32, device="cuda")
    ids = torch.randint(0, 256, (2, 40), device="cuda")
    with torch.no_grad():
        l1, l2 = m1(ids).logits, m2(ids).logits
    assert ((l1 - l2).norm() / l1.norm()).item() <= 1e-3
