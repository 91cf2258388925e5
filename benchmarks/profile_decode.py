"""Where one decode step of an 8B-shaped model spends its time: torch.profiler tables, base vs NHA.

    python benchmarks/profile_decode.py [--context 4096] [--steps 5]     # on a CUDA machine

Random weights (no download). Prints, per model, the wall time per step and the top operators by self CPU time
and by self CUDA time: whether a step is bound by the GPU's work or by launching it.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from nha_convert import NHASettings, convert
from nha_convert.eval.bench import prefill_cache, random_model


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=12)
    args = parser.parse_args()
    device = torch.device("cuda")
    for name in ("base", "nha"):
        model = random_model("llama-3-8b-random", device="cuda")
        if name == "nha":
            model = convert(model, NHASettings(window=64, slots=64, full_every=8))
        cache, tok, _ = prefill_cache(model, args.context, model.config.vocab_size, device)
        for _ in range(3):  # warm-up: kernels compiled, allocator settled
            out = model(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
            tok = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                out = model(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
                tok = out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / args.steps
        events = prof.key_averages()
        cuda_total = sum(e.self_device_time_total for e in events) / args.steps / 1e3
        print(f"\n=== {name}: {wall * 1e3:.1f} ms/step wall (profiled), GPU busy {cuda_total:.1f} ms/step, "
              f"{sum(e.count for e in events if e.device_type.name == 'CUDA') // args.steps} kernels/step")
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=50))
        print(events.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=50))
        del model, cache, out
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
