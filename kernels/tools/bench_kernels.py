"""Benchmark the NHA kernels: the table of issue 13 in one command (CUDA only).

    python kernels/tools/bench_kernels.py                      # T = 32K rows, training shapes, decode (issue 13)
    python kernels/tools/bench_kernels.py --preset training    # the recipe's training shapes only
    python kernels/tools/bench_kernels.py --preset decode      # one decode step only
    python kernels/tools/bench_kernels.py --preset sweep       # T = 2K-128K x w = 64/512/2048 (the earlier table)
        [--seq T ...] [--windows W ...] [--tokens B*T] [--train-seq T ...] [--train-batch B] [--docs-per-row N]
        [--train-8b ROWSxT ...] [--decode-batch B] [--flex [--flex-seq T ...]] [--no-bwd] [--no-check] [--budget-s 270]
        [--out docs/bench/kernels.json]

Rows (bf16, random inputs, gates `logsigmoid(2 + 2 N(0,1)) / 8`; times are medians of triton.testing.do_bench):
- long: 32 query / 8 KV heads, d = 128, m = 64 (Llama-3-8B attention), no sinks, B = --tokens // T (at least 1).
  NHA forward and forward + backward against SDPA causal with the flash and the cuDNN backend (K/V expanded to the
  query heads outside the timed region), fla's chunk_gsa when installed (slots only, no window), and with --flex
  flex_attention (sliding window only; each T compiles it again, > 400 s on a fresh machine, so it is opt-in).
  First, unless --no-check: the timed kernels against the fp32 reference at T = 4096 (4 sinks).
- training: the recipe's shapes (SmolLM2-135M: 9 query / 3 KV heads, d = 64, w = 64, m = 64, 4 sinks), a step of
  --train-batch rows of T positions, each row packed with --docs-per-row documents of uneven lengths: one call over
  the flattened batch with cu_seqlens, as the model's training path makes it (nha_convert/layer.py). Forward and
  forward + backward against SDPA of the same shape unpacked (B rows, causal), flash and cuDNN.
- training 8B: the same at the 8B recipes' shapes (recipes/llama-3-8b.yaml: 32 query / 8 KV heads, d = 128,
  w = 512, m = 64, 4 sinks), per --train-8b ROWSxT: the transfer stage's 4 x 2048 and the distill stage's 1 x 8192.
- decode: one step for --decode-batch sequences of a Llama-3-8B layer (w = 64, m = 64, 4 sinks), replayed from a
  CUDA graph (bench_common.time_decode, as kernels/tools/gpu_check.py times it), against reading the decode state
  once (window ring buffer + sinks + fp32 slot state: nha_convert/memory.py) at the copy bandwidth.
The HBM floor is the bytes the op must move once (bench_common.nha_bytes) over the measured device-to-device copy
bandwidth; "x floor" is NHA's time over it, "x" columns are SDPA's time over NHA's. A backend that cannot run a shape
(or computes it wrongly) shows "n/a" and the reason. No row starts after --budget-s seconds (0: no bound): each one
skipped is printed and listed in the JSON. The JSON (device, versions, date, command line, rows) is written
atomically after every row, so that a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # run by path from anywhere: the checkout's nha_kernels and nha_convert
sys.path[:0] = [str(ROOT / "kernels"), str(ROOT)]

from bench_common import nha_bytes  # noqa: E402


@dataclass(frozen=True)
class Shape:
    hq: int  # query heads
    hkv: int  # KV heads
    d: int  # head dim
    m: int  # slots
    window: int | None = None  # the fixed window of the preset (long rows take --windows)
    sinks: int = 0


LONG = Shape(hq=32, hkv=8, d=128, m=64)  # Llama-3-8B attention, no sinks (as in the earlier tables)
TRAIN = Shape(hq=9, hkv=3, d=64, m=64, window=64, sinks=4)  # recipes/smollm2-135m.yaml
TRAIN_8B = Shape(hq=32, hkv=8, d=128, m=64, window=512, sinks=4)  # recipes/llama-3-8b.yaml (qwen3-8b: the same)
DECODE = Shape(hq=32, hkv=8, d=128, m=64, window=64, sinks=4)  # Llama-3-8B, the NHA defaults
CHECK_T = 4096
DEFAULT_OUT = ROOT / "docs" / "bench" / "kernels.json"
FLEX_NOTE = ("flex_attention skipped (opt in with --flex): its torch.compile took > 400 s on a fresh machine, "
             "and each T compiles it again")
PRESETS = {
    "issue13": dict(seq=[32768], windows=[64, 512], train_seq=[1024, 2048, 4096], train_8b=["4x2048", "1x8192"],
                    decode=True),
    "sweep": dict(seq=[2048, 8192, 32768, 131072], windows=[64, 512, 2048], train_seq=[], train_8b=[], decode=False),
    "training": dict(seq=[], windows=[64, 512], train_seq=[1024, 2048, 4096], train_8b=["4x2048", "1x8192"],
                     decode=False),
    "decode": dict(seq=[], windows=[64, 512], train_seq=[], train_8b=[], decode=True),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; what a flag leaves unset comes from --preset."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="\n".join(__doc__.split("\n")[1:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(PRESETS), default="issue13",
                    help="which rows (default issue13: long rows at T = 32K, w = 64 and 512; training; decode)")
    ap.add_argument("--seq", type=int, nargs="*", default=None, help="T of the long rows (none: no long rows)")
    ap.add_argument("--windows", type=int, nargs="+", default=None, help="windows of the long rows")
    ap.add_argument("--tokens", type=int, default=32768, help="B * T of the long rows (B at least 1)")
    ap.add_argument("--train-seq", type=int, nargs="*", default=None, help="T of the training rows (none: none)")
    ap.add_argument("--train-batch", type=int, default=8, help="rows per training step (the recipe's batch_size)")
    ap.add_argument("--docs-per-row", type=int, default=4, help="documents packed into each training row")
    ap.add_argument("--train-8b", nargs="*", default=None, metavar="ROWSxT",
                    help="training rows at the 8B shapes, e.g. 4x2048 1x8192 (none: none)")
    ap.add_argument("--decode", action=argparse.BooleanOptionalAction, default=None, help="the decode row")
    ap.add_argument("--decode-batch", type=int, default=64)
    ap.add_argument("--flex", action="store_true", help="also time flex_attention (compiles for minutes)")
    ap.add_argument("--no-flex", action="store_true", help=argparse.SUPPRESS)  # the default now; older commands
    ap.add_argument("--flex-seq", type=int, nargs="*", default=None,
                    help="T values for flex_attention (default: every --seq up to 32K; create_block_mask builds a "
                         "dense T x T mask first: 128 GiB at 128K)")
    ap.add_argument("--no-bwd", action="store_true", help="forward only")
    ap.add_argument("--bwd-max-seq", type=int, default=131072, help="no forward + backward timings above this T")
    ap.add_argument("--no-check", action="store_true", help="skip the check against the fp32 reference")
    ap.add_argument("--budget-s", type=float, default=270.0,
                    help="start no row after this many seconds from the start (0: no bound); default 270, so "
                         "that the default run ends within 5 minutes on a fresh machine")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="the JSON (default docs/bench/kernels.json)")
    args = ap.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, list(value) if isinstance(value, list) else value)
    try:
        args.train_8b = [tuple(int(x) for x in r.split("x")) for r in args.train_8b]
        assert all(len(r) == 2 for r in args.train_8b)
    except (ValueError, AssertionError):
        ap.error(f"--train-8b takes ROWSxT pairs such as 4x2048, got {' '.join(map(str, args.train_8b))}")
    if args.flex_seq is None:
        args.flex_seq = [t for t in args.seq if t <= 32768]
    if args.budget_s < 0:
        ap.error("--budget-s must be >= 0 (0: no bound)")
    if min([args.tokens, args.train_batch, args.docs_per_row, args.decode_batch, *args.seq, *args.windows,
            *args.train_seq, *(x for r in args.train_8b for x in r)]) < 1:
        ap.error("sizes, windows and counts must be >= 1")
    total = max(sum(doc_weights(r, args.docs_per_row)) for r in range(3))  # every document >= 1 position
    if any(t < total for t in [*args.train_seq, *(t for _, t in args.train_8b)]):
        ap.error(f"--train-seq values must be >= {total} to hold {args.docs_per_row} documents per row")
    return args


class Budget:
    """Wall-clock bound of a run: `allows(what)` is False once `limit_s` seconds have passed since the start (never
    when limit_s is 0); each refusal is printed and kept in `skipped`."""

    def __init__(self, limit_s: float, clock: Callable[[], float] = time.monotonic):
        self.limit_s, self.clock = limit_s, clock
        self.start = clock()
        self.skipped: list[str] = []

    def elapsed(self) -> float:
        return self.clock() - self.start

    def allows(self, what: str) -> bool:
        if not self.limit_s or self.elapsed() < self.limit_s:
            return True
        note = f"skipped {what}: {self.elapsed():.0f} s elapsed, past --budget-s {self.limit_s:g}"
        self.skipped.append(note)
        print(note, flush=True)
        return False


def doc_weights(row: int, docs: int) -> list[int]:
    """Relative document lengths of training row `row`: 1, 2, 3, 1, 2, 3, ... rotated by the row, so that the
    boundaries fall at other offsets in each row."""
    return [1 + (i + row) % 3 for i in range(docs)]


def packed_cu_seqlens(rows: int, t: int, docs: int) -> list[int]:
    """Boundaries of the documents of `rows` packed rows of t positions each, over the flattened batch (0 ..
    rows * t, as nha_convert/ops/packed.py builds them from position ids): `docs` documents per row, no document
    crossing a row end."""
    cu = [0]
    for r in range(rows):
        weights = doc_weights(r, docs)
        acc = 0
        for w in weights[:-1]:
            acc += w
            cu.append(r * t + t * acc // sum(weights))
        cu.append((r + 1) * t)
    return cu


def decode_state_bytes(batch: int, shape: Shape = DECODE) -> int:
    """Bytes of the decode state of one windowed layer for `batch` sequences (nha_convert/memory.py: window ring
    buffer of k_rot, k, v and log-decays, sinks, fp32 slot state, counters); the read-once floor of a step."""
    from nha_convert.memory import nha_layer_state_bytes

    per_seq = nha_layer_state_bytes(shape.window, shape.m, shape.sinks, shape.hkv, shape.d, seq_len=shape.window)
    return batch * per_seq


def floor_ms(nbytes: int, bandwidth: float) -> float:
    """Milliseconds to move `nbytes` once at `bandwidth` bytes/s."""
    return nbytes / bandwidth * 1e3


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def add_ratios(row: dict) -> dict:
    """Add to a timed row SDPA's time over NHA's per backend (`x_flash_fwd`, `x_cudnn_fwdbwd`, ...) and NHA's time
    over the HBM floor (`x_floor_fwd`, `x_floor_fwdbwd`) wherever both numbers exist."""
    for part in ("fwd", "fwdbwd"):
        nha = row.get(f"nha_{part}_ms")
        if not _num(nha) or nha <= 0:
            continue
        for backend in ("flash", "cudnn"):
            base = row.get(f"sdpa_{backend}_{part}_ms")
            if _num(base):
                row[f"x_{backend}_{part}"] = base / nha
        floor = row.get(f"floor_{part}_ms")
        if _num(floor) and floor > 0:
            row[f"x_floor_{part}"] = nha / floor
    return row


def unavailable(what: str, err: BaseException, warns: Sequence[str] = ()) -> str:
    """'n/a: ...' for a backend that cannot run a shape: the error's first line and the reasons torch warned about
    (first lines, each once), at most 300 characters."""
    lines = [f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}".strip()]
    for w in warns:
        first = w.strip().splitlines()[0] if w.strip() else ""
        if first and first not in lines:
            lines.append(first)
    text = f"n/a: {what}: " + "; ".join(lines)
    return text if len(text) <= 300 else text[:297] + "..."


def write_json(result: dict, out: str | os.PathLike) -> None:
    """Atomically: a temporary file in the same folder, then os.replace (a reader never sees half a file)."""
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".kernels-", suffix=".json.tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(result, fh, indent=1)
            fh.write("\n")
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def run_info(argv: Sequence[str], now: datetime | None = None) -> dict:
    """What identifies a run apart from the device: the exact command line, the date (UTC), the NHA_* settings."""
    now = now or datetime.now(timezone.utc)
    return {"command": shlex.join([Path(sys.executable).name, *argv]), "argv": list(argv),
            "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("NHA_")}}


def _cell(x, p: int | None = None) -> str:
    """A table cell: numbers with p decimals (None: 4 significant digits, 5 decimals at most), n/a notes as n/a."""
    if isinstance(x, bool) or x is None:
        return "-"
    if isinstance(x, float):
        if p is None:
            p = min(5, max(0, 3 - math.floor(math.log10(abs(x))))) if x else 0
        return f"{x:.{p}f}"
    if isinstance(x, str) and x.startswith("n/a"):
        return "n/a"
    return str(x)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def _sdpa_cells(r: dict, part: str) -> list[str]:
    """NHA, flash, x, cuDNN, x for one part (fwd / fwdbwd) of a row; n/a where a backend did not run."""
    cells = [_cell(r.get(f"nha_{part}_ms"))]
    for backend in ("flash", "cudnn"):
        cells += [_cell(r.get(f"sdpa_{backend}_{part}_ms", r.get(f"sdpa_{backend}_note"))),
                  _cell(r.get(f"x_{backend}_{part}"), 1)]
    return cells


def format_tables(result: dict) -> str:
    """The plain-text tables of a run (times in ms unless marked), then the notes: n/a reasons, skipped rows."""
    out = [f"{result.get('device', '?')}, torch {result.get('torch', '?')}, triton {result.get('triton', '?')}, "
           f"copy {_cell(result.get('copy_bandwidth_TBps'), 2)} TB/s; medians in ms; x = SDPA / NHA; "
           f"x floor = NHA / HBM floor"]
    notes = []
    shapes = result.get("shapes", {})
    long_rows, dec = (result.get(key, []) for key in ("rows", "decode"))
    train = result.get("training", []) + result.get("training_8b", [])
    sections = []  # (title, headers, rows)
    for part, name in (("fwd", "forward"), ("fwdbwd", "forward + backward")) if long_rows else ():
        s = shapes["long"]
        sections.append((
            f"long context, {name}: {s['hq']}/{s['hkv']} heads, d = {s['d']}, m = {s['m']}, no sinks",
            ["T", "B", "w", "NHA", "flash", "x", "cuDNN", "x", "floor", "x floor", "flex", "gsa"],
            [[str(r["T"]), str(r["B"]), str(r["window"]), *_sdpa_cells(r, part), _cell(r.get(f"floor_{part}_ms")),
              _cell(r.get(f"x_floor_{part}"), 1), _cell(r.get(f"flex_{part}_ms")), _cell(r.get(f"gsa_{part}_ms"))]
             for r in long_rows]))
    for key in ("training", "training_8b"):
        if not result.get(key):
            continue
        s = shapes[key]
        sections.append((
            f"{key.replace('_', ' ')} shapes, packed: {s['hq']}/{s['hkv']} heads, d = {s['d']}, w = {s['window']}, "
            f"m = {s['m']}, {s['sinks']} sinks; SDPA on the same rows unpacked (causal)",
            ["T", "rows", "docs", "NHA fwd", "flash", "x", "cuDNN", "x", "NHA f+b", "flash f+b", "x", "cuDNN f+b", "x",
             "floor f+b", "x floor"],
            [[str(r["T"]), str(r["B"]), str(r["docs_per_row"]), *_sdpa_cells(r, "fwd"), *_sdpa_cells(r, "fwdbwd"),
              _cell(r.get("floor_fwdbwd_ms")), _cell(r.get("x_floor_fwdbwd"), 1)] for r in result[key]]))
    if dec:
        s = shapes["decode"]
        sections.append((
            f"decode, one step: {s['hq']}/{s['hkv']} heads, d = {s['d']}, m = {s['m']}, {s['sinks']} sinks (times in "
            f"us; graph = CUDA-graph replay)",
            ["batch", "w", "state MiB", "read-once", "graph", "x floor", "eager", "after 1M more"],
            [[str(r["batch"]), str(r["window"]), _cell(r["state_bytes"] / 2**20, 1), _cell(r.get("floor_us"), 1),
              _cell(r.get("step_us"), 1), _cell(r.get("x_floor"), 2), _cell(r.get("eager_us"), 1),
              _cell(r.get("step_us_at_1M"), 1)] for r in dec]))
    out += [f"\n{title}\n{_table(headers, rows)}" for title, headers, rows in sections]
    for r in long_rows + train:
        for backend in ("flash", "cudnn"):
            if r.get(f"sdpa_{backend}_note"):
                notes.append(f"SDPA {backend} at T={r['T']} B={r['B']}: {r[f'sdpa_{backend}_note']}")
    for key in ("flex", "fla_chunk_gsa"):
        if isinstance(result.get(key), str) and result[key] not in ("timed", "installed"):
            notes.append(f"{key}: {result[key]}")
    notes += result.get("skipped", [])
    if notes:
        out.append("\nnotes:\n" + "\n".join(f"- {n}" for n in dict.fromkeys(notes)))
    return "\n".join(out)


# ---- CUDA only below ----------------------------------------------------------------------------------------------


def fwd_bwd(fn, inputs, grad_out):
    def run():
        for x in inputs:
            x.grad = None
        fn().backward(grad_out)
    return run


def time_sdpa(backend: str, q, k, v, grad, do_bwd: bool, rep: int, ref=None) -> dict:
    """SDPA causal on one backend ("flash" or "cudnn"): `fwd_ms`, `fwdbwd_ms`, and the output; or `note`
    ('n/a: ...') where the backend cannot run the shape or (cuDNN) its output is off from `ref` (flash's)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from bench_common import bench

    kind = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION"}[backend]
    out: dict = {}
    if not hasattr(SDPBackend, kind):
        out["note"] = f"n/a: this torch has no SDPBackend.{kind}"
        return out

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    step = "forward"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with sdpa_kernel(getattr(SDPBackend, kind)):
                with torch.no_grad():
                    o = sdpa()
                    if ref is not None:
                        err = ((o.float() - ref.float()).norm() / ref.float().norm()).item()
                        if not err < 2e-2:  # also catches NaN
                            out["note"] = f"n/a: {backend} output off from flash's (rel error {err:.2e})"
                            return out
                    out["out"] = o
                    out["fwd_ms"] = bench(sdpa, rep=rep)
                if do_bwd:
                    step = "backward"
                    out["fwdbwd_ms"] = bench(fwd_bwd(sdpa, [q, k, v], grad), rep=50)
        except Exception as e:  # no kernel for this shape, out of memory, a cuDNN graph that does not build
            out["note"] = unavailable(f"{backend} {step}", e, [str(w.message) for w in caught])
    return out


def sdpa_row(q, k, v, grad, do_bwd: bool, rep: int) -> dict:
    """SDPA flash and cuDNN columns of a row (`sdpa_flash_fwd_ms`, ..., `sdpa_cudnn_note`)."""
    row: dict = {}
    flash = time_sdpa("flash", q, k, v, grad, do_bwd, rep)
    cudnn = time_sdpa("cudnn", q, k, v, grad, do_bwd, rep, ref=flash.get("out"))
    for name, res in (("flash", flash), ("cudnn", cudnn)):
        for part in ("fwd", "fwdbwd"):
            if f"{part}_ms" in res:
                row[f"sdpa_{name}_{part}_ms"] = res[f"{part}_ms"]
        if "note" in res:
            row[f"sdpa_{name}_note"] = res["note"]
            print(f"  SDPA {name}: {res['note']}", flush=True)
    return row


def check_long(args, budget: Budget) -> dict:
    """The long rows' kernels against the fp32 torch reference at T = 4096 (4 sinks): max relative error over the
    output and the six gradients, per window."""
    import torch

    from bench_common import inputs
    from nha_convert.ops import nha_chunk
    from nha_convert.backend import triton_chunk as nha_chunk_triton

    s = LONG
    xs = [x.requires_grad_(True) for x in inputs(1, s.hq, s.hkv, CHECK_T, s.d, s.m, seed=1)]
    grad = torch.randn(1, s.hq, CHECK_T, s.d, device="cuda", dtype=torch.bfloat16)
    checks = {}
    for w in args.windows:
        if not budget.allows(f"check w={w}"):
            continue
        out = nha_chunk_triton(*xs, window=w, num_sinks=4, scale=s.d**-0.5)[0]
        gk = torch.autograd.grad(out, xs, grad, allow_unused=True)
        ref_in = [x.detach().float().requires_grad_(True) for x in xs]
        ref = nha_chunk(*ref_in, window=w, num_sinks=4, scale=s.d**-0.5)[0]
        gr = torch.autograd.grad(ref, ref_in, grad.float(), allow_unused=True)
        errs = [((a.float() - b).norm() / b.norm()).item() for a, b in zip([out, *gk], [ref, *gr]) if b is not None]
        checks[str(w)] = max(errs)
        print(f"check w={w} T={CHECK_T}: max rel error over output and 6 gradients {max(errs):.2e}", flush=True)
    return checks


def bench_long(args, bw: float, budget: Budget, result: dict) -> None:
    """The long rows: per T the SDPA, gsa (and flex) baselines, then NHA per window."""
    import torch

    from bench_common import bench, inputs
    from nha_convert.backend import triton_chunk as nha_chunk_triton

    s = LONG
    scale = s.d**-0.5
    try:
        from fla.ops.gsa import chunk_gsa  # type: ignore[import-not-found]
    except ImportError:
        chunk_gsa = None
    result["fla_chunk_gsa"] = "installed" if chunk_gsa else "not installed (its wheels: docs/performance.md)"
    flex = None
    if args.flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = torch.compile(flex_attention, dynamic=False)
        result["flex"] = "timed"
    else:
        result["flex"] = FLEX_NOTE
        print(FLEX_NOTE, flush=True)
    for t in args.seq:
        if not budget.allows(f"long rows T={t} (w = {' '.join(map(str, args.windows))})"):
            continue
        b = max(1, args.tokens // t)
        do_bwd = not args.no_bwd and t <= args.bwd_max_seq
        xs = [x.requires_grad_(do_bwd) for x in inputs(b, s.hq, s.hkv, t, s.d, s.m)]
        grad = torch.randn(b, s.hq, t, s.d, device="cuda", dtype=torch.bfloat16)
        # SDPA with K/V expanded to the query heads outside the timed region (no GQA in the flash kernel here).
        qr = xs[1].detach().requires_grad_(do_bwd)
        kr, vr = (x.detach().repeat_interleave(s.hq // s.hkv, 1).requires_grad_(do_bwd) for x in (xs[3], xs[4]))
        base = sdpa_row(qr, kr, vr, grad, do_bwd, rep=50 if t >= 32768 else 100)
        if chunk_gsa is not None:  # slots only (no window): once per T; layout (B, T, H, D), m = width of s and g
            gin = [x.detach().transpose(1, 2).contiguous().requires_grad_(do_bwd) for x in (xs[0], xs[2], xs[4])]
            s_ = torch.randn(b, t, s.hkv, s.m, device="cuda", dtype=torch.bfloat16, requires_grad=do_bwd)
            g_ = xs[5].detach().transpose(1, 2).contiguous().bfloat16().requires_grad_(do_bwd)
            run_gsa = lambda: chunk_gsa(*gin, s_, g_, scale=scale)[0]  # noqa: E731
            with torch.no_grad():
                base["gsa_fwd_ms"] = bench(run_gsa)
            if do_bwd:
                base["gsa_fwdbwd_ms"] = bench(fwd_bwd(run_gsa, [*gin, s_, g_], grad.transpose(1, 2).contiguous()),
                                              rep=50)
        for w in args.windows:
            if not budget.allows(f"long row T={t} w={w}"):
                continue
            row = dict(T=t, B=b, window=w, **base)
            kw = dict(window=w, num_sinks=0, scale=scale)
            with torch.no_grad():
                row["nha_fwd_ms"] = bench(lambda: nha_chunk_triton(*xs, **kw)[0])
            if do_bwd:
                row["nha_fwdbwd_ms"] = bench(fwd_bwd(lambda: nha_chunk_triton(*xs, **kw)[0], xs, grad), rep=50)
            row["floor_fwd_ms"] = floor_ms(nha_bytes(b * t, s.hq, s.hkv, s.d, s.m), bw)
            row["floor_fwdbwd_ms"] = floor_ms(nha_bytes(b * t, s.hq, s.hkv, s.d, s.m, backward=True), bw)
            if flex is not None and t in args.flex_seq and budget.allows(f"flex T={t} w={w}"):
                def sliding(bi, h, qi, ki, w=w):
                    return (qi >= ki) & (qi - ki < w)
                mask = create_block_mask(sliding, b, None, t, t, device="cuda")
                fl = lambda: flex(qr, kr, vr, block_mask=mask, scale=scale)  # noqa: E731
                with torch.no_grad():
                    row["flex_fwd_ms"] = bench(fl)
                if do_bwd:
                    row["flex_fwdbwd_ms"] = bench(fwd_bwd(fl, [qr, kr, vr], grad), rep=50)
            result["rows"].append(add_ratios(row))
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
            write_json(result, args.out)
        xs = qr = kr = vr = grad = base = None  # free them before the next T
        torch.cuda.empty_cache()


def bench_training(args, bw: float, budget: Budget, result: dict, s: Shape = TRAIN,
                   rows_t: Sequence[tuple[int, int]] | None = None, key: str = "training") -> None:
    """The training rows: packed NHA (one call over the flattened batch, cu_seqlens on the CPU as the model makes
    them) against SDPA on the same rows unpacked; (rows, T) pairs, default --train-batch x each --train-seq."""
    import torch

    from bench_common import bench, inputs
    from nha_convert.ops.packed import flatten_rows
    from nha_convert.backend import triton_chunk as nha_chunk_triton

    docs = args.docs_per_row
    for b, t in rows_t if rows_t is not None else [(args.train_batch, t) for t in args.train_seq]:
        if not budget.allows(f"{key} row {b}x{t}"):
            continue
        do_bwd = not args.no_bwd
        dense = inputs(b, s.hq, s.hkv, t, s.d, s.m, seed=4)
        xs = [flatten_rows(x).contiguous().requires_grad_(do_bwd) for x in dense]
        cu_list = packed_cu_seqlens(b, t, docs)
        cu = torch.tensor(cu_list, dtype=torch.int32)
        # valid=None, as the layer passes it in training (no mask, layer.py): one layout per step, shared by the
        # layers and their backward. Until session 9 this row passed an all-true mask, which rebuilt the layout
        # (host syncs) in every call and timed that too.
        kw = dict(window=s.window, num_sinks=s.sinks, scale=s.d**-0.5, valid=None, cu_seqlens=cu)
        grad_flat = torch.randn(1, s.hq, b * t, s.d, device="cuda", dtype=torch.bfloat16)
        row = dict(T=t, B=b, docs_per_row=docs, cu_seqlens=cu_list)
        with torch.no_grad():
            row["nha_fwd_ms"] = bench(lambda: nha_chunk_triton(*xs, **kw)[0])
        if do_bwd:
            row["nha_fwdbwd_ms"] = bench(fwd_bwd(lambda: nha_chunk_triton(*xs, **kw)[0], xs, grad_flat), rep=50)
        qr = dense[1].detach().requires_grad_(do_bwd)
        kr, vr = (x.detach().repeat_interleave(s.hq // s.hkv, 1).requires_grad_(do_bwd) for x in (dense[3], dense[4]))
        grad = torch.randn(b, s.hq, t, s.d, device="cuda", dtype=torch.bfloat16)
        row.update(sdpa_row(qr, kr, vr, grad, do_bwd, rep=100))
        row["floor_fwd_ms"] = floor_ms(nha_bytes(b * t, s.hq, s.hkv, s.d, s.m), bw)
        row["floor_fwdbwd_ms"] = floor_ms(nha_bytes(b * t, s.hq, s.hkv, s.d, s.m, backward=True), bw)
        result[key].append(add_ratios(row))
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items() if k != "cu_seqlens"}, flush=True)
        write_json(result, args.out)
        dense = xs = qr = kr = vr = grad = grad_flat = None  # free them before the next T
        torch.cuda.empty_cache()


def bench_decode(args, bw: float, budget: Budget, result: dict) -> None:
    """One decode step (graph replay) against reading the state once."""
    from bench_common import time_decode

    s = DECODE
    if not budget.allows(f"decode B={args.decode_batch}"):
        return
    dec = time_decode(args.decode_batch, s.hq, s.hkv, s.d, s.m, s.window, sinks=s.sinks)
    nbytes = decode_state_bytes(args.decode_batch, s)
    row = dict(batch=args.decode_batch, window=s.window, state_bytes=nbytes, state_bytes_held=dec["state_bytes"],
               floor_us=floor_ms(nbytes, bw) * 1e3, step_us=dec["ms"] * 1e3, eager_us=dec["eager_ms"] * 1e3,
               step_us_at_1M=dec["ms_at_1M"] * 1e3)
    row["x_floor"] = row["step_us"] / row["floor_us"]
    if nbytes != dec["state_bytes"]:
        print(f"  note: memory.py gives {nbytes} state bytes, the state holds {dec['state_bytes']}", flush=True)
    result["decode"].append(row)
    print(row, flush=True)
    write_json(result, args.out)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    args = parse_args(argv[1:])
    budget = Budget(args.budget_s)
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py: needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured")
    import triton

    from bench_common import copy_bandwidth

    result = {**run_info(argv), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
              "preset": args.preset, "budget_s": args.budget_s, "dtype": "bf16",
              "shapes": {"long": asdict(LONG), "training": asdict(TRAIN), "training_8b": asdict(TRAIN_8B),
                         "decode": asdict(DECODE)},
              "rows": [], "training": [], "training_8b": [], "decode": [], "skipped": budget.skipped,
              "complete": False}
    bw = copy_bandwidth()
    result["copy_bandwidth_TBps"] = bw / 1e12
    print(f"{result['device']}: copy {bw / 1e12:.2f} TB/s; {result['command']}", flush=True)
    if args.seq and not args.no_check:
        result["check_max_rel_error"] = check_long(args, budget)
    if args.seq:
        bench_long(args, bw, budget, result)
    if args.train_seq:
        bench_training(args, bw, budget, result)
    if args.train_8b:
        bench_training(args, bw, budget, result, TRAIN_8B, args.train_8b, "training_8b")
    if args.decode:
        bench_decode(args, bw, budget, result)
    result["elapsed_s"] = budget.elapsed()
    result["complete"] = not budget.skipped
    write_json(result, args.out)
    print()
    print(format_tables(result))
    print(f"\n{budget.elapsed():.0f} s; JSON: {args.out}")


if __name__ == "__main__":
    main()
