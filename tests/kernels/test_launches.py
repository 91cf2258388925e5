"""What one forward + backward of the kernels launches at the training shapes, counted without a GPU
(kernels/tools/launch_count.py: meta tensors, Triton launches recorded instead of run). At these shapes the time per
call is the host's launches, not the GPU's work (issue 30): this list is the budget, and no launch may wait for the
GPU (a host sync). tests/gpu/test_kernels_gpu.py checks the same "no sync" on the GPU."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "kernels" / "tools"))

import launch_count as lc  # noqa: E402

# Session 15 (CPU analysis): 82 launches per call before (67 torch ops: the sink-gradient scatter, the shift of the
# slot gradients, the gate-gradient tail), 12 host syncs in the first call of a step (the layout's tables).
TRITON = Counter({"_span_local_kernel": 1, "_span_scan_tree_kernel": 4, "_chunk_walk_kernel": 1,
                  "_nha_fwd_par_kernel": 1, "_delta_kernel": 1, "_bwd_band_kv_kernel": 1, "_bwd_band_q_kernel": 1,
                  "_bwd_slot_q_kernel": 1, "_bwd_slot_rlocal_kernel": 1, "_bwd_slot_kv_kernel": 1,
                  "_gate_grad_kernel": 2})
TORCH = Counter({"_to_copy": 3, "stack": 2, "zeros": 2, "cumsum": 1, "index": 1, "sub": 1, "mul_": 1})


@pytest.mark.parametrize("shape,seq,window", [("smollm2", 1024, 64), ("llama", 2048, 512)])
def test_training_call_launches_and_never_syncs(shape, seq, window):
    step = lc.training_step(lc.SHAPES[shape], rows=8, seq=seq, docs=4, window=window, sinks=4)
    first, first_syncs = lc.record(step, warm=0)  # builds the step's two layouts (shared by every layer)
    launches, syncs = lc.record(step, warm=0)
    assert first_syncs == [] and syncs == []
    assert Counter(n for k, n in launches if k == "triton") == TRITON
    assert Counter(n for k, n in launches if k == "torch") == TORCH and len(launches) == 26
    assert len(first) <= 110 and all(kind != "copy" or "async" in name for kind, name in first)
