"""`--budget smoke` of the 8B recipes (a hardware check before the download) and the full-run projection it prints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from nha_convert.cli import finetune as cli
from nha_convert.errors import NHAError
from nha_convert.finetune import budget as B
from nha_convert.finetune.recipe import read_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
EIGHT_B = ["llama-3-8b", "qwen2.5-7b", "qwen3-8b"]


@pytest.mark.parametrize("name", EIGHT_B)
def test_smoke_budget_parses_and_keeps_the_per_gpu_settings(name, run_cli):
    path = RECIPES / f"{name}.yaml"
    code, _, err = run_cli(cli.main, "nha-finetune", str(path), "--budget", "smoke", "--check",
                           "--set", f"model.base={name}-random")
    assert code == 0, err
    assert "budget: smoke" in err and "4 steps, batch 1 x accum 4, seq_len 8192" in err
    full, smoke = read_recipe(path, budget=None), read_recipe(path, budget="smoke")
    for f, s in zip(full.stages, smoke.stages, strict=True):  # a smoke step does the per-GPU work of a full step
        assert (s.batch_size, s.grad_accum, s.seq_len, s.trains, s.gradient_checkpointing) == \
               (f.batch_size, f.grad_accum, f.seq_len, f.trains, f.gradient_checkpointing)
        assert s.steps == 4 and f.tokens is not None
    assert smoke.model.nha == full.model.nha and {x.kind for x in smoke.data.sources} == {"shakespeare", "retrieval"}
    assert smoke.output.log_every == 1 and smoke.output.checkpoint_every == 0


def _metrics(path: Path) -> Path:
    lines = [{"event": "stage_start", "stage": "transfer"}]
    lines += [{"stage": "transfer", "step": i, "time_s": 10.0 + 2.0 * (i - 1), "peak_mem_gib": 40.0 + i,
               "loss": 1.0} for i in range(1, 5)]  # the first step (10 s) warms up; then 2 s a step
    lines += [{"event": "eval", "stage": "transfer", "step": 4}]
    lines += [{"stage": "distill", "step": i, "time_s": 5.0 * i, "loss": 1.0} for i in range(1, 5)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_projection_multiplies_measured_step_times_by_the_full_step_counts(tmp_path):
    full = read_recipe(RECIPES / "llama-3-8b.yaml", budget=None)
    metrics = _metrics(tmp_path / "metrics.jsonl")
    measured = B.measured_step_times(metrics)
    assert measured == {"transfer": (2.0, 3, 44.0, 16.0), "distill": (5.0, 3, None, 20.0)}
    costs = B.project(full.stages, measured)
    transfer, distill = costs
    assert transfer.steps == {1: math.ceil(15_000_000 / (4 * 2 * 2048)), 8: math.ceil(15_000_000 / (64 * 2048))}
    assert distill.steps == {1: math.ceil(30_000_000 / (4 * 8192)), 8: math.ceil(30_000_000 / (32 * 8192))}
    assert transfer.hours[8] == pytest.approx(transfer.steps[8] * 2.0 / 3600)
    text = B.cost_report(full.stages, metrics, run_seconds=100.0, device="cpu", out=tmp_path / "cost.json")
    total_1 = (transfer.steps[1] * 2.0 + distill.steps[1] * 5.0 + 64.0) / 3600  # + the 64 s outside the steps
    assert f"{total_1:.2f} GPU-h" in text and "1.1 min measured outside the steps" in text
    saved = json.loads((tmp_path / "cost.json").read_text())
    assert saved["other_s"] == 64.0 and [s["stage"] for s in saved["stages"]] == ["transfer", "distill"]


def test_projection_names_a_stage_without_timed_steps(tmp_path):
    full = read_recipe(RECIPES / "llama-3-8b.yaml", budget=None)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"stage": "transfer", "step": 1, "time_s": 3.0}) + "\n")
    with pytest.raises(NHAError, match="stage transfer: no step time measured"):
        B.project(full.stages, B.measured_step_times(metrics))


@pytest.mark.parametrize("name", ["qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-hybrid"])
@pytest.mark.parametrize("budget", ["cpu", "gpu"])
def test_qwen_coder_recipes_parse(name, budget):
    r = read_recipe(RECIPES / f"{name}.yaml", budget=budget)
    assert r.model.base == "qwen2.5-coder-0.5b"
    assert (r.model.nha.get("full_layers") == "auto:2") == name.endswith("hybrid")
    if budget == "gpu":  # training leaves room for building, loading and evaluating in one 10-minute device call
        assert sum(s.minutes for s in r.stages) <= 6.5


def test_bench_8b_counts_the_nha_kernels_share_of_device_time():
    from collections import namedtuple

    from tests.helpers.scripts import load_benchmark

    bench = load_benchmark("bench_8b")
    assert {"_nha_fwd_kernel", "_bwd_slot_kv_kernel", "_decode_kernel"} <= bench.op_kernel_names()
    E = namedtuple("E", "key self_device_time_total device_type")
    events = [E("_nha_fwd_kernel", 30.0, "DeviceType.CUDA"), E("nvjet_gemm_bf16", 60.0, "DeviceType.CUDA"),
              E("_bwd_band_q_kernel", 10.0, "DeviceType.CUDA"), E("aten::mm", 500.0, "DeviceType.CPU")]
    assert bench.nha_share(events) == 0.4  # CPU-side ops are not device time
