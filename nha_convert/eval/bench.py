"""Speed and memory: prefill latency, decode tokens/s, peak memory and decode state by context length and batch.

Works on any device: tiny sizes on a CPU (tests), real sizes on a GPU, including the 8B shapes with random weights
(random_models.py: llama-3-8b-random, qwen2.5-7b-random, qwen3-8b-random) built directly on the device in bf16.

Decode is measured on a real cache: one sequence is prefilled, then its cache is repeated to the batch size
(`Cache.batch_repeat_interleave`), so a batch of 100 sequences at 32K context costs one 32K prefill, not 100.
Random token ids feed both phases: speed does not depend on what the tokens say.

Decode modes (`bench_model(decode=...)`), so that NHA is compared with the fastest base:
- "eager": transformers' default path, one Python-launched step at a time (the model's own cache);
- "graph": NHA: the same NHACache, full-attention buffers reserved up front, each step replayed from a CUDA graph
  (nha_convert/decode_graph.py); base: transformers' StaticCache filled from the prefill, replayed the same way;
- `sdpa_cudnn=False` runs a model with PyTorch's cuDNN SDPA backend off (it re-plans at every new key length).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from ..compat import CACHE_KWARG, output_cache
from ..errors import NHAError
# The random-weight shapes (defined in random_models.py) are what the bench runs without a download.
from ..random_models import RANDOM_MODELS, random_model  # noqa: F401

GIB = 1024**3
MIB = 1024**2


@dataclass
class BenchRow:
    model: str
    context: int
    batch: int
    prefill_s: float | None = None  # one forward over batch x context tokens
    prefill_tok_s: float | None = None
    decode_tok_s: float | None = None  # new tokens per second, all sequences together
    decode_ms_per_step: float | None = None
    state_mib_per_seq: float | None = None  # decode cache bytes per sequence after `context` tokens
    peak_mem_gib: float | None = None  # device peak (weights included); None on CPU
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cache_nbytes(cache: Any) -> int:
    """Bytes a decode cache holds: NHACache knows its own; dense caches are summed over their layers."""
    if hasattr(cache, "nbytes") and callable(cache.nbytes):
        return int(cache.nbytes())
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@torch.no_grad()
def _forward(model: Any, ids: torch.Tensor, cache: Any = None, use_cache: bool = False) -> Any:
    return model(input_ids=ids, **{CACHE_KWARG: cache}, use_cache=use_cache, logits_to_keep=1)


@torch.no_grad()
def time_prefill(model: Any, batch: int, context: int, vocab: int, device: torch.device,
                 repeats: int = 2) -> float:
    """Best of `repeats` forward passes over (batch, context) random tokens (the first also warms kernels up)."""
    ids = torch.randint(0, vocab, (batch, context), device=device)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        _forward(model, ids)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


@torch.no_grad()
def prefill_cache(model: Any, context: int, vocab: int, device: torch.device) -> tuple[Any, torch.Tensor, float]:
    """One sequence's cache after `context` tokens, its next token, and the prefill time."""
    ids = torch.randint(0, vocab, (1, context), device=device)
    _sync(device)
    t0 = time.perf_counter()
    out = _forward(model, ids, use_cache=True)
    _sync(device)
    return output_cache(out), out.logits[:, -1:].argmax(-1), time.perf_counter() - t0


CPU_WARMUP_TOKENS = 128
DECODE_WARMUP = 3  # untimed steps: two eager ones, then (graph mode) the capture and its first replay


@torch.no_grad()
def time_decode(model: Any, cache: Any, next_tok: torch.Tensor, steps: int, device: torch.device,
                warmup: int = DECODE_WARMUP, graph: bool = False) -> float:
    """Seconds per decode step (greedy, one new token per sequence per step) after `warmup` untimed steps.

    graph=True: steps go through GraphedDecodeStep (replayed from a CUDA graph on CUDA); the cache must hold
    context + warmup + steps tokens without growing (NHACache.reserve, or a StaticCache of that length)."""
    from ..decode_graph import GraphedDecodeStep, seq_length

    tok = next_tok
    step = GraphedDecodeStep(model, cache, torch.full_like(tok, seq_length(cache))) if graph else None
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        if step is not None:
            logits = step(tok)
        else:
            out = _forward(model, tok, cache=cache, use_cache=True)
            cache, logits = output_cache(out), out.logits
        tok = logits[:, -1:].argmax(-1)
    _sync(device)
    return (time.perf_counter() - t0) / max(steps, 1)


