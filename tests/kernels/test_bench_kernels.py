"""kernels/tools/bench_kernels.py without a GPU: its command line, the byte arithmetic of the HBM and decode floors,
the packed training rows, the budget, the JSON writer and the tables. The timings themselves need CUDA (issue 13)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "kernels" / "tools"
sys.path.insert(0, str(TOOLS))

import bench_kernels as bk  # noqa: E402
from bench_common import nha_bytes  # noqa: E402


def test_default_is_the_issue_13_table():
    args = bk.parse_args([])
    assert args.preset == "issue13"
    assert (args.seq, args.windows, args.train_seq, args.decode) == ([32768], [64, 512], [1024, 2048, 4096], True)
    assert (args.flex, args.budget_s, args.train_batch, args.docs_per_row, args.decode_batch) == (False, 270.0, 8, 4, 64)
    assert args.flex_seq == [32768] and not args.no_bwd and not args.no_check
    assert args.train_8b == [(4, 2048), (1, 8192)]  # the 8B recipes' transfer and distill steps (issue 30)
    assert Path(args.out) == ROOT / "docs" / "bench" / "kernels.json"


@pytest.mark.parametrize("preset, seq, train_seq, decode", [
    ("training", [], [1024, 2048, 4096], False),
    ("decode", [], [], True),
    ("sweep", [2048, 8192, 32768, 131072], [], False),
])
def test_presets(preset, seq, train_seq, decode):
    args = bk.parse_args(["--preset", preset])
    assert (args.seq, args.train_seq, args.decode) == (seq, train_seq, decode)
    assert args.flex_seq == [t for t in seq if t <= 32768]


def test_flags_override_the_preset():
    args = bk.parse_args(["--preset", "training", "--seq", "8192", "--windows", "64", "--train-seq", "2048",
                          "--no-decode", "--flex", "--budget-s", "0", "--no-flex", "--out", "x.json"])
    assert (args.seq, args.windows, args.train_seq, args.decode) == ([8192], [64], [2048], False)
    assert args.flex and args.flex_seq == [8192] and args.budget_s == 0 and args.out == "x.json"
    assert bk.parse_args(["--seq", "--train-seq"]).seq == []  # no long rows, no training rows: decode only
    assert bk.parse_args(["--train-8b"]).train_8b == [] and bk.parse_args(["--train-8b", "2x4096"]).train_8b == [
        (2, 4096)]
    assert bk.parse_args(["--preset", "decode"]).train_8b == []


@pytest.mark.parametrize("argv", [["--budget-s", "-1"], ["--preset", "nope"], ["--train-seq", "8"],
                                  ["--docs-per-row", "0"], ["--windows", "0"], ["--train-8b", "4"],
                                  ["--train-8b", "0x2048"], ["--train-8b", "1x8"]])
def test_bad_command_lines_exit(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bk.parse_args(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_hbm_floor_bytes_by_hand():
    # 10 positions, 4 query / 2 KV heads, d = 8, m = 3, bf16: q, q_rot 2*4*8*2 = 128; k, k_rot, v 3*2*8*2 = 96;
    # gates fp32 2*3*4 = 24; output 4*8*2 = 64 -> 312 bytes a position. Backward: dO 64, dq + dq_rot 128,
    # dk + dk_rot + dv 96, d gates 24 -> 312 more.
    assert nha_bytes(10, 4, 2, 8, 3) == 3120
    assert nha_bytes(10, 4, 2, 8, 3, backward=True) == 6240
    assert nha_bytes(10, 4, 2, 8, 3, elt=4) == 10 * (2 * 4 * 8 * 4 + 3 * 2 * 8 * 4 + 24 + 4 * 8 * 4)
    # Issue 13's shape (T = 32K, 32/8 heads, d = 128, m = 64): exactly 1 GiB forward, 2 GiB forward + backward;
    # at its 4.17 TB/s that is 0.257 ms and 0.515 ms.
    assert nha_bytes(32768, 32, 8, 128, 64) == 2**30
    assert nha_bytes(32768, 32, 8, 128, 64, backward=True) == 2**31
    assert bk.floor_ms(2**31, 4.17e12) == pytest.approx(0.514984, abs=1e-6)  # 2147483648 B / 4.17e12 B/s
    # The training shape (9/3 heads, d = 64, m = 64): 2304 + 1152 + 768 + 1152 = 5376 bytes a position.
    assert nha_bytes(8 * 1024, 9, 3, 64, 64) == 8 * 1024 * 5376


def test_decode_state_bytes_by_hand():
    # Llama-3-8B layer, w = 64, m = 64, 4 sinks, bf16, per sequence: ring 64 * (8 * (3 * 128 * 2 + 64 * 4) + 2)
    # = 524416; sinks 4 * (8 * 2 * 128 * 2 + 8 + 1) = 16420; slots 8 * 64 * 2 * 128 * 4 + 8 = 524296; counter 8.
    per_seq = 524416 + 16420 + 524296 + 8
    assert bk.decode_state_bytes(1) == per_seq == 1065140
    assert bk.decode_state_bytes(64) == 64 * per_seq  # 65.0 MiB, the state docs/performance.md reports


def test_packed_rows_by_hand():
    # row 0: weights 1, 2, 3 of 6 -> cuts at 14 // 6 = 2 and 42 // 6 = 7; row 1: 2, 3, 1 -> 28 // 6 = 4, 70 // 6 = 11
    assert bk.packed_cu_seqlens(2, 14, 3) == [0, 2, 7, 14, 18, 25, 28]
    cu = bk.packed_cu_seqlens(8, 1024, 4)
    assert cu[:5] == [0, 146, 438, 877, 1024]  # weights 1, 2, 3, 1 of 7
    assert len(cu) == 8 * 4 + 1 and cu[-1] == 8 * 1024
    assert all(b > a for a, b in zip(cu, cu[1:]))
    assert {r * 1024 for r in range(9)} <= set(cu)  # no document crosses a row end


def test_packed_rows_are_what_the_model_derives_from_position_ids():
    from nha_convert.ops.packed import cu_seqlens_of

    rows, t, docs = 3, 96, 4
    cu = bk.packed_cu_seqlens(rows, t, docs)
    pos = torch.empty(rows * t, dtype=torch.long)
    for a, b in zip(cu, cu[1:]):
        pos[a:b] = torch.arange(b - a)
    assert cu_seqlens_of(pos.view(rows, t), rows).tolist() == cu


def test_budget(capsys):
    now = [100.0]
    budget = bk.Budget(10, clock=lambda: now[0])
    assert budget.allows("row a")
    now[0] = 109.9
    assert budget.allows("row b") and budget.skipped == []
    now[0] = 110.0
    assert not budget.allows("row c") and not budget.allows("row d")
    assert budget.skipped == ["skipped row c: 10 s elapsed, past --budget-s 10",
                              "skipped row d: 10 s elapsed, past --budget-s 10"]
    assert capsys.readouterr().out.splitlines() == budget.skipped
    unbounded = bk.Budget(0, clock=lambda: now[0])
    now[0] = 1e9
    assert unbounded.allows("anything") and unbounded.skipped == []


def test_write_json_atomic(tmp_path):
    out = tmp_path / "bench" / "kernels.json"
    bk.write_json({"rows": [1.5]}, out)
    bk.write_json({"rows": [2.5], "device": "x"}, out)
    assert json.loads(out.read_text()) == {"rows": [2.5], "device": "x"}
    with pytest.raises(TypeError):
        bk.write_json({"rows": [object()]}, out)
    assert json.loads(out.read_text()) == {"rows": [2.5], "device": "x"}  # the last good file stays
    assert os.listdir(out.parent) == ["kernels.json"]  # no temporary file left behind


def test_ratios():
    row = bk.add_ratios(dict(nha_fwd_ms=2.0, sdpa_flash_fwd_ms=25.0, sdpa_cudnn_note="n/a: cudnn forward: ...",
                             floor_fwd_ms=0.25, nha_fwdbwd_ms=10.0, sdpa_flash_fwdbwd_ms=90.0,
                             sdpa_cudnn_fwdbwd_ms=60.0))
    assert (row["x_flash_fwd"], row["x_floor_fwd"]) == (12.5, 8.0)
    assert (row["x_flash_fwdbwd"], row["x_cudnn_fwdbwd"]) == (9.0, 6.0)
    assert "x_cudnn_fwd" not in row and "x_floor_fwdbwd" not in row


def test_unavailable_reason():
    err = RuntimeError("No available kernel. Aborting execution.\ntraceback details")
    warns = ["cuDNN attention kernel not used because:\n  more", "", "cuDNN attention kernel not used because:",
             "Expected query, key and value to have head_dim <= 128"]
    assert bk.unavailable("cudnn forward", err, warns) == (
        "n/a: cudnn forward: RuntimeError: No available kernel. Aborting execution.; cuDNN attention kernel not used "
        "because:; Expected query, key and value to have head_dim <= 128")
    long = bk.unavailable("cudnn backward", ValueError("x" * 500))
    assert len(long) == 300 and long.endswith("...") and long.startswith("n/a: cudnn backward: ValueError: xxx")


def test_run_info(monkeypatch):
    monkeypatch.setenv("NHA_FWD", "serial")
    info = bk.run_info(["kernels/tools/bench_kernels.py", "--out", "a b.json"],
                       now=datetime(2026, 11, 30, 1, 2, 3, tzinfo=timezone.utc))
    assert info["command"] == f"{Path(sys.executable).name} kernels/tools/bench_kernels.py --out 'a b.json'"
    assert info["date"] == "2026-11-30T01:02:03Z" and info["env"]["NHA_FWD"] == "serial"


def test_tables():
    shapes = {"long": asdict(bk.LONG), "training": asdict(bk.TRAIN), "training_8b": asdict(bk.TRAIN_8B),
              "decode": asdict(bk.DECODE)}
    long_row = bk.add_ratios(dict(T=32768, B=1, window=64, nha_fwd_ms=2.0, sdpa_flash_fwd_ms=25.0, floor_fwd_ms=0.25,
                                  sdpa_cudnn_note="n/a: cudnn forward: RuntimeError: no kernel"))
    train_row = bk.add_ratios(dict(T=1024, B=8, docs_per_row=4, nha_fwd_ms=0.5, nha_fwdbwd_ms=3.0,
                                   sdpa_flash_fwd_ms=0.4, sdpa_cudnn_fwd_ms=0.3, sdpa_flash_fwdbwd_ms=1.5,
                                   sdpa_cudnn_fwdbwd_ms=1.2, floor_fwdbwd_ms=0.1))
    dec_row = dict(batch=64, window=64, state_bytes=bk.decode_state_bytes(64), floor_us=16.4, step_us=120.0,
                   x_floor=120.0 / 16.4, eager_us=130.0, step_us_at_1M=121.0)
    text = bk.format_tables(dict(device="GPU", torch="2", triton="3", copy_bandwidth_TBps=4.17, shapes=shapes,
                                 rows=[long_row], training=[train_row], decode=[dec_row], flex=bk.FLEX_NOTE,
                                 training_8b=[dict(train_row, T=8192, B=1)],
                                 skipped=["skipped long rows T=131072: 280 s elapsed, past --budget-s 270"]))
    lines = text.splitlines()
    assert any(ln.split()[:10] == ["32768", "1", "64", "2.000", "25.00", "12.5", "n/a", "-", "0.2500", "8.0"] for ln in lines)
    assert any(ln.split()[:3] == ["1024", "8", "4"] and ln.split()[-2:] == ["0.1000", "30.0"] for ln in lines)
    assert any(ln.split()[:4] == ["64", "64", "65.0", "16.4"] for ln in lines)
    assert any(ln.startswith("training 8b shapes, packed: 32/8 heads, d = 128, w = 512") for ln in lines)
    assert any(ln.split()[:3] == ["8192", "1", "4"] for ln in lines)
    assert "- SDPA cudnn at T=32768 B=1: n/a: cudnn forward: RuntimeError: no kernel" in lines
    assert f"- flex: {bk.FLEX_NOTE}" in lines and lines[-1].startswith("- skipped long rows T=131072")
    assert bk.format_tables(dict(shapes=shapes)).startswith("?, torch ?")  # nothing measured: a header, no crash


@pytest.mark.parametrize("x, cell", [(1526.4, "1526"), (441.3, "441.3"), (25.43, "25.43"), (2.01, "2.010"),
                                     (0.515, "0.5150"), (0.01058, "0.01058"), (0.000123, "0.00012"), (0.0, "0"),
                                     (None, "-"), ("n/a: cudnn forward: ...", "n/a"), (64, "64")])
def test_cells(x, cell):
    assert bk._cell(x) == cell


def test_main_without_cuda_exits_with_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        bk.main(["bench_kernels.py", "--preset", "decode"])
    assert e.value.code == ("bench_kernels.py: needs a CUDA GPU (torch.cuda.is_available() is False); "
                            "nothing was measured")


@pytest.mark.parametrize("script", ["bench_kernels.py", "gpu_check.py", "compile_check.py", "profile_training.py",
                                    "launch_count.py"])
def test_tools_run_by_path_from_anywhere(script, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, str(TOOLS / script), "--help"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith("usage: ")


def test_decode_compare_imports_an_earlier_kernel_beside_the_current_one():
    """kernels/tools/decode_compare.py loads another decode.py (its relative imports against the checkout's
    nha_kernels) without replacing the current module."""
    import decode_compare
    from nha_kernels import decode

    old = decode_compare.load_old(Path(decode.__file__))
    assert old is not decode and old.nha_decode_step is not decode.nha_decode_step
    assert old.DECODE_TILES == decode.DECODE_TILES and old.DECODE_TILES is not decode.DECODE_TILES


def test_span_sweep_gives_every_forward_and_backward_kernel_a_column():
    """A renamed kernel would fall silently into span_sweep.py's "other" column: each Triton kernel of the op
    has its own group, and only the delta and decode kernels are left to "other"."""
    import re

    import span_sweep

    # From the sources: test_kernels.py reloads triton for its interpreter, so isinstance(JITFunction) can miss.
    names = {name for src in (ROOT / "kernels" / "nha_kernels").glob("*.py")
             for name in re.findall(r"@triton\.jit\s*\ndef (\w+_kernel)\(", src.read_text())}
    assert len(names) >= 16 and "_bwd_slot_kv_kernel" in names  # every kernel file was read
    assert {n for n in names if span_sweep.group_of(n) == "other"} == span_sweep.UNGROUPED
    assert span_sweep.parse_args([]).spans == "auto,64,128,256,512"
