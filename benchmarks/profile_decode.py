"""Where one decode step (or one long prefill) of an 8B-shaped model spends its time: torch.profiler tables.

    python benchmarks/profile_decode.py [--context 4096] [--steps 5] [--batch 1] [--graph]   # on a CUDA machine
    python benchmarks/profile_decode.py --prefill --context 32768                            # one prefill

Random weights (no download). Prints, per model (base, then NHA w=64 m=64 with every 8th layer full), the wall time
per step and the top operators by self CPU time and by self CUDA time: whether a step is bound by the GPU's work or
by launching it. --graph profiles NHA decode steps replayed from a CUDA graph (nha_convert/decode_graph.py).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from nha_convert import NHASettings, convert
from nha_convert.decode_graph import GraphedDecodeStep
from nha_convert.eval.bench import prefill_cache, random_model


def report(name: str, prof, wall: float, steps: int, rows: int) -> None:
    events = prof.key_averages()
    cuda_total = sum(e.self_device_time_total for e in events) / steps / 1e3
    print(f"\n=== {name}: {wall * 1e3:.1f} ms/step wall (profiled), GPU busy {cuda_total:.1f} ms/step, "
          f"{sum(e.count for e in events if e.device_type.name == 'CUDA') // steps} kernels/step")
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))
    print(events.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=60))


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rows", type=int, default=12)
    parser.add_argument("--graph", action="store_true", help="NHA decode steps replayed from a CUDA graph")
    parser.add_argument("--prefill", action="store_true", help="profile one prefill of --context tokens instead")
    parser.add_argument("--models", default="base,nha")
    args = parser.parse_args()
    device = torch.device("cuda")
    for name in args.models.split(","):
        model = random_model("llama-3-8b-random", device="cuda")
        if name == "nha":
            model = convert(model, NHASettings(window=64, slots=64, full_every=8))
        vocab = model.config.vocab_size
        if args.prefill:
            ids = torch.randint(0, vocab, (1, args.context), device=device)
            model(input_ids=ids, use_cache=False, logits_to_keep=1)  # warm-up: kernels compiled
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
                torch.cuda.synchronize()
            report(f"{name} prefill {args.context}", prof, time.perf_counter() - t0, 1, args.rows)
            del model
            torch.cuda.empty_cache()
            continue
        cache, tok, _ = prefill_cache(model, args.context, vocab, device)
        graph = args.graph and name == "nha"
        if graph:
            cache.reserve(args.context + 3 + args.steps + 1)
        if args.batch > 1:
            cache.batch_repeat_interleave(args.batch)
            tok = tok.repeat(args.batch, 1)
        step = GraphedDecodeStep(model, cache, torch.full_like(tok, args.context), graph=graph)
        for _ in range(3):  # warm-up: kernels compiled, allocator settled (graph: captured)
            tok = step(tok)[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                tok = step(tok)[:, -1:].argmax(-1)
            torch.cuda.synchronize()
        report(f"{name}{' (graph)' if graph else ''} decode ctx={args.context} batch={args.batch}", prof,
               (time.perf_counter() - t0) / args.steps, args.steps, args.rows)
        del model, cache, step
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
