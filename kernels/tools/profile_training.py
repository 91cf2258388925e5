"""Where one NHA layer's forward + backward goes at the recipe's training shapes: a torch.profiler table (CUDA only).

    python kernels/tools/profile_training.py                                  # 64 x 1024 and 16 x 4096, 4 docs a row
    NHA_GATE_GRAD=torch python kernels/tools/profile_training.py --shapes 64x1024  # with the reference gate gradient

The rows are bench_kernels.py's training rows (SmolLM2-135M's attention: 9 query / 3 KV heads, d = 64, w = 64,
m = 64, 4 sinks; each row packed with uneven documents, one call over the flattened batch with cu_seqlens, as the
model's training path makes it). After --warmup calls, --calls calls are profiled; the table is sorted by CUDA time,
whose "avg" column is per call of each kernel or op. NHA_* variables pick the kernel variants (nha_convert/backend.py).
Session 7's profile in docs/performance.md (H200) was taken with these calls.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # run by path from anywhere: the checkout's nha_kernels and nha_convert
sys.path[:0] = [str(ROOT / "kernels"), str(ROOT)]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="\n".join(__doc__.split("\n")[1:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="64x1024,16x4096", help="rows x positions per step, comma separated")
    ap.add_argument("--docs-per-row", type=int, default=4, help="documents packed into each row")
    ap.add_argument("--warmup", type=int, default=3, help="calls before profiling (compiles the kernels)")
    ap.add_argument("--calls", type=int, default=5, help="calls profiled")
    ap.add_argument("--rows", type=int, default=25, help="rows of the printed table")
    args = ap.parse_args(argv)
    raw = args.shapes
    try:
        args.shapes = [tuple(int(x) for x in s.split("x")) for s in raw.split(",")]
        assert all(len(s) == 2 and min(s) > 0 for s in args.shapes)
    except (ValueError, AssertionError):
        ap.error(f"--shapes takes BxT pairs such as 64x1024,16x4096, got {raw!r}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        sys.exit("profile_training.py: needs a CUDA GPU (torch.cuda.is_available() is False); nothing was profiled")
    from torch.profiler import ProfilerActivity, profile

    from bench_common import inputs
    from bench_kernels import TRAIN, fwd_bwd, packed_cu_seqlens
    from nha_convert.ops.packed import flatten_rows
    from nha_convert.backend import triton_chunk as nha_chunk_triton

    s = TRAIN
    for b, t in args.shapes:
        xs = [flatten_rows(x).contiguous().requires_grad_(True) for x in inputs(b, s.hq, s.hkv, t, s.d, s.m, seed=4)]
        cu = torch.tensor(packed_cu_seqlens(b, t, args.docs_per_row), dtype=torch.int32)
        # valid=None, as the layer passes it in training: the layout is built once and shared (prep.make_layout)
        kw = dict(window=s.window, num_sinks=s.sinks, scale=s.d**-0.5, valid=None, cu_seqlens=cu)
        grad = torch.randn(1, s.hq, b * t, s.d, device="cuda", dtype=torch.bfloat16)
        step = fwd_bwd(lambda: nha_chunk_triton(*xs, **kw)[0], xs, grad)
        for _ in range(args.warmup):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.calls):
                step()
            torch.cuda.synchronize()
        print(f"=== {b} x {t}, {args.docs_per_row} documents a row, {args.calls} calls of forward + backward")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
