"""Held-out perplexity before and after a recipe, next to sliding-window attention trained with the same budget.

    python benchmarks/compare.py recipes/smollm2-135m.yaml --budget gpu -o out/compare

1. the base model; 2. the recipe's NHA conversion, untrained; 3. a sliding-window baseline (NHA with 0 slots and
`--swa-sinks` sinks, same window), untrained; 4. the recipe trained; 5. the baseline trained with the recipe's
stages and exactly the same step counts (so the same tokens). Perplexity: nha_convert.eval.perplexity on the
held-out Shakespeare text (never trained on). Recall (what a window cannot fake): passkey with the key at depths
spread over 5-95% and multi-query associative recall (eval/recall.py) at `--recall-lengths` (1K-8K tokens), for
every row; `--tasks commonsense,lambada` adds lm-eval tasks. With `full_layers: auto:K` the baseline keeps the
layers the NHA conversion chose, so both differ only in the slots. Writes compare.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run by path from a checkout

from nha_convert.backend import environment, use_backend
from nha_convert.errors import NHAError
from nha_convert.io import atomic_write
from nha_convert.loading import load_converted
from nha_convert.settings import ResolvedNHA
from nha_convert.finetune.recipe import read_recipe, stage_name


def heldout_ppl(model: Any, tokenizer: Any, seq_len: int, sequences: int) -> dict[str, Any]:
    from nha_convert.eval.perplexity import perplexity_by_position

    model.eval()
    with torch.no_grad():
        return perplexity_by_position(model, tokenizer, seq_len=seq_len, max_sequences=sequences)


def measure(model: Any, tokenizer: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Held-out perplexity by position, recall by probe and length, and the lm-eval tasks asked for."""
    p = heldout_ppl(model, tokenizer, args.ppl_len, args.ppl_seqs)
    out: dict[str, Any] = {"ppl": p["overall_ppl"], "ppl_by_position": dict(zip(p["buckets"], p["ppl"]))}
    lengths = [int(x) for x in args.recall_lengths.split(",") if x.strip()]
    if lengths:
        from nha_convert.eval.recall import run_recall

        with torch.no_grad():
            out["recall"] = run_recall(model, tokenizer, lengths, n=args.recall_items)
    if args.tasks != "none":
        from nha_convert.eval.lm_eval_runner import run_tasks
        from nha_convert.eval.tasks import resolve_tasks

        run = run_tasks(model, tokenizer, resolve_tasks(args.tasks), limit=args.task_limit, batch_size=8)
        out["tasks"] = run.scores
    return out


