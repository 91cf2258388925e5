"""Held-out perplexity of the embedded SmolLM2 before and after training-free conversion.

    python benchmarks/conversion_ppl.py [--seq-len 2048] [--sequences 4] [--constant-init] [--multiscale-init]

Prints one row per model: the base model, NHA (w=64, m=64, no training) and the strongest training-free
baseline, sliding-window 64 + 4 sinks (NHA with m = 0), with perplexity by token position. --constant-init adds
NHA with the constant gate init at decay 0.9999 (near-empty slots), with and without sinks; --multiscale-init adds
the multiscale gate init (slot memory horizons 16-16384 tokens) with 4 sinks.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from rich.console import Console
from rich.table import Table

from nha_convert import NHASettings, convert
from nha_convert.eval.perplexity import heldout_path, perplexity_by_position
from nha_convert.hub import load_base_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--sequences", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--constant-init", action="store_true", help="add constant-gate-init variants")
    parser.add_argument("--multiscale-init", action="store_true", help="add the multiscale gate init, 4 sinks")
    args = parser.parse_args()

    base, tok = load_base_model(None, dtype=torch.float32, device=args.device)
    variants = {
        "base (full attention)": None,
        "NHA w=64 m=64 (no training)": NHASettings(window=64, slots=64),
        "NHA w=64 m=64 +4 sinks (no training)": NHASettings(window=64, slots=64, sinks=4),
        "SWA w=64 +4 sinks (no training)": NHASettings(window=64, slots=0, sinks=4),
    }
    if args.constant_init:
        near_empty = dict(window=64, slots=64, gate_init="constant", gate_decay=0.9999)
        variants["NHA constant init 0.9999 (no training)"] = NHASettings(**near_empty)
        variants["NHA constant init 0.9999 +4 sinks (no training)"] = NHASettings(**near_empty, sinks=4)
    if args.multiscale_init:
        variants["NHA multiscale init +4 sinks (no training)"] = NHASettings(window=64, slots=64, sinks=4,
                                                                             gate_init="multiscale")
    rows = []
    for name, settings in variants.items():
        model = base if settings is None else convert(copy.deepcopy(base), settings)
        t0 = time.perf_counter()
        r = perplexity_by_position(model, tok, seq_len=args.seq_len, max_sequences=args.sequences)
        rows.append((name, r, time.perf_counter() - t0))
    table = Table(title=f"SmolLM2-135M, held-out {heldout_path().name}, {rows[0][1]['sequences']} x "
                        f"{args.seq_len} tokens, fp32, {args.device}")
    table.add_column("model")
    table.add_column("ppl", justify="right")
    for b in rows[0][1]["buckets"]:
        table.add_column(f"pos {b}", justify="right")
    table.add_column("s", justify="right")
    for name, r, secs in rows:
        table.add_row(name, f"{r['overall_ppl']:.2f}", *[f"{p:.2f}" for p in r["ppl"]], f"{secs:.0f}")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
