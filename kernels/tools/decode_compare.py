"""Two versions of the decode kernel at several head shapes and batches: graph-replayed step, us (CUDA only).

    git show 80a6d5a:kernels/nha_kernels/decode.py > /tmp/decode_old.py    # the FMA kernel before session 13
    python kernels/tools/decode_compare.py /tmp/decode_old.py --json out.json

The old file is imported beside the checkout's `nha_kernels.decode` (its relative imports resolved against the
checkout's `nha_kernels`), and each shape is timed with both as bench_kernels.py's decode row
(bench_common.time_decode: w = 64, m = 64, 4 sinks, state prefilled with w + 37 tokens).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "kernels"), str(ROOT)]

# (query heads, KV heads, head dim, batch): Llama-3-8B at three batches, no GQA, G = 7, SmolLM2-135M
SHAPES = [(32, 8, 128, 1), (32, 8, 128, 64), (32, 8, 128, 184), (32, 32, 128, 8), (32, 32, 128, 64),
          (28, 4, 128, 64), (9, 3, 64, 64)]


def load_old(path: Path):
    spec = importlib.util.spec_from_file_location("nha_kernels._decode_old", path,
                                                  submodule_search_locations=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "nha_kernels"  # `from .prep import ...` resolves against the checkout's kernels
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="\n".join(__doc__.split("\n")[1:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", type=Path, help="an earlier kernels/nha_kernels/decode.py")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from bench_common import time_decode
    from nha_kernels import decode

    fns = {"old": load_old(args.old).nha_decode_step, "new": decode.nha_decode_step}
    rows = []
    print(f"{'heads':>7} {'d':>4} {'batch':>5} {'old us':>8} {'new us':>8} {'old/new':>7}")
    for hq, h, d, b in SHAPES:
        row = dict(hq=hq, h=h, d=d, batch=b)
        for name, fn in fns.items():
            decode.nha_decode_step = fn  # time_decode imports it from nha_kernels.decode at each call
            row[name] = time_decode(b, hq, h, d, 64, 64, sinks=4, long_context=False)["ms"] * 1e3
        decode.nha_decode_step = fns["new"]
        print(f"{hq:>3}/{h:<3} {d:>4} {b:>5} {row['old']:8.1f} {row['new']:8.1f} {row['old'] / row['new']:7.2f}",
              flush=True)
        rows.append(row)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
