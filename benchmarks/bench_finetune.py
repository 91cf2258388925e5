"""Training throughput per stage: the NHA student, and in the same run the base model as its own student.

    python benchmarks/bench_finetune.py                                   # recipes/smollm2-135m.yaml, gpu budget
    python benchmarks/bench_finetune.py RECIPE --budget gpu --steps 30 --warmup 5 --json docs/bench/finetune.json
    python benchmarks/bench_finetune.py --profile                         # + where one step of each stage goes
    python benchmarks/bench_finetune.py --students nha --steps 4 --sync-debug   # which lines wait for the GPU
    NHA_LOSS=torch python benchmarks/bench_finetune.py                    # the chunked torch loss instead of liger's fused one

Both runs use the recipe's stages, batch shapes, data and dtype with a fixed step count (time budgets are replaced
by --steps) and no checkpoints; the base run is the same recipe with `model.nha: null` (full attention, LoRA on the
same projections, the same teacher). Real tokens/s is counted over the steps after --warmup (the first steps
compile and autotune kernels), from the trainer's own metrics.jsonl: (tokens at the last step - tokens at the
warm-up step) / (time between them); every step ends in a host sync (the loss statistics), so the times are real.
Prints one table (stage, real tokens/s of each student, NHA / base, padding, peak memory) and writes it as JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import traceback
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def run(recipe_path: str, budget: str, steps: int, warmup: int, out: Path, student: str, extra: list[str],
        profile_steps: list[int] | None, models: tuple | None = None,
        profiles: list[Any] | None = None) -> list[dict[str, Any]]:
    """Train the recipe for `steps` steps per stage; one record per stage from metrics.jsonl. `models`: (student,
    teacher, tokenizer) already built (benchmarks/bench_8b.py times the conversion itself); `profiles`: receives
    each profiled step's key_averages()."""
    from nha_convert.finetune.recipe import read_recipe
    from nha_convert.finetune.trainer import Trainer

    probe = read_recipe(recipe_path, budget)
    sets = [f"stages.{s.name or i}.steps={steps}" for i, s in enumerate(probe.stages)]
    sets += [f"output.dir={out}", "output.checkpoint_every=0", "output.log_every=1"]
    last = ["model.nha=null"] if student == "base" else []  # after `extra`, which may set model.nha fields
    recipe = read_recipe(recipe_path, budget, sets + extra + last)
    callback, tables = _profiler(profile_steps, profiles) if profile_steps else (None, [])
    Trainer(recipe, overwrite=True, step_callback=callback, models=models).run()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    records = []
    for i, stage in enumerate(recipe.stages):
        name = stage.name or stage.kind
        rows = [x for x in lines if x.get("stage") == name and "event" not in x and "loss" in x]
        records.append(summarise(name, stage.kind, rows, warmup=warmup,
                                 global_batch=stage.batch_size * stage.grad_accum, seq_len=stage.seq_len))
        if i < len(tables):
            records[-1]["profile"] = tables[i]
    return records


def summarise(name: str, kind: str, rows: list[dict], *, warmup: int, global_batch: int,
              seq_len: int) -> dict[str, Any]:
    """Real tokens/s over the steps after `warmup` >= 1 (needs log_every 1: one metrics line per step)."""
    if len(rows) <= warmup:
        raise SystemExit(f"stage {name}: {len(rows)} logged steps, need more than --warmup {warmup}; raise --steps")
    a, b = rows[warmup - 1], rows[-1]
    tokens, seconds = b["tokens"] - a["tokens"], b["time_s"] - a["time_s"]
    timed = rows[warmup:]
    return {
        "stage": name, "kind": kind, "steps_timed": len(timed), "global_batch": global_batch, "seq_len": seq_len,
        "real_tokens_per_s": round(tokens / seconds, 1), "s_per_step": round(seconds / len(timed), 4),
        "positions_per_s": round(len(timed) * global_batch * seq_len / seconds, 1),
        "padding_frac": round(sum(r["padding_frac"] for r in timed) / len(timed), 4),
        "peak_mem_gib": max((r.get("peak_mem_gib", 0.0) for r in rows), default=0.0),
        "final_loss": rows[-1]["loss"],
    }


def _profiler(at: list[int], averages: list[Any] | None = None):
    """A step callback that profiles the step after each global step in `at` (one table per profiled step; each
    step's key_averages() appended to `averages` when given)."""
    from torch.profiler import ProfilerActivity, profile

    tables: list[str] = []
    state: dict[str, Any] = {"prof": None}
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"

    def callback(global_step: int) -> None:
        if state["prof"] is not None:
            state["prof"].__exit__(None, None, None)
            events = state["prof"].key_averages()
            tables.append(events.table(sort_by=key, row_limit=25, max_name_column_width=70))
            if averages is not None:
                averages.append(events)
            state["prof"] = None
        if global_step in at:
            state["prof"] = profile(activities=acts)
            state["prof"].__enter__()

    return callback, tables