def stage_steps_from_metrics(metrics: Path) -> dict[str, int]:
    """Steps each stage actually ran (the last logged step of each stage)."""
    steps: dict[str, int] = {}
    for line in metrics.read_text().splitlines():
        r = json.loads(line)
        if "event" not in r and "step" in r:
            steps[r["stage"]] = max(steps.get(r["stage"], 0), r["step"])
    return steps


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("-b", "--budget", default="auto")
    ap.add_argument("-o", "--output", required=True, help="report folder: compare.json and each run's metrics")
    ap.add_argument("--work", help="folder for the training runs (default: OUTPUT/runs)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--swa-sinks", type=int, default=4)
    ap.add_argument("--ppl-len", type=int, default=2048)
    ap.add_argument("--ppl-seqs", type=int, default=8)
    ap.add_argument("--recall-lengths", default="1024,2048,4096,8192",
                    help="comma-separated probe lengths in tokens (empty: no recall)")
    ap.add_argument("--recall-items", type=int, default=20, help="passkey and MQAR items per length")
    ap.add_argument("--tasks", default="none", help="lm-eval tasks or groups, e.g. commonsense,lambada")
    ap.add_argument("--task-limit", type=float, default=None, help="questions per task (default: all)")
    ap.add_argument("--rows", default="base,untrained,nha,swa",
                    help="which rows to run (comma-separated): base, untrained (NHA and SWA before training), nha "
                         "(the recipe), swa (the baseline trained with the recipe's steps; with 'nha' absent, give "
                         "its step counts with --set stages.NAME.steps=N). Lets one device call train one model.")
    args = ap.parse_args(argv)

    from nha_convert.finetune.models import build_models
    from nha_convert.finetune.trainer import Trainer

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else out / "runs"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    recipe = read_recipe(args.recipe, budget=None if args.budget == "none" else args.budget,
                         overrides=args.overrides + [f"output.dir={work / 'nha'}"])
    nha = dict(recipe.model.nha or {})
    swa = {**nha, "slots": 0, "sinks": args.swa_sinks}
    swa_label = f"SWA-{nha.get('window', 64)}+{args.swa_sinks} sinks"
    try:
        import nha_kernels  # noqa: F401

        backend = "triton (forward and backward)" if device.type == "cuda" else "torch"
    except ImportError:
        backend = "torch"
    report: dict[str, Any] = {"backend": backend, "torch": torch.__version__, "recipe": args.recipe, "budget": recipe.budget, "overrides": args.overrides,
                              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                              "nha": nha, "swa": swa, "ppl_len": args.ppl_len, "ppl_seqs": args.ppl_seqs,
                              "recall_lengths": args.recall_lengths, "recall_items": args.recall_items,
                              "tasks": args.tasks, "task_limit": args.task_limit,
                              "rows": []}

    def save() -> None:
        atomic_write(out / "compare.json", lambda p: p.write_text(json.dumps(report, indent=1)))

    def row(label: str, fn) -> Any:
        t0 = time.perf_counter()
        try:
            result = fn()
        except Exception as e:  # one failing phase must not lose the others' numbers
            traceback.print_exc()
            result = {"error": f"{type(e).__name__}: {e}"}
            if device.type == "cuda" and environment().backend == "auto":  # retry on the torch reference op
                try:
                    with use_backend("torch"):
                        result = {**fn(), "backend": "torch (after a kernel error)", "kernel_error": result["error"]}
                except Exception as e2:
                    traceback.print_exc()
                    result["retry_error"] = f"{type(e2).__name__}: {e2}"
        rec = {"model": label, **result, "seconds": round(time.perf_counter() - t0, 1)}
        report["rows"].append(rec)
        save()
        print(json.dumps({k: v for k, v in rec.items() if k not in ("ppl_by_position", "recall")}), flush=True)
        return rec

    def untrained(settings: dict | None):
        def fn():
            r = copy.deepcopy(recipe)
            r.model.nha = settings
            model, _, tok = build_models(r, device)
            share_full_layers(model, settings)
            return measure(model.eval(), tok, args)
        return fn

    def share_full_layers(model: Any, settings: dict | None) -> None:
        """auto:K: the baseline gets the layers the NHA conversion chose (same full layers, no slots)."""
        if settings is nha and isinstance(nha.get("full_layers"), str):
            swa["full_layers"] = list(ResolvedNHA.from_config(model.config).full_layers)
            report["swa"] = swa

    def trained(settings: dict, run: str, extra: list[str]):
        def fn():
            r = read_recipe(args.recipe, budget=None if args.budget == "none" else args.budget,
                            overrides=args.overrides + extra + [f"output.dir={work / run}"])
            r.model.nha = settings
            t0 = time.perf_counter()
            final = Trainer(r, overwrite=True).run()
            train_s = time.perf_counter() - t0
            model, tok = load_converted(final, torch.float32, device)
            share_full_layers(model, settings)
            measured = measure(model.eval(), tok, args)
            metrics = work / run / "metrics.jsonl"
            shutil.copyfile(metrics, out / f"{run}_metrics.jsonl")
            steps = stage_steps_from_metrics(metrics)
            tokens = [json.loads(x) for x in metrics.read_text().splitlines()]
            seen = max((x.get("tokens", 0) for x in tokens if "event" not in x), default=0)
            return {**measured, "steps": steps, "train_tokens": seen, "train_seconds": round(train_s, 1)}
        return fn

    rows = {r.strip() for r in args.rows.split(",") if r.strip()}
    unknown = rows - {"base", "untrained", "nha", "swa"}
    if unknown:
        raise NHAError(f"--rows: unknown row(s) {', '.join(sorted(unknown))}; choose from base, untrained, nha, swa")
    base = row("base", untrained(None)) if "base" in rows else {}
    if "untrained" in rows:
        row(f"NHA w{nha.get('window')} m{nha.get('slots')}, no training", untrained(nha))
        row(f"{swa_label}, no training", untrained(swa))
    same: list[str] | None = []  # the SWA run's step overrides: the NHA run's counts, or those given by --set
    if "nha" in rows:
        nha_trained = row(f"NHA w{nha.get('window')} m{nha.get('slots')}, trained", trained(nha, "nha", []))
        same = [f"stages.{name}.steps={n}" for name, n in nha_trained.get("steps", {}).items()] or None
    if "swa" in rows and same is not None:
        same += [f"stages.{stage_name(s)}.max_minutes=null" for s in recipe.stages]
        row(f"{swa_label}, trained (same steps)", trained(swa, "swa", same))
    if "ppl" in base:
        for rec in report["rows"]:
            if "ppl" in rec:
                rec["vs_base"] = rec["ppl"] / base["ppl"] - 1
        save()
    print("\n| model | held-out ppl | vs base | steps | train s |\n|---|---|---|---|---|")
    for rec in report["rows"]:
        ppl = f"{rec['ppl']:.3f}" if "ppl" in rec else rec.get("error", "")[:60]
        vs = f"{100 * rec['vs_base']:+.1f}%" if "vs_base" in rec else ""
        steps = ", ".join(f"{k} {v}" for k, v in rec.get("steps", {}).items())
        print(f"| {rec['model']} | {ppl} | {vs} | {steps} | {rec.get('train_seconds', '')} |")
    print_recall(report["rows"])


def print_recall(rows: list[dict[str, Any]]) -> None:
    """Markdown: one row per model, one column per probe and length (accuracy in %)."""
    cols = sorted({(p, L) for rec in rows for p, by_len in (rec.get("recall") or {}).items() if p != "chance"
                   for L in by_len}, key=lambda c: (c[0], int(c[1])))
    if not cols:
        return
    print("\n| model | " + " | ".join(f"{p} @ {L}" for p, L in cols) + " |\n|---|" + "---|" * len(cols))
    for rec in rows:
        r = rec.get("recall") or {}
        cells = [f"{100 * r[p][L]:.0f}" if L in r.get(p, {}) else "" for p, L in cols]
        print(f"| {rec['model']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    try:
        main()
    except NHAError as e:
        raise SystemExit(f"error: {e}")
