"""One GPU call: the GPU test suite, the compiler's resource report, and timings of kernel variants.

    python kernels/tools/gpu_check.py [--skip-tests] [--quick] [--out DIR]

Prints a short table last; writes gpu_check.json (and the pytest log) under --out (default $OUT or .).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

ROOT = Path(__file__).resolve().parents[2]  # run by path from anywhere: the checkout's nha_kernels and nha_convert
sys.path[:0] = [str(ROOT / "kernels"), str(ROOT)]

from bench_common import bench, copy_bandwidth, inputs, nha_bytes, time_decode  # noqa: E402
from nha_convert.backend import triton_chunk as nha_chunk_triton  # noqa: E402
from nha_kernels.chunk_fwd import LAST_COMPILED, FwdConfig, nha_fwd  # noqa: E402


def add(rows: list, row: tuple) -> None:
    """Record a summary row and print it at once (a run cut short by its time limit still shows what it measured)."""
    rows.append(row)
    print(f"{row[0]:55s} {row[1]}", flush=True)


SERIAL = FwdConfig(rows=128, bn=64, span=1024, cs=64, num_warps=8, num_stages=1)
PARALLEL = FwdConfig(rows=128, bn=64, span=64, cs=64, num_warps=8, num_stages=1, parallel=True)  # scan, no walk


@contextlib.contextmanager
def bwd_mode(mode: str | None):
    """The slot K/V backward launches (NHA_BWD_KV: split | split2) inside the block; None: as set."""
    from nha_convert import backend

    if mode is None:
        yield
        return
    with backend.overriding(bwd_kv=mode):
        yield


def check_against_reference(rows: list, bwd_modes: list[str]) -> dict:
    """Both forward kernels against the fp32 reference: output and all six gradients (T = 4096, 32/8 heads, d = 128,
    m = 64, 4 sinks), and packed sequences (forward + final state per document)."""
    from nha_convert.ops import nha_chunk

    out = {}
    b, hq, h, t, d, m = 1, 32, 8, 4096, 128, 64
    xs = [x.detach().requires_grad_(True) for x in inputs(b, hq, h, t, d, m, seed=1)]
    grad = torch.randn(b, hq, t, d, device="cuda", dtype=torch.bfloat16)
    ref_in = [x.detach().float().requires_grad_(True) for x in xs]
    for w in (64, 512):
        ref = nha_chunk(*ref_in, window=w, num_sinks=4, scale=d**-0.5)[0]
        gr = torch.autograd.grad(ref, ref_in, grad.float(), allow_unused=True)
        forms = [("serial", SERIAL, None), ("parallel scan", PARALLEL, None), ("default", None, None)]
        forms += [(f"default bwd={mode}", None, mode) for mode in bwd_modes[1:]]
        for name, cfg, mode in forms:
            with bwd_mode(mode):
                o = nha_chunk_triton(*xs, window=w, num_sinks=4, scale=d**-0.5, config=cfg)[0]
                gk = torch.autograd.grad(o, xs, grad, allow_unused=True)
            errs = [((a.float() - b_).norm() / b_.norm()).item() for a, b_ in zip([o, *gk], [ref, *gr])
                    if b_ is not None]
            out[f"{name} w={w}"] = max(errs)
            add(rows, (f"check {name} w={w} T=4096 (out + 6 grads)", f"max rel error {max(errs):.2e}"))
    cu = torch.tensor([0, 100, 1300, 1301, 2500, 4000], dtype=torch.int32, device="cuda")
    ys = [y.detach()[..., :4000, :] for y in inputs(1, hq, h, 4000, d, m, seed=2)]
    cfg = FwdConfig(rows=128, bn=64, span=64, cs=64, num_warps=8, num_stages=1, parallel=True)
    o, st = nha_chunk_triton(*ys, window=64, num_sinks=4, scale=d**-0.5, cu_seqlens=cu, return_state=True,
                             config=cfg)
    worst = 0.0
    for n, (a, e) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        ref, st_ref = nha_chunk(*[y[:, :, a:e].float() for y in ys[:5]], ys[5][:, :, a:e], window=64, num_sinks=4,
                                scale=d**-0.5, return_state=True)
        worst = max(worst, ((o[:, :, a:e].float() - ref).norm() / ref.norm()).item(),
                    ((st.k[n] - st_ref.k[0]).norm() / st_ref.k[0].norm().clamp_min(1e-12)).item())
    out["parallel packed"] = worst
    add(rows, ("check parallel packed (out + state)", f"max rel error {worst:.2e}"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tests-k", default=None, help="pytest -k expression for the GPU suite")
    ap.add_argument("--fla", action="store_true", help="time fla's chunk_gsa (needs fla on the path)")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--bwd-modes", default="split",
                    help="comma list of NHA_BWD_KV modes to check and time fwd+bwd with (first = default)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    print(res, flush=True)
    rows: list[tuple[str, str]] = []

    if not args.skip_tests:
        t0 = time.time()
        cmd = [sys.executable, "-m", "pytest", "tests/gpu", "-q", "-rA", "-s", "-p", "no:cacheprovider"]
        p = subprocess.run(cmd + (["-k", args.tests_k] if args.tests_k else []), capture_output=True, text=True,
                           cwd=ROOT)
        log = p.stdout + p.stderr
        open(os.path.join(args.out, "gpu_tests.log"), "w").write(log)
        last = [ln for ln in log.splitlines() if ln.strip()][-1]
        print("\n".join(ln for ln in log.splitlines() if "rel error" in ln or "FAILED" in ln or "Error" in ln)[-6000:])
        add(rows, ("gpu tests", f"{last} ({time.time() - t0:.0f}s, rc={p.returncode})"))

    bwd_modes = args.bwd_modes.split(",")
    res["checks"] = check_against_reference(rows, bwd_modes)
    bw = copy_bandwidth()
    res["copy_bw_TBps"] = bw / 1e12
    add(rows, ("copy bandwidth", f"{bw / 1e12:.2f} TB/s"))

    b, hq, h, t, d, m = 1, 32, 8, 32768, 128, 64
    xs = inputs(b, hq, h, t, d, m)
    floor_ms = nha_bytes(b * t, hq, h, d, m) / bw * 1e3
    res["fwd_floor_ms"] = floor_ms
    add(rows, ("fwd HBM floor T=32K", f"{floor_ms:.3f} ms ({nha_bytes(b * t, hq, h, d, m) / 1e9:.2f} GB)"))

    from torch.profiler import ProfilerActivity, profile
    q_rot, k_rot, v = xs[1], xs[3], xs[4]
    kr, vr = k_rot.repeat_interleave(hq // h, 1), v.repeat_interleave(hq // h, 1)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        sdpa = bench(lambda: F.scaled_dot_product_attention(q_rot, kr, vr, is_causal=True), rep=100)
    res["sdpa_fwd_ms"] = sdpa
    add(rows, ("SDPA flash causal fwd T=32K", f"{sdpa:.3f} ms"))
    del kr, vr

    ser, par = SERIAL, PARALLEL
    variants = [("serial", ser), ("par", par), ("par walk1024", replace(par, state_span=1024))]
    if not args.quick:
        variants += [
            ("par noexact", replace(par, exact=False)),
            ("par maxnreg128", replace(par, maxnreg=128)),
            ("par maxnreg168", replace(par, maxnreg=168)),
            ("par r64 nw4", replace(par, rows=64, num_warps=4)),
            ("par r64 nw4 maxnreg168", replace(par, rows=64, num_warps=4, maxnreg=168)),
            ("par ns2", replace(par, num_stages=2)),
            ("par ck128", replace(par, span=128)),
            ("par bn32", replace(par, bn=32)),
        ]
    res["fwd"] = []
    best: dict = {}
    for w in (64, 512):
        for name, cfg in variants if w == 64 else variants[:3]:
            kw = dict(window=w, num_sinks=0, scale=d**-0.5, valid=None, cu_seqlens=None, config=cfg)
            try:
                ms = bench(lambda: nha_fwd(*xs, **kw), rep=100)
            except Exception as e:  # a variant that does not compile (shared memory) is a result too
                add(rows, (f"NHA fwd w={w} {name}", f"failed: {type(e).__name__}: {str(e)[:80]}"))
                continue
            ck = LAST_COMPILED.get("fwd")
            regs, spills = getattr(ck, "n_regs", -1), getattr(ck, "n_spills", -1)
            res["fwd"].append(dict(window=w, name=name, config=cfg.__dict__, ms=ms, regs=regs, spills=spills))
            if w == 64 and name != "serial" and cfg.exact and ms < best.get("ms", 1e9):
                best = dict(ms=ms, name=name, cfg=cfg)
            add(rows, (f"NHA fwd w={w} {name}",
                         f"{ms:.3f} ms  x{sdpa / ms:.1f} vs SDPA  {ms / floor_ms:.2f}x floor  regs={regs} spills={spills}"))

    if args.fla:
        try:
            from fla.ops.gsa import chunk_gsa
            qq, kk, vv = (x.detach().transpose(1, 2).contiguous() for x in (xs[0], xs[2], xs[4]))
            s_ = torch.randn(b, t, h, m, device="cuda", dtype=torch.bfloat16)
            gg = xs[5].detach().transpose(1, 2).contiguous().bfloat16()
            with torch.no_grad():
                gsa = bench(lambda: chunk_gsa(qq, kk, vv, s_, gg, scale=d**-0.5)[0], rep=50)
            res["fla_chunk_gsa_fwd_ms"] = gsa
            add(rows, ("fla chunk_gsa fwd T=32K m=64", f"{gsa:.3f} ms"))
        except Exception as e:
            add(rows, ("fla chunk_gsa", f"failed: {type(e).__name__}: {str(e)[:150]}"))

    # Forward + backward at the target shape (w = 64, no sinks as in the benchmark) against SDPA flash.
    xg = [x.detach().requires_grad_(True) for x in xs]
    grad = torch.randn(b, hq, t, d, device="cuda", dtype=torch.bfloat16)
    fb_cfgs = [("serial", ser), ("par", par)] + ([(best["name"], best["cfg"])] if best and best["name"] != "par" else [])
    for name, cfg in fb_cfgs:
        def nha_fb(cfg=cfg):
            for x in xg:
                x.grad = None
            nha_chunk_triton(*xg, window=64, num_sinks=0, scale=d**-0.5, config=cfg)[0].backward(grad)
        fb = bench(nha_fb, rep=30)
        res.setdefault("fwdbwd", {})[name] = fb
        add(rows, (f"fwd+bwd T=32K w=64 {name}", f"NHA {fb:.3f} ms"))
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            nha_fb()
            torch.cuda.synchronize()
        parts = {e.key: e.device_time_total / 1e3 for e in prof.key_averages() if e.device_time_total > 0}
        res.setdefault("fwdbwd_breakdown", {})[name] = parts
        add(rows, (f"fwd+bwd breakdown {name}", ", ".join(f"{k[:22]}={v:.3f}ms" for k, v in
                                                             sorted(parts.items(), key=lambda kv: -kv[1])[:9])))
    for mode in bwd_modes[1:] if len(bwd_modes) > 1 else []:
        for w in (64, 512):
            def nha_fb_mode(w=w):
                for x in xg:
                    x.grad = None
                nha_chunk_triton(*xg, window=w, num_sinks=0, scale=d**-0.5)[0].backward(grad)
            with bwd_mode(mode):
                fb = bench(nha_fb_mode, rep=30)
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    nha_fb_mode()
                    torch.cuda.synchronize()
            res.setdefault("fwdbwd_modes", {})[f"{mode} w={w}"] = fb
            parts = {e.key: e.device_time_total / 1e3 for e in prof.key_averages() if e.device_time_total > 0}
            add(rows, (f"fwd+bwd T=32K w={w} default bwd={mode}", f"NHA {fb:.3f} ms; " + ", ".join(
                f"{k[:22]}={v:.3f}ms" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])[:5])))
    qg, kg, vg = (xs[1].detach().requires_grad_(True), xs[3].detach().repeat_interleave(4, 1).requires_grad_(True),
                  xs[4].detach().repeat_interleave(4, 1).requires_grad_(True))

    def sdpa_fb():
        for x in (qg, kg, vg):
            x.grad = None
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(qg, kg, vg, is_causal=True).backward(grad)
    sfb = bench(sdpa_fb, rep=20)
    res["sdpa_fwdbwd_ms"] = sfb
    add(rows, ("SDPA fwd+bwd T=32K", f"{sfb:.3f} ms"))
    del xg, qg, kg, vg, grad

    # Where the forward time goes: per-kernel device time from the profiler (w = 64, no sinks).
    for name, cfg in [("serial", ser), ("par", par)] + ([(best["name"], best["cfg"])] if best else []):
        for mm in (64, 0):
            ys = xs if mm == 64 else xs[:5] + [xs[5][..., :mm].contiguous()]
            kw = dict(window=64, num_sinks=0, scale=d**-0.5, valid=None, cu_seqlens=None, config=cfg)
            for _ in range(3):
                nha_fwd(*ys, **kw)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    nha_fwd(*ys, **kw)
                torch.cuda.synchronize()
            parts = {e.key: e.device_time_total / 5 / 1e3 for e in prof.key_averages() if e.device_time_total > 0}
            res.setdefault("fwd_breakdown", {})[f"{name} m={mm}"] = parts
            add(rows, (f"breakdown {name} w=64 m={mm}", ", ".join(f"{k[:22]}={v:.3f}ms" for k, v in
                                                                    sorted(parts.items(), key=lambda kv: -kv[1])[:4])))

    if args.no_decode:
        json.dump(res, open(os.path.join(args.out, "gpu_check.json"), "w"), indent=1)
        print("\n==== summary ====")
        for k, v in rows:
            print(f"{k:55s} {v}")
        return

    # Decode: batch 64, one step; state bytes read once is the floor.
    from nha_kernels import decode as dec_mod
    tiles = [dict(dec_mod.DECODE_TILES), dict(slots=32, ring=64, num_warps=8, num_stages=1),
             dict(slots=64, ring=128, num_warps=4, num_stages=2)]
    for w, tile in [(64, tiles[0]), (64, tiles[1]), (64, tiles[2]), (2048, tiles[0])]:
        dec_mod.DECODE_TILES.update(tile)
        bd = 64
        dec = time_decode(bd, hq, h, d, m, w, sinks=4)
        nbytes, eager, ms, ms_long = dec["state_bytes"], dec["eager_ms"], dec["ms"], dec["ms_at_1M"]
        floor = nbytes / bw * 1e3
        res.setdefault("decode", []).append(dict(window=w, batch=bd, ms=ms, ms_at_1M=ms_long, state_bytes=nbytes,
                                                  floor_ms=floor, tiles=tile))
        res["decode"][-1]["eager_ms"] = eager
        add(rows, (f"decode B=64 w={w} {tile}", f"{ms * 1e3:.1f} us graph (eager {eager * 1e3:.0f}; 1M ctx {ms_long * 1e3:.1f}), "
                     f"state {nbytes / 2**20:.1f} MiB read-once {floor * 1e3:.1f} us -> {ms / floor:.2f}x"))

    json.dump(res, open(os.path.join(args.out, "gpu_check.json"), "w"), indent=1)
    print("\n==== summary ====")
    for k, v in rows:
        print(f"{k:55s} {v}")


if __name__ == "__main__":
    main()