def _sync_counter() -> Any:
    """Count the host-device synchronisations by the source lines that cause them (torch's sync debug mode warns
    at each one; the innermost frames of this package, the kernels, peft or transformers name the cause)."""
    import collections
    import traceback
    import warnings

    counts: collections.Counter = collections.Counter()
    ours = ("nha_convert", "nha_kernels", "peft", "transformers", "benchmarks")

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        frames = [f for f in traceback.extract_stack()[:-1] if any(s in f.filename for s in ours)]
        where = " <- ".join(f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno}" for f in frames[-3:][::-1])
        counts[where or f"{filename}:{lineno}"] += 1

    warnings.simplefilter("always")
    warnings.showwarning = show
    torch.cuda.set_sync_debug_mode("warn")
    return counts


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    nha, base = results.get("nha", []), results.get("base", [])
    head = ("| stage | kind | batch x seq | NHA real tok/s | base-as-student real tok/s | NHA / base | NHA s/step | "
            "padding | NHA peak GiB | base peak GiB |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for i, n in enumerate(nha or base):
        b = base[i] if i < len(base) else None
        n = nha[i] if i < len(nha) else None
        ratio = f"{n['real_tokens_per_s'] / b['real_tokens_per_s']:.2f}" if n and b else "-"
        ref = n or b
        lines.append(
            f"| {ref['stage']} | {ref['kind']} | {ref['global_batch']} x {ref['seq_len']} | "
            f"{n['real_tokens_per_s'] if n else '-'} | {b['real_tokens_per_s'] if b else '-'} | {ratio} | "
            f"{n['s_per_step'] if n else '-'} | {ref['padding_frac']:.3f} | {n['peak_mem_gib'] if n else '-'} | "
            f"{b['peak_mem_gib'] if b else '-'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", default=str(ROOT / "recipes" / "smollm2-135m.yaml"))
    parser.add_argument("--budget", default="auto", help="the recipe budget (auto: gpu when CUDA is visible)")
    parser.add_argument("--steps", type=int, default=30, help="steps per stage (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="steps per stage left out of the timing (default 5)")
    parser.add_argument("--students", default="nha,base", help="nha, base or both (default nha,base)")
    parser.add_argument("--out", default="out/bench-finetune", help="run folders (overwritten)")
    parser.add_argument("--json", default=None, help="write the results here (e.g. docs/bench/finetune.json)")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of one step per "
                        "stage (the first timed one, which the profiler slows: time without --profile)")
    parser.add_argument("--sync-debug", action="store_true", help="count host-device synchronisations by the "
                        "source lines that cause them (slow: time without it)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="recipe overrides, as nha-finetune --set")
    args = parser.parse_args(argv)
    if args.warmup < 1:
        raise SystemExit("--warmup must be at least 1 (the first step compiles and autotunes)")
    from nha_convert.backend import loss_choice
    from nha_convert.finetune.recipe import read_recipe

    budget = read_recipe(args.recipe, args.budget).budget or "none"
    n_stages = len(read_recipe(args.recipe, args.budget).stages)
    at = [i * args.steps + args.warmup for i in range(n_stages)] if args.profile else None
    results: dict[str, list[dict[str, Any]]] = {}
    failed: dict[str, str] = {}
    syncs = _sync_counter() if args.sync_debug and torch.cuda.is_available() else None
    for student in [s.strip() for s in args.students.split(",") if s.strip()]:
        if student not in ("nha", "base"):
            raise SystemExit(f"--students takes nha and/or base, not {student!r}")
        try:
            results[student] = run(args.recipe, args.budget, args.steps, args.warmup, Path(args.out) / student,
                                   student, args.overrides, at)
        except Exception as err:  # one student's crash must not lose the other's figures (session 7: liger)
            traceback.print_exc()
            failed[student] = (f"{type(err).__name__}: {err}".splitlines() or [""])[0][:300]
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\n{args.recipe} (budget {budget}), {args.steps} steps per stage, first {args.warmup} not timed; "
          f"{device}; loss {loss_choice()}\n")
    print(table(results))
    for student, why in failed.items():
        print(f"{student} student failed: {why}")
    for student, records in results.items():
        for r in records:
            if "profile" in r:
                print(f"\n=== profile: {student} student, stage {r['stage']}, one step\n{r.pop('profile')}")
    if syncs is not None:
        print(f"\n=== host-device synchronisations over the whole run: {sum(syncs.values())}; top sources")
        for where, n in syncs.most_common(30):
            print(f"{n:7d}  {where}")
    if args.json:
        payload = {"recipe": args.recipe, "budget": budget, "device": device, "steps": args.steps,
                   "warmup": args.warmup, "loss": loss_choice(), "torch": torch.__version__,
                   "results": results, "failed": failed}
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
        tmp.replace(path)
    if failed:
        raise SystemExit(f"bench_finetune: the {' and '.join(failed)} student failed (traceback above); the table "
                         "holds what finished")


if __name__ == "__main__":
    main(sys.argv[1:])
