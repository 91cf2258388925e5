"""The decode kernel's tile settings, timed: one step for a batch of Llama-3-8B layers, per setting (CUDA only).

    python kernels/tools/decode_sweep.py                         # the default grid, batch 64
    python kernels/tools/decode_sweep.py --slots 32 64 --warps 4 8 --stages 1 2 --json out.json

Each setting of `decode.DECODE_TILES` (slots and ring entries per block, warps, pipeline stages, a register cap)
is timed as bench_kernels.py's decode row (bench_common.time_decode: a CUDA-graph replay of one step, state
prefilled with w + 37 tokens) against reading the state once at the measured copy bandwidth. Then the best
setting's step is profiled (GPU time per kernel of the step: the main kernel against the small ones).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "kernels"), str(ROOT)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="\n".join(__doc__.split("\n")[1:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--slots", type=int, nargs="+", default=[16, 32, 64], help="slots per block")
    ap.add_argument("--ring", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--stages", type=int, nargs="+", default=[1])
    ap.add_argument("--maxnreg", type=int, nargs="+", default=[0], help="register cap per thread (0: none)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch
    from bench_common import copy_bandwidth, time_decode
    from bench_kernels import DECODE, decode_state_bytes
    from nha_kernels import decode

    bw = copy_bandwidth()
    floor_us = decode_state_bytes(args.batch, DECODE) / bw * 1e6
    s = DECODE
    rows = []
    print(f"decode B={args.batch}, {s.hq}/{s.hkv} heads, d={s.d}, m={s.m}, w={s.window}; state read once "
          f"{floor_us:.1f} us at {bw / 1e12:.2f} TB/s")
    print(f"{'slots':>6} {'ring':>5} {'warps':>5} {'stages':>6} {'maxnreg':>7} {'us':>8} {'x floor':>8}")
    default = dict(decode.DECODE_TILES)
    for sl, ring, warps, stages, mx in itertools.product(args.slots, args.ring, args.warps, args.stages, args.maxnreg):
        decode.DECODE_TILES.update(slots=sl, ring=ring, num_warps=warps, num_stages=stages, maxnreg=mx or None)
        try:
            us = time_decode(args.batch, s.hq, s.hkv, s.d, s.m, s.window, sinks=s.sinks, long_context=False)["ms"] * 1e3
        except Exception as e:  # a setting that does not compile (shared memory, registers) is a row, not an end
            print(f"{sl:>6} {ring:>5} {warps:>5} {stages:>6} {mx:>7}  failed: {type(e).__name__}: {str(e)[:80]}")
            rows.append(dict(slots=sl, ring=ring, num_warps=warps, num_stages=stages, maxnreg=mx, error=str(e)[:200]))
            continue
        print(f"{sl:>6} {ring:>5} {warps:>5} {stages:>6} {mx:>7} {us:8.1f} {us / floor_us:8.2f}", flush=True)
        rows.append(dict(slots=sl, ring=ring, num_warps=warps, num_stages=stages, maxnreg=mx, us=us))
    ok = [r for r in rows if "us" in r]
    best = min(ok, key=lambda r: r["us"]) if ok else None
    decode.DECODE_TILES.clear()
    decode.DECODE_TILES.update(default if best is None else
                               dict(slots=best["slots"], ring=best["ring"], num_warps=best["num_warps"],
                                    num_stages=best["num_stages"], maxnreg=best["maxnreg"] or None))
    prof_rows = profile_step(args.batch) if best else []
    if args.json:
        args.json.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                             batch=args.batch, floor_us=floor_us, copy_bw=bw, default=default,
                                             rows=rows, best=best, profile=prof_rows), indent=1))


def profile_step(batch: int) -> list[dict]:
    """GPU time per kernel of 20 eager decode steps at the current tiles."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from bench_common import decode_setup
    from nha_kernels.decode import nha_decode_step
    from bench_kernels import DECODE as s

    st, step = decode_setup(batch, s.hq, s.hkv, s.d, s.m, s.window, s.sinks)
    for _ in range(3):
        nha_decode_step(st, *step, scale=s.d**-0.5)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            nha_decode_step(st, *step, scale=s.d**-0.5)
        torch.cuda.synchronize()
    out = []
    print("\nGPU time per kernel of one eager step (us, 20 steps):")
    for e in sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total):
        if e.self_device_time_total <= 0:
            continue
        us = e.self_device_time_total / 20
        print(f"  {us:8.1f}  x{e.count // 20}  {e.key[:90]}")
        out.append(dict(kernel=e.key, us_per_step=us, calls_per_step=e.count / 20))
    return out


if __name__ == "__main__":
    main()
