"""An 8B recipe at its real size on one GPU, with random weights of the real shape (no download), in < 7 minutes.

    python benchmarks/bench_8b.py                                   # llama-3-8b-random, recipes/llama-3-8b.yaml
    python benchmarks/bench_8b.py --model qwen3-8b-random --recipe recipes/qwen3-8b.yaml --json out/qwen3-8b.json

Everything runs at the recipe's per-GPU settings (its `smoke` budget: the stages' rows, accumulation, seq_len,
gradient checkpointing; local text). Sections, each printed as a table and written to --json as soon as it is done
(a run stopped by a time limit keeps what it measured):
1. conversion: the base built on the GPU (random_models.py), then finetune/models.build_models as nha-finetune runs
   it (the teacher copy, the conversion with the recipe's `full_layers: auto:4` calibration): seconds, the
   calibration's own seconds (from the config), peak GPU memory.
2. training, the NHA student: benchmarks/bench_finetune.py's run on those models, `--steps` steps a stage, the first
   `--warmup` not timed: real tokens/s, s/step, peak memory; one distill step (before the timed ones) under the
   profiler: the NHA op's Triton kernels' share of the step's GPU time.
3. save / load of the trained student (the trainer's own nha_convert.save, timed; nha_convert.load) and greedy
   `generate_fast` decode tokens/s after a 2048-token prompt at batch 1 and 8 (CUDA-graph replay; prefill and
   capture subtracted). The base run skips its final save (nobody reads that model).
4. the base model as its own student (bench_finetune's base run: model.nha null, the same settings): NHA / base.
5. the full recipe (no budget) projected on 1 and 8 GPUs from the measured step times (finetune/budget.py).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_finetune  # noqa: E402  (benchmarks/ is not a package)

GIB = 1024**3


def op_kernel_names() -> set[str]:
    """The NHA op's Triton kernels, read from the sources (every `@triton.jit def *_kernel`)."""
    return {name for src in (ROOT / "kernels" / "nha_kernels").glob("*.py")
            for name in re.findall(r"@triton\.jit\s*\ndef (\w+_kernel)\(", src.read_text())}


def nha_share(averages: Any) -> float | None:
    """Fraction of a profiled step's GPU time spent in the NHA op's kernels."""
    names = op_kernel_names()
    total = nha = 0.0
    for e in averages:
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
        if getattr(e, "device_type", None) is not None and "CUDA" not in str(e.device_type):
            continue
        total += t
        nha += t if any(n in e.key for n in names) else 0.0
    return round(nha / total, 4) if total else None


CUDA = torch.cuda.is_available()  # without one (a CPU dry run of this script: --allow-cpu) nothing is timed for real
DEVICE = "cuda" if CUDA else "cpu"


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    if CUDA:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if CUDA:
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / GIB, 2) if CUDA else None


def free() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


class Report:
    """The results so far, written atomically to --json after every section."""

    def __init__(self, path: Path | None, meta: dict[str, Any]):
        self.path, self.data = path, dict(meta)

    def add(self, section: str, value: Any) -> None:
        self.data[section] = value
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
            tmp.replace(self.path)


def table(title: str, rows: list[tuple[str, Any]]) -> None:
    print(f"\n{title}\n| what | value |\n| --- | --- |")
    for k, v in rows:
        print(f"| {k} | {v} |")


@contextlib.contextmanager
def final_save(record: dict[str, float] | None) -> Iterator[None]:
    """The trainer saves its model at the end (16 GB at 8B): timed into record["save_s"] for the NHA run; skipped
    for the base run, whose model nobody reads (a minute of disk writes saved)."""
    import nha_convert

    real = nha_convert.save

    def save(*args: Any, **kwargs: Any) -> Any:
        if record is None:
            return None
        out, record["save_s"] = timed(lambda: real(*args, **kwargs))
        return out

    nha_convert.save = save
    try:
        yield
    finally:
        nha_convert.save = real


def conversion(recipe: Any) -> tuple[tuple, dict[str, Any]]:
    from nha_convert.finetune.models import build_models

    free()
    models, seconds = timed(lambda: build_models(recipe, torch.device(DEVICE)))
    selection = (models[0].config.nha or {}).get("full_layer_selection") or {}
    out = {"build_and_convert_s": round(seconds, 1), "calibration_s": selection.get("seconds"),
           "full_layers": list(models[0].config.nha.get("full_layers") or []), "peak_gib": peak_gib(),
           "parameters": sum(p.numel() for p in models[0].parameters())}
    table("1. base built on the GPU + teacher copy + conversion (auto:K calibration)", list(out.items()))
    return models, out