def static_cache_from(model: Any, cache: Any, batch: int, capacity: int) -> Any:
    """transformers' StaticCache of `capacity` tokens holding `batch` copies of a one-sequence DynamicCache."""
    from transformers import StaticCache

    static = StaticCache(config=model.config, max_cache_len=capacity)
    for i, layer in enumerate(cache.layers):
        k, v = layer.keys, layer.values
        static.update(k.expand(batch, *k.shape[1:]), v.expand(batch, *v.shape[1:]), i)
    return static


@contextlib.contextmanager
def sdpa_cudnn(enabled: bool) -> Iterator[None]:
    """PyTorch's cuDNN SDPA backend on or off for the block (the other backends stay as they are)."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(enabled)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def max_batch(state_bytes_per_seq: int, device: torch.device, fraction: float = 0.8, cap: int = 4096) -> int:
    """The largest batch whose decode state fits in `fraction` of the device memory still free."""
    if device.type != "cuda" or state_bytes_per_seq <= 0:
        return 1
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(cap, int(fraction * free // state_bytes_per_seq)))


def bench_model(
    model: Any,
    label: str,
    contexts: Sequence[int],
    batches: Sequence[int | str] = (1,),
    decode_steps: int = 16,
    prefill_token_budget: int = 1 << 17,
    decode_contexts: Sequence[int] | None = None,
    log: Callable[[str], None] = lambda s: None,
    prefill_repeats: int = 2,
    decode: str = "eager",
    cudnn: bool = True,
    prefill: bool = True,
) -> list[BenchRow]:
    """Rows for every (context, batch): prefill (when batch x context <= the token budget) and decode.

    A batch of "max" means the largest batch whose decode state fits (from the measured state per sequence);
    if decoding still runs out of memory (transient buffers of a step), it is cut by a quarter and retried.
    decode: "eager" or "graph" (see the module docstring); cudnn=False turns the cuDNN SDPA backend off;
    prefill=False skips the prefill timings (a variant whose prefill another row already measured).
    """
    if decode not in ("eager", "graph"):
        raise NHAError(f"decode mode is eager or graph, got {decode!r}")
    with sdpa_cudnn(cudnn):
        return _bench_model(model, label, contexts, batches, decode_steps, prefill_token_budget, decode_contexts,
                            log, prefill_repeats, decode, prefill)


def _bench_model(model: Any, label: str, contexts: Sequence[int], batches: Sequence[int | str], decode_steps: int,
                 prefill_token_budget: int, decode_contexts: Sequence[int] | None, log: Callable[[str], None],
                 prefill_repeats: int, decode: str, prefill: bool) -> list[BenchRow]:
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    rows: list[BenchRow] = []
    decode_contexts = list(contexts) if decode_contexts is None else list(decode_contexts)
    # Warm-up: kernels compile, allocators settle. A CPU compiles nothing: a short input touches every op, where a
    # full-length one would cost as much as the row itself (make demo benches SmolLM2 at 2K tokens on 2 cores).
    warm = min(contexts) if device.type == "cuda" else min(min(contexts), CPU_WARMUP_TOKENS)
    _forward(model, torch.randint(0, vocab, (1, warm), device=device))
    for ctx in contexts:
        _free_memory(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            cache, tok, t_cache = prefill_cache(model, ctx, vocab, device)
            # A CPU times the prefill that built the cache (steady after the warm-up): best-of-n would repeat the
            # slowest step of the row n times.
            prefill_1 = None if not prefill else t_cache if device.type != "cuda" else \
                time_prefill(model, 1, ctx, vocab, device, prefill_repeats)
        except RuntimeError as e:
            if not _is_oom(e):
                raise
            rows.append(BenchRow(label, ctx, 1, note="out of memory at prefill"))
            log(f"{label} ctx={ctx}: out of memory at prefill")
            continue
        per_seq = cache_nbytes(cache)
        _free_memory(device)  # cached activation blocks would otherwise count as used when sizing "max"
        for b in batches:
            B = max_batch(per_seq, device) if b == "max" else int(b)
            row = None
            for _attempt in range(10):
                row = _bench_row(model, label, ctx, B, cache, tok, per_seq, prefill_1, vocab, device,
                                 decode_steps if ctx in decode_contexts else 0,
                                 prefill_token_budget if prefill else 0, prefill_repeats, decode)
                if row.note != "out of memory" or b != "max":
                    break
                B = max(1, int(B * 0.75))
            if b == "max":
                row.note = (row.note + " " if row.note else "") + "max batch"
            rows.append(row)
            log(_fmt(row))
        del cache
    return rows


def _bench_row(model: Any, label: str, ctx: int, B: int, cache: Any, tok: torch.Tensor, per_seq: int,
               prefill_1: float | None, vocab: int, device: torch.device, steps: int, budget: int,
               repeats: int, decode: str = "eager") -> BenchRow:
    graphed = decode == "graph" and device.type == "cuda"  # elsewhere the same steps run eagerly
    row = BenchRow(label, ctx, B, state_mib_per_seq=per_seq / MIB, note="graph" if graphed and steps else "")
    _free_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        if B == 1:
            row.prefill_s = prefill_1
        elif B * ctx <= budget:
            row.prefill_s = time_prefill(model, B, ctx, vocab, device, repeats)
        if row.prefill_s:
            row.prefill_tok_s = B * ctx / row.prefill_s
        if steps > 0:
            total = ctx + DECODE_WARMUP + steps
            if decode == "graph" and not hasattr(cache, "reserve"):  # a dense base cache: StaticCache
                c = static_cache_from(model, cache, B, total)
            else:
                c = copy.deepcopy(cache)
                if hasattr(c, "reserve"):  # NHACache: full-attention buffers sized before the batch is expanded
                    c.reserve(total)
                if B > 1:
                    c.batch_repeat_interleave(B)
            sec = time_decode(model, c, tok.repeat(B, 1), steps, device, graph=decode == "graph")
            row.decode_ms_per_step = sec * 1e3
            row.decode_tok_s = B / sec
            del c
    except RuntimeError as e:
        if not _is_oom(e):
            raise
        row.note = "out of memory"
    finally:
        c = None
        _free_memory(device)
    if device.type == "cuda":
        row.peak_mem_gib = torch.cuda.max_memory_allocated(device) / GIB
    return row


# The ways to run the base model that --bench can time (label suffix, decode mode, cuDNN SDPA on).
BASE_RUNS: dict[str, tuple[str, str, bool]] = {
    "eager": ("base", "eager", True),  # transformers' default
    "nocudnn": ("base-nocudnn", "eager", False),
    "static": ("base-static-graph", "graph", True),  # StaticCache, CUDA-graph replay
}


def _fmt(row: BenchRow) -> str:
    def f(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    return (f"{row.model:>12} ctx={row.context:>6} B={row.batch:>4} prefill={f(row.prefill_s, '.3f')}s "
            f"decode={f(row.decode_tok_s, '.1f')} tok/s state={f(row.state_mib_per_seq, '.2f')} MiB/seq "
            f"peak={f(row.peak_mem_gib, '.1f')} GiB {row.note}")


def speedups(rows: Sequence[dict[str, Any]], base: str = "base", other: str = "nha") -> list[dict[str, Any]]:
    """NHA / base ratios per (context, batch) where both ran, plus the ratio of the two max-batch rows.

    Every model label starting with `base` (base, base-nocudnn, base-static, ...) is a way to run the base model;
    each ratio is taken against the FASTEST of them (and the fastest NHA row), named in `base_run` / `nha_run`.
    """
    def best(model: str, pick: Callable[[dict[str, Any]], float | None], cands: Sequence[dict[str, Any]],
             low: bool) -> dict[str, Any] | None:
        have = [r for r in cands if r["model"].startswith(model) and pick(r)]
        return (min if low else max)(have, key=pick) if have else None

    dec = lambda r: r.get("decode_tok_s")  # noqa: E731
    pre = lambda r: r.get("prefill_s")  # noqa: E731
    out = []
    plain = [r for r in rows if "max batch" not in r.get("note", "")]
    for ctx, b in dict.fromkeys((r["context"], r["batch"]) for r in plain):
        here = [r for r in plain if (r["context"], r["batch"]) == (ctx, b)]
        if not any(r["model"].startswith(other) for r in here) or not any(r["model"].startswith(base) for r in here):
            continue
        bd, nd = best(base, dec, here, False), best(other, dec, here, False)
        bp, np_ = best(base, pre, here, True), best(other, pre, here, True)
        out.append({"context": ctx, "batch": b,
                    "decode_x": _ratio(dec(nd) if nd else None, dec(bd) if bd else None),
                    "prefill_x": _ratio(pre(bp) if bp else None, pre(np_) if np_ else None),
                    "base_run": bd["model"] if bd else None, "nha_run": nd["model"] if nd else None})
    for ctx in sorted({r["context"] for r in rows}):
        mx = [r for r in rows if r["context"] == ctx and "max batch" in r.get("note", "")]
        bd, nd = best(base, dec, mx, False), best(other, dec, mx, False)
        if bd and nd:
            out.append({"context": ctx, "batch": f"max ({nd['batch']} vs {bd['batch']})",
                        "decode_x": _ratio(dec(nd), dec(bd)), "prefill_x": None,
                        "base_run": bd["model"], "nha_run": nd["model"]})
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None
