"""One nha-eval run: what to evaluate (`EvalRequest`) in, typed results (`EvalResults`) out.

The CLI parses flags into a request; `run_eval` checks what needs no model, then loads one model at a time
(lm-eval tasks, recall probes, perplexity), then the speed bench and the parity check. It prints nothing itself:
messages and progress bars go through `Progress`, so a library caller can stay silent.
"""

from __future__ import annotations

import gc
import os
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

from ..errors import NHAError
from . import models as M  # called as M.load: tests replace it to prove no model loads before the checks
from .results import EvalResults, EvalSettings, ModelEntry, PerplexityResult

DEFAULT_RECALL_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
DEFAULT_PPL_LEN = 2048

Tick = Callable[[int], None]
BarFactory = Callable[[str, "int | None"], Tick]  # bars(description, total) -> tick(n done)


@contextmanager
def _no_bars() -> Iterator[BarFactory]:
    yield lambda desc, total: (lambda n: None)


@dataclass
class Progress:
    """How a run talks to its caller; the defaults say nothing."""

    log: Callable[[str], None] = lambda text: None
    bars: Callable[[], ContextManager[BarFactory]] = _no_bars
    lm_eval_ready: Callable[[], None] = lambda: None  # once lm-eval's tasks are checked, before it first runs


def _all_probes() -> list[str]:
    from .probes import PROBES

    return list(PROBES)


@dataclass(kw_only=True)
class RecallRequest:
    lengths: list[int] | None = None  # None: DEFAULT_RECALL_LENGTHS up to the shortest context length
    n: int | None = None  # items per cell; None: each probe's default (eval/probes.py: 20 synthetic, 100 natural)
    probes: list[str] = field(default_factory=_all_probes)  # passkey, mqar and the natural probes
    pairs: int = 16
    files: list[Path] = field(default_factory=list)  # --recall-file: JSON lines of {"prompt", "answer"} (recall.py)
    batch_tokens: int | None = None  # tokens per forward; None: 65536 on CUDA, 8192 on CPU
    items: dict[Any, Any] = field(default_factory=dict, repr=False)  # built once, reused by every model of the run


@dataclass(kw_only=True)
class PerplexityRequest:
    seq_len: int | None = None  # None: DEFAULT_PPL_LEN, or the shortest context length if shorter
    sequences: int = 8


@dataclass(kw_only=True)
class BenchRequest:
    """--bench: the base model, then it converted with these settings (an NHA folder is benchmarked as it is)."""

    slots: int = 64
    sinks: int = 0
    full_layers: list[int] = field(default_factory=list)
    full_every: int | None = None
    contexts: list[int] = field(default_factory=lambda: [1024, 4096, 16384])
    batches: list[int | str] = field(default_factory=lambda: [1, 8])
    steps: int = 16
    which: list[str] = field(default_factory=lambda: ["base", "nha"])
    graph: bool = True
    base_runs: list[str] = field(default_factory=lambda: ["auto"])


@dataclass(kw_only=True)
class EvalRequest:
    """Everything `nha-eval` evaluates, as parsed from its flags."""

    models: list[str] = field(default_factory=list)
    compare: list[str] = field(default_factory=list)  # references first; a results.json is merged, not re-run
    tasks: str = "commonsense"  # groups or task names, comma-separated; "none" skips lm-eval
    baseline: str | None = None
    window: int | None = None  # of the baseline and of --bench's conversion
    limit: float | None = None
    num_fewshot: int | None = None
    batch_size: int | str = 16
    device: str = "auto"
    dtype: Any = "auto"  # "auto" or a torch.dtype (the CLI parses the name)
    data: str = "auto"
    mmlu_split: str = "validation"
    seed: int = 1234
    recall: RecallRequest | None = None
    ppl: PerplexityRequest | None = None
    bench: BenchRequest | None = None
    parity: bool = False
    parity_tolerance: float | None = None
    ablate: list[str] = field(default_factory=list)  # "slots": NHA models' recall / perplexity with slots masked
    command: str = ""  # the command line, kept in results.json


def run_eval(request: EvalRequest, progress: Progress | None = None) -> EvalResults:
    """Evaluate, then bench, then check parity, as the request asks."""
    progress = progress or Progress()
    check_request(request)
    results = evaluate(request, progress)
    if request.bench is not None:
        base_spec = next((c for c in request.compare if not c.endswith(".json")), None)
        run_bench(results, (request.models or request.compare or [None])[0], request, progress, base_spec)
    if request.parity:
        from . import parity as P

        dev = M.resolve_device(request.device)
        results.parity = P.run(request.models or request.compare, device=dev,
                               dtype=M.resolve_dtype(request.dtype, dev), tolerance=request.parity_tolerance,
                               log=progress.log)
    return results