def load_generate(run: Path, save_s: float | None, batches: tuple[int, ...] = (1, 8),
                  prompt: int = 2048) -> dict[str, Any]:
    import nha_convert
    from transformers import AutoTokenizer

    free()
    model, load_s = timed(lambda: nha_convert.load(run / "model", dtype=torch.bfloat16, device=DEVICE))
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    shutil.rmtree(run / "model", ignore_errors=True)  # 16 GB at 8B
    out: dict[str, Any] = {"save_s": None if save_s is None else round(save_s, 1), "load_s": round(load_s, 1)}
    vocab = min(model.config.vocab_size, len(tokenizer))
    for b in batches:
        ids = torch.randint(0, vocab, (b, prompt), device=DEVICE)
        mask = torch.ones_like(ids)
        run_for = {n: timed(lambda n=n: nha_convert.generate_fast(model, ids, mask, max_new_tokens=n))[1]
                   for n in (8, 8, 72)}  # the first call warms up (kernels, graph capture)
        out[f"decode_tok_s_batch{b}"] = round(b * 64 / (run_for[72] - run_for[8]), 1)
    out["peak_gib"] = peak_gib()
    table(f"3. save (the trainer's own) / load of the trained student, generate_fast after a {prompt}-token prompt",
          list(out.items()))
    del model
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3-8b-random", help="a random shape (random_models.py) or any base")
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "llama-3-8b.yaml"))
    p.add_argument("--budget", default="smoke", help="the recipe budget whose per-GPU settings are measured")
    p.add_argument("--steps", type=int, default=6, help="steps per stage (default 6)")
    p.add_argument("--warmup", type=int, default=3, help="steps per stage left out of the timing (default 3)")
    p.add_argument("--out", default="out/bench-8b", help="run folders (overwritten)")
    p.add_argument("--json", default=None, help="write the results here as they come")
    p.add_argument("--skip-base", action="store_true", help="leave out the base model as its own student")
    p.add_argument("--prompt", type=int, default=2048, help="prompt tokens before generate (default 2048)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="recipe overrides, as nha-finetune --set")
    p.add_argument("--allow-cpu", action="store_true", help="a dry run without a GPU (tests; timings meaningless)")
    a = p.parse_args(argv)
    if not CUDA and not a.allow_cpu:
        raise SystemExit("bench_8b needs a CUDA GPU (--allow-cpu for a dry run)")
    if a.warmup < 2:
        raise SystemExit("--warmup must be at least 2 (the profiled step and the one after it are not timed)")
    from nha_convert.backend import loss_choice
    from nha_convert.finetune import budget as B
    from nha_convert.finetune.recipe import read_recipe

    started = time.perf_counter()
    device = torch.cuda.get_device_name() if CUDA else "cpu"
    extra = [f"model.base={a.model}", *a.overrides]
    recipe = read_recipe(a.recipe, a.budget, extra)
    report = Report(Path(a.json) if a.json else None, {
        "model": a.model, "recipe": a.recipe, "budget": a.budget, "device": device, "steps": a.steps,
        "warmup": a.warmup, "torch": torch.__version__, "loss": loss_choice()})
    print(f"{a.model} with {a.recipe} (budget {a.budget}) on {device}")

    models, conv = conversion(recipe)
    report.add("conversion", conv)

    out = Path(a.out)
    profiles: list[Any] = []
    # Profile distill's 2nd step (the callback after global step steps + 1 starts it): outside the timed steps.
    saved: dict[str, float] = {}
    with final_save(saved):
        nha = bench_finetune.run(a.recipe, a.budget, a.steps, a.warmup, out / "nha", "nha", extra, [a.steps + 1],
                                 models=models, profiles=profiles)
    for r in nha:
        r.pop("profile", None)
    del models
    share = nha_share(profiles[0]) if profiles else None
    report.add("training_nha", {"stages": nha, "nha_op_share_of_distill_step": share})
    print(f"\n2. training, NHA student ({a.steps} steps a stage, first {a.warmup} not timed)")
    print(bench_finetune.table({"nha": nha}))
    print(f"NHA op kernels' share of a distill step's GPU time: {share}")

    report.add("save_load_generate", load_generate(out / "nha", saved.get("save_s"), prompt=a.prompt))

    base: list[dict[str, Any]] = []
    if not a.skip_base:
        free()
        with final_save(None):
            base = bench_finetune.run(a.recipe, a.budget, a.steps, a.warmup, out / "base", "base", extra, None)
        report.add("training_base", {"stages": base})
    print("\n4. NHA student against the base model as its own student, same settings")
    print(bench_finetune.table({"nha": nha, "base": base}))

    full = read_recipe(a.recipe, None, extra)
    measured = {r["stage"]: (r["s_per_step"], r["steps_timed"], r["peak_mem_gib"], 0.0) for r in nha}
    costs = B.project(full.stages, measured)
    other = conv["build_and_convert_s"] + (report.data["save_load_generate"]["save_s"] or 0.0)
    print("\n5. " + B.projection_table(costs, other, device))
    report.add("projection", {"other_s": other, "stages": [c.__dict__ for c in costs]})
    report.add("wall_s", round(time.perf_counter() - started, 1))
    print(f"\nbench_8b: {time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main(sys.argv[1:])
