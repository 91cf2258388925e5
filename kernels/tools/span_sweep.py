"""How the state-span length changes the NHA op's forward and backward: times and per-kernel GPU time (CUDA only).

    python kernels/tools/span_sweep.py                                  # long 1 x 32K and training 64 x 1K, 16 x 4K
    python kernels/tools/span_sweep.py --spans auto,64,256 --shapes 64x1024 --out /tmp/sweep.json

Each span value L runs the op as NHA_FWD_STATE_SPAN=L would ("auto": the launcher's choice; 0: chunk states by one
scan over all chunks, as the variable says): the forward walks its chunk states from spans of L positions and the
backward sweeps spans of L, one program per (span, KV head).
Shorter spans give the backward more, shorter programs, and the reverse scan more spans to combine. Shapes: "long" is
bench_kernels.py's T = 32K row (Llama-3-8B attention, w = 64); "BxT" are its packed training rows (SmolLM2-135M
attention, 4 documents a row). The table gives milliseconds per call: forward, forward + backward, and the GPU time
of each backward kernel group (torch.profiler over --calls calls).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # run by path from anywhere: the checkout's nha_kernels and nha_convert
sys.path[:0] = [str(ROOT / "kernels"), str(ROOT)]

GROUPS = {  # kernel-name fragment -> column (first match wins)
    "_bwd_slot_q": "slot_q", "_bwd_slot_kv": "slot_kv", "_bwd_slot_rlocal": "rlocal", "_span_scan": "scans",
    "_bwd_band_q": "band_q", "_bwd_band_kv": "band_kv", "_chunk_walk": "walk", "_span_local": "span_local",
    "_nha_fwd": "fwd_main", "_gate_grad": "gate_grad",
}
UNGROUPED = {"_delta_kernel", "_decode_kernel", "_decode_flags_kernel", "_full_decode_kernel"}  # "other" on purpose


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="\n".join(__doc__.split("\n")[1:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="long,64x1024,16x4096", help="'long' and/or BxT training rows, comma separated")
    ap.add_argument("--spans", default="auto,64,128,256,512", help="state-span lengths ('auto': the launcher's choice)")
    ap.add_argument("--calls", type=int, default=5, help="calls profiled per setting")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    return ap.parse_args(argv)


def group_of(name: str) -> str:
    return next((g for frag, g in GROUPS.items() if frag in name), "other")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        sys.exit("span_sweep.py: needs a CUDA GPU; nothing was timed")
    from torch.profiler import ProfilerActivity, profile

    from bench_common import bench, inputs
    from bench_kernels import LONG, TRAIN, fwd_bwd, packed_cu_seqlens
    from nha_convert.backend import overriding
    from nha_convert.ops.packed import flatten_rows
    from nha_convert.backend import triton_chunk as nha_chunk_triton

    rows = []
    for shape in args.shapes.split(","):
        if shape == "long":
            s, t_len = LONG, 32768
            xs = [x.requires_grad_(True) for x in inputs(1, s.hq, s.hkv, t_len, s.d, s.m)]
            kw = dict(window=64, num_sinks=0, scale=s.d**-0.5, valid=None, cu_seqlens=None)
            grad = torch.randn_like(xs[0])
        else:
            b, t = (int(x) for x in shape.split("x"))
            s = TRAIN
            xs = [flatten_rows(x).contiguous().requires_grad_(True)
                  for x in inputs(b, s.hq, s.hkv, t, s.d, s.m, seed=4)]
            cu = torch.tensor(packed_cu_seqlens(b, t, 4), dtype=torch.int32)
            kw = dict(window=s.window, num_sinks=s.sinks, scale=s.d**-0.5, valid=None, cu_seqlens=cu)
            grad = torch.randn(1, s.hq, b * t, s.d, device="cuda", dtype=torch.bfloat16)
        ref = ref_grads = None
        for span in (None if x == "auto" else int(x) for x in args.spans.split(",")):
            with overriding(fwd_state_span=span):
                fwd = lambda: nha_chunk_triton(*xs, **kw)[0]  # noqa: E731
                with torch.no_grad():
                    out = fwd()
                if ref is None:
                    ref = out.float()
                err = (out.float() - ref).abs().max().item()
                step = fwd_bwd(fwd, xs, grad)
                step()
                grads = [x.grad.float().clone() for x in xs]
                with torch.no_grad():  # timed as bench_kernels.py times them
                    fwd_ms = bench(fwd)
                row = dict(shape=shape, span="auto" if span is None else span, fwd_ms=fwd_ms,
                           fwd_bwd_ms=bench(step, rep=50), out_diff=err)
                if ref_grads is None:
                    ref_grads = grads
                row["grad_diff"] = max((g - r).abs().max().item() / max(r.abs().max().item(), 1e-9)
                                       for g, r in zip(grads, ref_grads))
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(args.calls):
                        step()
                    torch.cuda.synchronize()
                per = defaultdict(float)
                for e in prof.key_averages():
                    if str(e.device_type).endswith("CUDA"):  # kernels, memsets, copies: GPU time
                        per[group_of(e.key)] += e.self_device_time_total / 1e3 / args.calls
                row.update({k: round(v, 4) for k, v in sorted(per.items())})
                rows.append(row)
                print(json.dumps(row), flush=True)
    cols = ["shape", "span", "fwd_ms", "fwd_bwd_ms", "slot_q", "slot_kv", "rlocal", "scans", "walk", "span_local",
            "fwd_main", "band_q", "band_kv", "gate_grad", "other", "grad_diff"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r.get(c, 0):.3f}" if isinstance(r.get(c, 0), float) else str(r.get(c, ""))
                                for c in cols) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
