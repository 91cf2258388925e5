"""Benchmark the NHA kernels against SDPA causal (flash), flex_attention sliding window and fla's chunk_gsa.

    python kernels/tools/bench_kernels.py [--seq 2048 8192 32768 131072] [--windows 64 512 2048] [--tokens 32768]
                                          [--flex-seq T ...] [--no-flex] [--no-bwd] [--out docs/bench/kernels.json]

Shapes follow the issue: 32 query / 8 KV heads, head dim 128, m = 64, bf16, random inputs; batch B = tokens // T
(at least 1) so that B * T stays constant where it fits. Times are medians of repeated runs after warm-up
(triton.testing.do_bench). The HBM floor is the bytes the op must move (each input read once, each output written
once) over the measured device-to-device copy bandwidth; "floor frac" is floor / measured time.
Prints a table and writes JSON (atomically) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

ROOT = Path(__file__).resolve().parents[2]  # run by path from anywhere: the checkout's nha_kernels and nha_convert
sys.path[:0] = [str(ROOT / "kernels"), str(ROOT)]

from nha_kernels import nha_chunk_triton  # noqa: E402

HQ, HKV, D, M = 32, 8, 128, 64


def bench(fn, rep=100):
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def copy_bandwidth() -> float:
    src = torch.randn(256 * 1024 * 1024, device="cuda", dtype=torch.bfloat16)  # 512 MiB
    dst = torch.empty_like(src)
    return 2 * src.numel() * 2 / (bench(lambda: dst.copy_(src)) * 1e-3)


def nha_bytes(b: int, t: int, backward: bool) -> int:
    """Bytes the NHA op must move: q, q_rot (Hq), k, k_rot, v (Hkv) in bf16, gates fp32, output bf16.
    The backward also reads dO and writes a gradient per input (the forward's reads again are not counted)."""
    fwd = b * t * (2 * HQ * D * 2 + 3 * HKV * D * 2 + HKV * M * 4 + HQ * D * 2)
    if not backward:
        return fwd
    return fwd + b * t * (HQ * D * 2 + 2 * HQ * D * 2 + 3 * HKV * D * 2 + HKV * M * 4)


def make(b, t, requires_grad=False, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda")  # noqa: E731
    xs = [r(b, HQ, t, D), r(b, HQ, t, D), r(b, HKV, t, D), r(b, HKV, t, D), r(b, HKV, t, D)]
    xs = [x.bfloat16().requires_grad_(requires_grad) for x in xs]
    la = (F.logsigmoid(2 + 2 * r(b, HKV, t, M)) / 8).requires_grad_(requires_grad)
    return xs + [la]


def fwd_bwd(fn, inputs, grad_out):
    def run():
        for x in inputs:
            x.grad = None
        fn().backward(grad_out)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[2048, 8192, 32768, 131072])
    ap.add_argument("--windows", type=int, nargs="+", default=[64, 512, 2048])
    ap.add_argument("--tokens", type=int, default=32768, help="B * T")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--flex-seq", type=int, nargs="*", default=None,
                    help="T values for flex_attention (default: every --seq up to 32K; each T compiles it again, "
                         "and create_block_mask builds a dense T x T mask first: 128 GiB at 128K)")
    ap.add_argument("--no-bwd", action="store_true")
    ap.add_argument("--bwd-max-seq", type=int, default=131072, help="skip fwd+bwd timings above this T")
    ap.add_argument("--out", default="docs/bench/kernels.json")
    args = ap.parse_args()
    if args.flex_seq is None:
        args.flex_seq = [t for t in args.seq if t <= 32768]
    scale = D**-0.5
    bw = copy_bandwidth()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "copy_bandwidth_TBps": bw / 1e12, "heads": [HQ, HKV], "head_dim": D, "slots": M, "dtype": "bf16",
              "rows": []}
    try:
        from fla.ops.gsa import chunk_gsa  # type: ignore[import-not-found]
    except ImportError:
        chunk_gsa = None
    result["fla_chunk_gsa"] = "installed" if chunk_gsa else "not installed"
    flex = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = torch.compile(flex_attention, dynamic=False)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    # Sanity check first: the timed configuration computes the reference function (fp32 reference, T = 4096).
    from nha_convert.ops import nha_chunk
    xs = make(1, 4096, requires_grad=True, seed=1)
    grad = torch.randn(1, HQ, 4096, D, device="cuda", dtype=torch.bfloat16)
    checks = {}
    for w in args.windows:
        out = nha_chunk_triton(*xs, window=w, num_sinks=4, scale=scale)[0]
        gk = torch.autograd.grad(out, xs, grad, allow_unused=True)
        ref_in = [x.detach().float().requires_grad_(True) for x in xs]
        ref = nha_chunk(*ref_in, window=w, num_sinks=4, scale=scale)[0]
        gr = torch.autograd.grad(ref, ref_in, grad.float(), allow_unused=True)
        errs = [((a.float() - b).norm() / b.norm()).item() for a, b in zip([out, *gk], [ref, *gr]) if b is not None]
        checks[w] = max(errs)
        print(f"check w={w}: max rel error over output and 6 gradients {max(errs):.2e}", flush=True)
    result["check_max_rel_error"] = checks
    del xs, grad

    table = []
    for t in args.seq:
        b = max(1, args.tokens // t)
        do_bwd = not args.no_bwd and t <= args.bwd_max_seq
        xs = make(b, t, requires_grad=do_bwd)
        q_rot, k_rot, v = xs[1], xs[3], xs[4]
        grad = torch.randn(b, HQ, t, D, device="cuda", dtype=torch.bfloat16)
        # SDPA flash with K/V expanded to the query heads outside the timed region (flash has no GQA here).
        kr = k_rot.detach().repeat_interleave(HQ // HKV, 1).requires_grad_(do_bwd)
        vr = v.detach().repeat_interleave(HQ // HKV, 1).requires_grad_(do_bwd)
        qr = q_rot.detach().requires_grad_(do_bwd)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            sdpa = lambda: F.scaled_dot_product_attention(qr, kr, vr, is_causal=True)  # noqa: E731
            with torch.no_grad():
                sdpa_f = bench(sdpa, rep=50 if t >= 32768 else 100)
            sdpa_fb = bench(fwd_bwd(sdpa, [qr, kr, vr], grad), rep=50) if do_bwd else None
        gsa = {}  # fla's chunk_gsa (slots only: no window, so once per T), layout (B, T, H, D), m = width of s and g
        if chunk_gsa is not None:
            gin = [x.detach().transpose(1, 2).contiguous().requires_grad_(do_bwd) for x in (xs[0], xs[2], xs[4])]
            s_ = torch.randn(b, t, HKV, M, device="cuda", dtype=torch.bfloat16, requires_grad=do_bwd)
            g_ = xs[5].detach().transpose(1, 2).contiguous().bfloat16().requires_grad_(do_bwd)
            run_gsa = lambda: chunk_gsa(*gin, s_, g_, scale=scale)[0]  # noqa: E731
            with torch.no_grad():
                gsa["gsa_fwd_ms"] = bench(run_gsa)
            if do_bwd:
                gsa["gsa_fwdbwd_ms"] = bench(fwd_bwd(run_gsa, [*gin, s_, g_], grad.transpose(1, 2).contiguous()), rep=50)
        for w in args.windows:
            row = dict(T=t, B=b, window=w, sdpa_fwd_ms=sdpa_f, sdpa_fwdbwd_ms=sdpa_fb)
            kw = dict(window=w, num_sinks=0, scale=scale)
            with torch.no_grad():
                row["nha_fwd_ms"] = bench(lambda: nha_chunk_triton(*xs, **kw)[0])
            if do_bwd:
                row["nha_fwdbwd_ms"] = bench(fwd_bwd(lambda: nha_chunk_triton(*xs, **kw)[0], xs, grad), rep=50)
            row["floor_fwd_ms"] = nha_bytes(b, t, False) / bw * 1e3
            row["floor_fwdbwd_ms"] = nha_bytes(b, t, True) / bw * 1e3
            if flex is not None and t in args.flex_seq:
                def sliding(bi, h, qi, ki, w=w):
                    return (qi >= ki) & (qi - ki < w)
                mask = create_block_mask(sliding, b, None, t, t, device="cuda")
                fl = lambda: flex(qr, kr, vr, block_mask=mask, scale=scale)  # noqa: E731
                with torch.no_grad():
                    row["flex_fwd_ms"] = bench(fl)
                if do_bwd:
                    row["flex_fwdbwd_ms"] = bench(fwd_bwd(fl, [qr, kr, vr], grad), rep=50)
            row.update(gsa)
            table.append(row)
            result["rows"].append(row)
            print(row, flush=True)
        del xs, kr, vr, qr, grad
        torch.cuda.empty_cache()
        write_json(result, args.out)

    hdr = (f"{'T':>7} {'B':>3} {'w':>5} | {'NHA fwd':>8} {'SDPA':>8} {'x':>6} {'flex':>8} {'floor':>7} {'frac':>5} | "
           f"{'NHA f+b':>8} {'SDPA f+b':>8} {'x':>6} {'flex f+b':>8} | {'gsa fwd':>8} {'gsa f+b':>8}")
    print(f"\n{result['device']}, copy {bw / 1e12:.2f} TB/s, 32/8 heads, d=128, m=64, bf16, times in ms (median)")
    print(hdr)
    print("-" * len(hdr))

    def f(x, n=8, p=3):
        return f"{x:{n}.{p}f}" if isinstance(x, float) else f"{'-':>{n}}"
    for r in table:
        fb = r.get("nha_fwdbwd_ms")
        print(f"{r['T']:>7} {r['B']:>3} {r['window']:>5} | {f(r['nha_fwd_ms'])} {f(r['sdpa_fwd_ms'])} "
              f"{f(r['sdpa_fwd_ms'] / r['nha_fwd_ms'], 6, 1)} {f(r.get('flex_fwd_ms'))} {f(r['floor_fwd_ms'], 7)} "
              f"{f(r['floor_fwd_ms'] / r['nha_fwd_ms'], 5, 2)} | {f(fb)} {f(r.get('sdpa_fwdbwd_ms'))} "
              f"{f(r['sdpa_fwdbwd_ms'] / fb if fb and r.get('sdpa_fwdbwd_ms') else None, 6, 1)} "
              f"{f(r.get('flex_fwdbwd_ms'))} | {f(r.get('gsa_fwd_ms'))} {f(r.get('gsa_fwdbwd_ms'))}")
    print(f"fla chunk_gsa: {result['fla_chunk_gsa']}")
    write_json(result, args.out)


def write_json(result: dict, out: str) -> None:
    """Atomically (after every T, so that a run cut short keeps what it measured)."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(out)), suffix=".json")
    with os.fdopen(fd, "w") as fh:
        json.dump(result, fh, indent=1)
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