def check_request(req: EvalRequest) -> None:
    """What fails without loading a model fails here, before any work: a request that measures nothing, and a
    model path that does not exist (a hub id is only checked when it loads)."""
    from ..hub import check_source

    no_tasks = req.tasks.strip().lower() in ("", "none")
    if no_tasks and req.recall is None and req.ppl is None and req.bench is None and not req.parity:
        raise NHAError("nothing to evaluate with --tasks none: add --recall, --ppl, --bench or --parity, "
                       "or name tasks (e.g. --tasks commonsense)")
    from .ablation import check_ablations

    if check_ablations(req.ablate) and req.recall is None and req.ppl is None:
        raise NHAError("--ablate slots measures recall or perplexity with the slots masked: add --recall or --ppl")
    if req.recall is not None:
        from .probes import get

        for name in req.recall.probes:
            get(name)
        if req.recall.n is not None and req.recall.n < 1:
            raise NHAError(f"--recall-n must be at least 1 (items per probe and length); got {req.recall.n}")
    for spec in [*req.compare, *req.models]:
        if spec.endswith(".json"):
            if not Path(spec).expanduser().is_file():
                raise NHAError(f"no such results file: {spec} (--compare takes a model or an earlier results.json)")
        elif spec not in M.RANDOM_MODELS:
            check_source(spec)


def device_name(device: str) -> str:
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


def _context_of(spec: str | None) -> int | None:
    """max_position_embeddings of a model named on the command line, from its config alone."""
    from .recall import context_length

    cfg = M.folder_config(spec) if spec is not None else {}
    if cfg:
        return context_length(cfg)
    from .. import hub

    return context_length(hub.load_config(spec))


def _lengths(req: EvalRequest, loaded_specs: list[str | None],
             progress: Progress) -> tuple[list[int] | None, int | None]:
    """Probe lengths and the perplexity length, checked against the shortest context of the models to load."""
    from .perplexity import check_seq_len
    from .recall import check_lengths

    contexts = {s: _context_of(s) for s in loaded_specs}
    known = {s: c for s, c in contexts.items() if c is not None}
    shortest = min(known, key=known.get) if known else None
    limit_ctx, who = (known[shortest], M.default_label(shortest)) if shortest is not None else (None, "")
    recall_lengths, ppl_len = None, None
    if req.recall is not None:
        recall_lengths = req.recall.lengths
        if recall_lengths is None:
            recall_lengths = [L for L in DEFAULT_RECALL_LENGTHS if limit_ctx is None or L <= limit_ctx] \
                or [limit_ctx]
            if len(recall_lengths) < len(DEFAULT_RECALL_LENGTHS):
                progress.log(f"recall lengths up to {recall_lengths[-1]} tokens: the context length of {who} "
                             f"is {limit_ctx}")
        check_lengths(recall_lengths, limit_ctx, who)
    if req.ppl is not None:
        ppl_len = req.ppl.seq_len if req.ppl.seq_len is not None else min(DEFAULT_PPL_LEN,
                                                                          limit_ctx or DEFAULT_PPL_LEN)
        check_seq_len(ppl_len, limit_ctx, who)
    return recall_lengths, ppl_len


