"""Compile the NHA kernels for sm_90 on a machine without a GPU and print the compiler's resource report.

    python kernels/tools/compile_check.py [VARIANT ...]

Catches compile errors before any device time is spent, and gives registers / spills / shared memory per variant
(the numbers METHOD.md asks to read first). Uses the ptxas bundled with the triton wheel.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ROOT = Path(__file__).resolve().parents[2]  # run by path from anywhere: the checkout's nha_kernels and nha_convert
sys.path[:0] = [str(ROOT / "kernels"), str(ROOT)]

from nha_kernels import chunk_fwd, decode  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


DIV16_INTS = {"T", "L", "NSPH"}  # run-time ints that are multiples of 16 in the benchmarked shapes


def compile_one(fn, sig: dict, consts: dict, num_warps=4, num_stages=2, maxnreg=None):
    """Compile as the launcher would: pointers (and T, L) specialised as 16-byte aligned / multiples of 16."""
    t0 = time.time()
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]]
             for n, ty in sig.items() if ty.startswith("*") or n in DIV16_INTS}
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    opts = dict(num_warps=num_warps, num_stages=num_stages)
    if maxnreg:
        opts["maxnreg"] = maxnreg
    k = triton.compile(src, target=TARGET, options=opts)
    return k, time.time() - t0


def fwd_variant(dtype="bf16", g=4, rows=64, bn=64, d=128, m=64, slots=True, sinks=True, nw=4, ns=2, mc=16, par=0, exact=True, maxnreg=None,
                slot_bias=False):
    """par = CK > 0: the chunk-parallel kernel (fwd_parallel.py) with state chunks of CK positions."""
    gp = 1 << (g - 1).bit_length()
    names = ["q", "qr", "k", "kr", "v", "la", "tok", "sink_pos", "span_table", "st_k", "st_v", "o", "o_lo", "lse",
             "slot_bias"]
    types = [f"*{dtype}"] * 5 + ["*fp32", "*i32", "*i32", "*i32", "*fp32", "*fp32", f"*{dtype}", f"*{dtype}", "*fp32",
                                 "*fp32"]
    sig = dict(zip(names, types))
    sig.update(T="i32", W="i32", S="i32", L="i32", SPANS_PER_ROW="i32", H="i32", NSPH="i32", scale="fp32")
    prec = "tf32x3" if dtype == "fp32" else "tf32"
    consts = dict(G=g, GP=gp, BM=rows // gp, BN=bn, D=d, DV=d, M=m, DP=d, DVP=d, MP=m, MC=mc, SP=16, HAS_SLOTS=slots,
                  SPLIT=dtype == "bf16", STORE_LO=False,
                  HAS_SINKS=sinks, VARLEN=False, PREC=prec, PREC_SLOT=prec, FAST_LIMIT=chunk_fwd.FAST_LIMIT,
                  HAS_SLOT_BIAS=slot_bias)
    fn = chunk_fwd._nha_fwd_kernel
    if par:
        from nha_kernels import fwd_parallel

        fn = fwd_parallel._nha_fwd_par_kernel
        del sig["NSPH"], consts["MC"]
        consts.update(CK=par, NSUB=par // (rows // gp), EXACT=exact)
    for c in consts:
        sig[c] = "constexpr"
    sig = {p.name: sig[p.name] for p in fn.params}
    return compile_one(fn, sig, consts, nw, ns, maxnreg)


def resources(k) -> str:
    """REG / STACK / SHARED of the cubin, read with the cuobjdump bundled with triton."""
    import os
    import re
    import subprocess
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    return f"regs={m[1]} stack={m[2]} shared={m[3]} local={m[4]}" if m else out.strip()[-200:]


SMEM_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (227 KB): above it the launch fails


def report(name, k, secs):
    sass_ops = k.asm.get("ptx", "")
    wgmma = sass_ops.count("wgmma.mma_async")
    mma = sass_ops.count("mma.sync")
    over = "  ** OVER THE SHARED-MEMORY LIMIT: cannot launch **" if k.metadata.shared > SMEM_LIMIT else ""
    print(f"{name:55s} {resources(k)} dyn_smem={k.metadata.shared} wgmma={wgmma} mma.sync={mma} ({secs:.1f}s){over}",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("variants", nargs="*", metavar="VARIANT",
                    help="forward variants as keyword lists of fwd_variant, e.g. rows=64,nw=4 'dtype=\"fp32\"' "
                         "(default: the launcher's variants, then decode and backward)")
    args = ap.parse_args()
    # The defaults the launcher picks: bf16 128 rows / 8 warps / one 64-slot chunk / one stage; fp32 64 rows.
    base = dict(rows=128, nw=8, mc=64, ns=1)
    variants = [base, dict(base, g=8), dict(base, g=3), dict(base, g=1), dict(dtype="fp32", rows=64, nw=4, ns=1),
                dict(base, slots=False, sinks=False), dict(base, par=64),
                dict(dtype="fp16", rows=64, nw=4, ns=1, bn=32, par=64)]
    if args.variants:
        variants = [eval(f"dict({a})") for a in args.variants]
    for v in variants:
        k, secs = fwd_variant(**v)
        report(f"fwd {v}", k, secs)
    if not args.variants:
        for v in [dict(), dict(g=8), dict(g=1), dict(nw=8), dict(dtype="fp16")]:
            k, secs = decode_variant(**v)
            report(f"decode {v}", k, secs)
        # The backward as the launcher configures it (chunk_fwd.default_config): bf16 128 rows / 8 warps, fp16 and
        # fp32 64 rows / 4 warps; Llama-3-8B heads (d = 128, slot tile 16) and SmolLM2's (d = 64, 9 / 3, tile 64).
        for dtype, rows, nw in (("bf16", 128, 8), ("fp16", 64, 4), ("fp32", 64, 4)):
            for shape in (dict(g=4, d=128, mc=16), dict(g=3, d=64, mc=64)):
                for name, (k, secs) in bwd_variants(dtype=dtype, rows=rows, nw=nw, **shape):
                    report(f"{name} {dtype} d={shape['d']}", k, secs)



def decode_variant(dtype="bf16", g=4, d=128, m=64, nw=4):
    """The windowed decode kernel as nha_decode_step launches it (DECODE_TILES)."""
    gp = max(16, 1 << (g - 1).bit_length())  # the G rows padded to 16 for the tensor cores
    ptrs = dict(la="*fp32", slot_bias="*fp32", valid="*u8", n_real="*i64", slot_count="*i64", slot_k="*fp32", slot_v="*fp32",
                win_la="*fp32", win_valid="*u8", win_sink="*u8", sink_pos="*i64", sink_present="*u8", pos="*i64")
    consts = dict(G=g, GP=gp, D=d, DV=d, M=m, DP=d, DVP=d, MP=m, SP=16, NB=max(16, decode.DECODE_TILES["slots"]),
                  NBW=max(16, decode.DECODE_TILES["ring"]), HAS_SINKS=True, SPLIT=dtype == "bf16")
    return compile_generic(decode._decode_kernel, consts, ptrs, nw, 1, default_ptr=f"*{dtype}")


def compile_generic(fn, consts: dict, ptr_types: dict, num_warps=8, num_stages=1, default_ptr="*bf16"):
    """Compile any of our kernels: pointer args default to bf16 unless named in ptr_types; other args i32/fp32."""
    sig = {}
    consts = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.name not in consts
                 and p.default is not inspect.Parameter.empty}, **consts}  # defaults, e.g. HAS_SLOT_BIAS=False
    for p in fn.params:
        name = p.name
        if name in consts:
            sig[name] = "constexpr"
        elif name in ("scale", "one"):
            sig[name] = "fp32"
        elif name in ptr_types or name[0].islower() and name not in ("t",):
            sig[name] = ptr_types.get(name, default_ptr)
        else:
            sig[name] = "i32"
    return compile_one(fn, sig, consts, num_warps, num_stages)


def bwd_variants(g=4, d=128, m=64, rows=128, nw=8, mc=16, dtype="bf16"):
    from nha_kernels import chunk_bwd as cb

    split, ptr = dtype == "bf16", f"*{dtype}"  # SPLIT as chunk_fwd.split_products picks it
    prec, bn = ("tf32x3" if dtype == "fp32" else "tf32"), (64 if dtype == "bf16" else 32)  # as the launcher
    gp = 1 << (g - 1).bit_length()
    bm = rows // gp
    f32 = {n: "*fp32" for n in ("la", "slot_bias", "lse", "delta", "dk_sink", "dv_sink", "st_k", "st_v", "xg", "dlb", "psb",
                                  "loc_k", "loc_v", "loc_a", "rb_k", "rb_v", "dks", "dvs", "dss", "dss_k", "dss_v",
                                  "dkr", "dvb")}
    i32 = {n: "*i32" for n in ("tok", "sink_pos", "span_table")}
    pt = {**f32, **i32}
    band = dict(G=g, GP=gp, BM=bm, BN=bn, D=d, DV=d, DP=d, DVP=d, VARLEN=False, PREC=prec, SPLIT=split)
    slot = dict(G=g, GP=gp, BM=bm, D=d, DV=d, M=m, DP=d, DVP=d, MP=m, SPLIT=split, VARLEN=False)
    out = []
    band_q = {**band, "SP": 16, "HAS_SINKS": True}
    out.append(("bwd band q", compile_generic(cb._bwd_band_q_kernel, band_q, pt, nw, 2, ptr)))
    pt_kv = dict(pt, dkr="*fp32", dvb="*fp32")
    out.append(("bwd band kv", compile_generic(cb._bwd_band_kv_kernel, band, pt_kv, nw, 2, ptr)))
    sq = {**slot, "MC": mc, "PREC": prec, "PREC_SLOT": prec, "FAST_LIMIT": -80.0}
    pt_q = dict(pt, dq=f"*{dtype}")
    out.append(("bwd slot q", compile_generic(cb._bwd_slot_q_kernel, sq, pt_q, nw, 1, ptr)))
    out.append(("bwd slot rlocal", compile_generic(cb._bwd_slot_rlocal_kernel, slot, pt, nw, 1, ptr)))
    for side in (-1, 0, 1):  # -1: one launch, grid axis 2 picks the side (the default); 0 / 1: K / V alone
        kv = compile_generic(cb._bwd_slot_kv_kernel, {**sq, "SIDE": side}, pt, nw, 1, ptr)
        out.append((f"bwd slot kv SIDE={side}", kv))
    return out


if __name__ == "__main__":
    main()