def evaluate(req: EvalRequest, progress: Progress) -> EvalResults:
    """Evaluate each model in turn (one in memory at a time) into one results object."""
    from . import lm_eval_runner
    from . import tasks as T
    from .training import training_summary

    specs, compare, baseline, window = req.models, req.compare, req.baseline, req.window
    dev = M.resolve_device(req.device)
    dt = M.resolve_dtype(req.dtype, dev)
    task_list = [] if req.tasks.strip().lower() in ("", "none") else T.resolve_tasks(req.tasks)
    settings = EvalSettings(tasks=task_list, limit=req.limit, num_fewshot=req.num_fewshot,
                            batch_size=req.batch_size, mmlu_split=req.mmlu_split, seed=req.seed)
    results = EvalResults(created=datetime.now(timezone.utc).isoformat(timespec="seconds"), command=req.command,
                          device=device_name(dev), dtype=str(dt).replace("torch.", ""), settings=settings)
    recall_or_ppl = req.recall is not None or req.ppl is not None
    if not (task_list or recall_or_ppl):
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
    from ..io import check_weights

    loaded_specs = list(dict.fromkeys([s for what, s in to_load if what != "baseline"]
                                      + ([base_spec] if baseline else [])))
    for s in loaded_specs:
        if s is not None and M.folder_config(s):
            check_weights(Path(s).expanduser())
    recall_lengths, ppl_len = _lengths(req, loaded_specs, progress) if recall_or_ppl else (None, None)
    recall_files = []
    if req.recall is not None:
        from .recall import read_recall_file

        recall_files = [read_recall_file(f) for f in req.recall.files]
        names = [name for name, _ in recall_files]
        if len(set(names)) < len(names):
            raise NHAError(f"two --recall-file files share a name ({', '.join(names)}): their columns would mix; "
                           "rename one")
    manager, data = None, req.data
    if task_list:  # one task index for all models, and unknown names fail before any model loads
        data = lm_eval_runner.choose_data_mode(data)
        manager = lm_eval_runner.task_manager(task_list, data, req.mmlu_split)
        lm_eval_runner.check_tasks(manager, task_list)
        progress.lm_eval_ready()
    used: set[str] = set()

    for what, spec in to_load:
        if what == "baseline":
            progress.log(f"building the {spec} baseline (window {bl_window}) from {base_spec}")
            loaded = M.load_baseline(spec, base_spec, bl_window, bl_full, dt, dev)
        else:
            progress.log(f"loading {spec}")
            loaded = M.load(spec, dt, dev)
        label = loaded.label
        while label in used:  # two models with the same folder name
            label += "'"
        used.add(label)
        loaded.label = label
        entry = ModelEntry.from_dict(loaded.info())
        if loaded.kind == "nha" and spec is not None and (trained := training_summary(spec)):
            entry.training = trained  # the budget stands next to the numbers in report.md
        results.models.append(entry)
        t0 = time.perf_counter()
        if task_list:
            progress.log(f"[b]{label}[/]: lm-eval on {', '.join(task_list)}")
            run = lm_eval_runner.run_tasks(loaded.model, loaded.tokenizer, task_list, limit=req.limit,
                                           num_fewshot=req.num_fewshot, batch_size=req.batch_size, device=dev,
                                           data=data, mmlu_split=req.mmlu_split, seed=req.seed, manager=manager)
            results.tasks[label] = run.scores
            results.samples[label] = run.samples
            settings.data = run.data
        _measure(results.recall, results.perplexity, label, loaded, req, recall_lengths, ppl_len, recall_files,
                 dev, progress)
        if "slots" in req.ablate and loaded.kind == "nha":
            from .ablation import has_slots, slots_masked

            if has_slots(loaded.model):
                progress.log(f"[b]{label}[/]: again with the slots masked (--ablate slots)")
                masked: dict[str, Any] = {"recall": {}, "perplexity": {}}
                with slots_masked(loaded.model):
                    _measure(masked["recall"], masked["perplexity"], label, loaded, req, recall_lengths, ppl_len,
                             recall_files, dev, progress, " (slots masked)")
                results.ablation = results.ablation or {}
                ppl = masked["perplexity"].get(label)
                results.ablation[label] = {"slots": {"recall": masked["recall"].get(label),
                                                     "perplexity": ppl.to_dict() if ppl is not None else None}}
        results.seconds[label] = time.perf_counter() - t0
        _free(loaded.model)
        loaded.model = None

    # The model under test (the gate's default): the first one named without --compare.
    results.subject = next((m.label for m, (what, s) in zip(results.models, to_load)
                            if what == "model" and s in specs), None)
    from .results import load_results

    for path in earlier:
        results.merge(load_results(path))
    ref = compare[0] if compare else None
    if ref is not None:
        ref_label = M.default_label(ref) if not ref.endswith(".json") else load_results(ref).models[0].label
        results.reference = ref_label if ref_label in results.labels() else None
    return results


def _measure(recall: dict[str, Any], perplexity: dict[str, Any], label: str, loaded: Any, req: EvalRequest,
             recall_lengths: list[int] | None, ppl_len: int | None, recall_files: list[Any], dev: str,
             progress: Progress, note: str = "") -> None:
    """The recall probes and perplexity of one loaded model into recall[label] and perplexity[label]."""
    if req.recall is not None:
        from .recall import run_recall

        batch_tokens = req.recall.batch_tokens or (65536 if dev.startswith("cuda") else 8192)
        with progress.bars() as bars:
            recall[label] = run_recall(
                loaded.model, loaded.tokenizer, recall_lengths or [], req.recall.probes, n=req.recall.n,
                seed=req.seed, n_pairs=req.recall.pairs, batch_tokens=batch_tokens, cache=req.recall.items,
                progress=lambda desc, total: bars(f"{label}{note} {desc}", total), files=recall_files)
    if req.ppl is not None:
        from .perplexity import perplexity_by_position

        with progress.bars() as bars:
            tick = bars(f"{label}{note} perplexity ({ppl_len} tokens per sequence)", req.ppl.sequences)
            perplexity[label] = PerplexityResult.from_dict(perplexity_by_position(
                loaded.model, loaded.tokenizer, seq_len=ppl_len, max_sequences=req.ppl.sequences, on_batch=tick))


def run_bench(results: EvalResults, spec: str | None, req: EvalRequest, progress: Progress,
              base_spec: str | None = None) -> None:
    """Base rows (one set per way of running it), then the same model converted in place (one copy in memory),
    into results.bench. An NHA model is benchmarked as it is, after `base_spec` (the --compare base) when given."""
    import torch

    import nha_convert

    from ..settings import NHASettings
    from . import bench as B
    from .results import BenchResults

    b = req.bench
    assert b is not None
    dev = M.resolve_device(req.device)
    dt = M.resolve_dtype(req.dtype, dev)
    bad = [w for w in b.which if w not in ("base", "nha")]
    if bad or not b.which:
        raise NHAError(f"--bench-models takes base and/or nha; got {','.join(b.which) or 'nothing'}")
    runs = b.base_runs or ["auto"]
    if runs == ["auto"]:
        runs = list(B.BASE_RUNS) if torch.device(dev).type == "cuda" else ["eager"]
    if any(r not in B.BASE_RUNS for r in runs):
        raise NHAError(f"--bench-base-runs takes {', '.join(B.BASE_RUNS)} (or auto); got {','.join(runs)}")
    rows: list[dict[str, Any]] = []
    log = progress.log

    def base_rows(model: Any) -> list[dict[str, Any]]:
        out = []
        for run in runs:
            label, mode, cudnn = B.BASE_RUNS[run]
            out += [r.to_dict() for r in B.bench_model(model, label, b.contexts, b.batches, b.steps, log=log,
                                                       decode=mode, cudnn=cudnn, prefill=mode == "eager")]
        return out

    if "base" in b.which and base_spec is not None and spec is not None and M.is_nha_folder(spec):
        log(f"bench: loading {base_spec} ({dt}, {dev})")
        base_model = M.load(base_spec, dt, dev).model
        rows += base_rows(base_model)
        del base_model
        _free()
    log(f"bench: loading {spec or 'smollm2-135m'} ({dt}, {dev})")
    loaded = M.load(spec, dt, dev)
    settings = None
    if loaded.kind in ("base", "random"):
        if "base" in b.which:
            rows += base_rows(loaded.model)
        if "nha" in b.which:
            settings = NHASettings(window=64 if req.window is None else req.window, slots=b.slots, sinks=b.sinks,
                                   full_layers=b.full_layers, full_every=b.full_every)
            nha_convert.convert(loaded.model, settings)
    if "nha" in b.which:
        rows += [r.to_dict() for r in B.bench_model(loaded.model, "nha", b.contexts, b.batches, b.steps, log=log,
                                                    decode="graph" if b.graph else "eager")]
    bench = results.bench = results.bench or BenchResults()
    bench.rows.extend(rows)
    bench.speedups = B.speedups(bench.rows)
    for sp in bench.speedups:
        x = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
        log(f"speedup ctx={sp['context']} batch={sp['batch']}: decode {x(sp['decode_x'])} "
            f"({sp['nha_run']} vs fastest base: {sp['base_run']}), prefill {x(sp['prefill_x'])}")
    bench.runs = bench.runs or []
    bench.runs.append({
        "model": loaded.source, "device": device_name(dev), "dtype": str(dt).replace("torch.", ""),
        "nha": dict(loaded.model.config.nha) if getattr(loaded.model.config, "nha", None) else None,
        "settings": None if settings is None else vars(settings)})
    if not results.device:
        results.device = device_name(dev)
    _free(loaded.model)
